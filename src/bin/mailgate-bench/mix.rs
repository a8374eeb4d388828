//! The mixed workload's operations: what a mail client does on a logged-in session with INBOX
//! selected, drawn at random by weight, each one command and one round trip, and what a correct
//! answer to each looks like. Pure: no sockets, a seeded generator, so every target gets the
//! same sequence of operations in a repetition.

use anyhow::{ensure, Result};

use crate::imap::Reply;

/// Messages per header fetch (a screenful of a message list).
pub const HEADER_RANGE: u32 = 20;

/// One operation of the mix. Message numbers are sequence numbers in INBOX, 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `SELECT INBOX` again (a client going back to the folder).
    Select,
    /// `UID FETCH 1:* (FLAGS)`: the flag resync of the whole folder.
    Flags,
    /// The list headers of messages `first..=last`.
    Headers {
        first: u32,
        last: u32,
    },
    /// `UID SEARCH UNSEEN`.
    SearchUnseen,
    Noop,
    /// `STATUS INBOX (MESSAGES UNSEEN)` (the unread count a client polls).
    Status,
    /// The whole of message `n` (one of the small ones), without setting `\Seen`.
    Body {
        n: u32,
    },
}

/// The kinds of operation and their weights: how often each comes out of [`TOTAL_WEIGHT`].
/// A judgement of an ordinary client's session: polling (NOOP, STATUS) most, then reading
/// the list and messages, the resyncs (flags, unseen search, reselect) less often.
const WEIGHTS: [(Shape, u32); 7] = [
    (Shape::Noop, 4),
    (Shape::Headers, 3),
    (Shape::Body, 3),
    (Shape::Flags, 2),
    (Shape::SearchUnseen, 2),
    (Shape::Status, 2),
    (Shape::Select, 1),
];

const TOTAL_WEIGHT: u32 = {
    let mut sum = 0;
    let mut i = 0;
    while i < WEIGHTS.len() {
        sum += WEIGHTS[i].1;
        i += 1;
    }
    sum
};

/// An operation without its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Select,
    Flags,
    Headers,
    SearchUnseen,
    Noop,
    Status,
    Body,
}

impl Op {
    /// The command, without its tag.
    pub fn command(self) -> String {
        match self {
            Op::Select => "SELECT INBOX".into(),
            Op::Flags => "UID FETCH 1:* (FLAGS)".into(),
            Op::Headers { first, last } => {
                format!("FETCH {first}:{last} (UID BODY.PEEK[HEADER.FIELDS (FROM SUBJECT DATE)])")
            }
            Op::SearchUnseen => "UID SEARCH UNSEEN".into(),
            Op::Noop => "NOOP".into(),
            Op::Status => "STATUS INBOX (MESSAGES UNSEEN)".into(),
            Op::Body { n } => format!("FETCH {n} BODY.PEEK[]"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Op::Select => "SELECT",
            Op::Flags => "UID FETCH FLAGS",
            Op::Headers { .. } => "FETCH headers",
            Op::SearchUnseen => "UID SEARCH UNSEEN",
            Op::Noop => "NOOP",
            Op::Status => "STATUS",
            Op::Body { .. } => "FETCH BODY.PEEK[]",
        }
    }

    /// Whether `reply` (to a tagged OK) is the answer this operation should have had, in a
    /// mailbox of `exists` messages that nobody changes during the run.
    pub fn check(self, reply: &Reply, exists: u32) -> Result<()> {
        let name = self.name();
        match self {
            Op::Select => ensure!(
                reply.exists == Some(exists),
                "{name}: EXISTS {:?}, expected {exists}",
                reply.exists
            ),
            Op::Flags => ensure!(
                reply.fetches == exists,
                "{name}: {} FETCH responses, expected {exists}",
                reply.fetches
            ),
            Op::Headers { first, last } => {
                let want = last.saturating_sub(first) + 1;
                ensure!(
                    reply.fetches == want && reply.literal_bytes > 0,
                    "{name}: {} FETCH responses with {} bytes of headers, expected {want}",
                    reply.fetches,
                    reply.literal_bytes
                );
            }
            Op::SearchUnseen => ensure!(
                reply.search_hits.is_some_and(|n| n <= exists),
                "{name}: SEARCH response {:?} in a mailbox of {exists}",
                reply.search_hits
            ),
            Op::Noop => {}
            Op::Status => ensure!(
                reply.status_messages == Some(Some(exists)),
                "{name}: MESSAGES {:?}, expected {exists}",
                reply.status_messages.flatten()
            ),
            Op::Body { .. } => ensure!(
                reply.fetches == 1 && reply.literal_bytes > 0,
                "{name}: {} FETCH responses with {} bytes, expected one message",
                reply.fetches,
                reply.literal_bytes
            ),
        }
        Ok(())
    }
}

/// The operations of one session: a seeded generator over messages `1..=messages` (the small
/// ones; a larger message after them is never fetched whole).
#[derive(Debug, Clone)]
pub struct Mix {
    state: u64,
    messages: u32,
}

impl Mix {
    /// `messages` must be at least 1.
    pub fn new(seed: u64, messages: u32) -> Mix {
        Mix {
            // splitmix64 of the seed: nearby seeds give unrelated sequences; never zero.
            state: splitmix64(seed) | 1,
            messages: messages.max(1),
        }
    }

    /// xorshift64*: small, fast, and the same sequence on every machine.
    fn next_u32(&mut self) -> u32 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        (self.state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) as u32
    }

    /// Uniform in `0..n` (`n` ≥ 1).
    fn below(&mut self, n: u32) -> u32 {
        ((u64::from(self.next_u32()) * u64::from(n.max(1))) >> 32) as u32
    }

    pub fn next_op(&mut self) -> Op {
        let mut roll = self.below(TOTAL_WEIGHT);
        let mut shape = Shape::Noop;
        for (s, weight) in WEIGHTS {
            if roll < weight {
                shape = s;
                break;
            }
            roll -= weight;
        }
        match shape {
            Shape::Select => Op::Select,
            Shape::Flags => Op::Flags,
            Shape::Headers => {
                let span = HEADER_RANGE.min(self.messages);
                let first = 1 + self.below(self.messages - span + 1);
                Op::Headers {
                    first,
                    last: first + span - 1,
                }
            }
            Shape::SearchUnseen => Op::SearchUnseen,
            Shape::Noop => Op::Noop,
            Shape::Status => Op::Status,
            Shape::Body => Op::Body {
                n: 1 + self.below(self.messages),
            },
        }
    }
}

fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(seed: u64, messages: u32, n: usize) -> Vec<Op> {
        let mut mix = Mix::new(seed, messages);
        (0..n).map(|_| mix.next_op()).collect()
    }

    #[test]
    fn same_seed_same_sequence() {
        assert_eq!(ops(7, 200, 500), ops(7, 200, 500));
        assert_ne!(ops(7, 200, 500), ops(8, 200, 500));
    }

    #[test]
    fn every_operation_comes_about_as_often_as_its_weight() {
        let draws = 170_000;
        let all = ops(1, 200, draws);
        for (shape, weight) in WEIGHTS {
            let seen = all
                .iter()
                .filter(|op| {
                    matches!(
                        (shape, op),
                        (Shape::Select, Op::Select)
                            | (Shape::Flags, Op::Flags)
                            | (Shape::Headers, Op::Headers { .. })
                            | (Shape::SearchUnseen, Op::SearchUnseen)
                            | (Shape::Noop, Op::Noop)
                            | (Shape::Status, Op::Status)
                            | (Shape::Body, Op::Body { .. })
                    )
                })
                .count() as f64;
            let expected = draws as f64 * f64::from(weight) / f64::from(TOTAL_WEIGHT);
            assert!(
                (seen - expected).abs() < expected * 0.05,
                "{shape:?}: {seen} of {draws}, expected about {expected}"
            );
        }
    }

    #[test]
    fn message_numbers_stay_in_the_small_messages() {
        for messages in [1, 5, 20, 21, 200] {
            let mut first_seen = std::collections::BTreeSet::new();
            for op in ops(3, messages, 20_000) {
                match op {
                    Op::Headers { first, last } => {
                        assert!(first >= 1 && last <= messages, "{op:?} of {messages}");
                        assert_eq!(last - first + 1, HEADER_RANGE.min(messages));
                        first_seen.insert(first);
                    }
                    Op::Body { n } => assert!((1..=messages).contains(&n), "{op:?}"),
                    _ => {}
                }
            }
            // Every possible start of a range is drawn.
            assert_eq!(
                first_seen.len() as u32,
                messages - HEADER_RANGE.min(messages) + 1
            );
        }
    }

    #[test]
    fn commands() {
        let cases = [
            (Op::Select, "SELECT INBOX"),
            (Op::Flags, "UID FETCH 1:* (FLAGS)"),
            (
                Op::Headers { first: 3, last: 22 },
                "FETCH 3:22 (UID BODY.PEEK[HEADER.FIELDS (FROM SUBJECT DATE)])",
            ),
            (Op::SearchUnseen, "UID SEARCH UNSEEN"),
            (Op::Noop, "NOOP"),
            (Op::Status, "STATUS INBOX (MESSAGES UNSEEN)"),
            (Op::Body { n: 17 }, "FETCH 17 BODY.PEEK[]"),
        ];
        for (op, command) in cases {
            assert_eq!(op.command(), command);
        }
    }

    #[test]
    fn checks() {
        let reply = |fetches, literal_bytes| Reply {
            fetches,
            literal_bytes,
            ..Reply::default()
        };
        let headers = Op::Headers { first: 1, last: 20 };
        let cases: Vec<(Op, Reply, bool)> = vec![
            (
                Op::Select,
                Reply {
                    exists: Some(201),
                    ..Reply::default()
                },
                true,
            ),
            (
                Op::Select,
                Reply {
                    exists: Some(200),
                    ..Reply::default()
                },
                false,
            ),
            (Op::Select, Reply::default(), false),
            (Op::Flags, reply(201, 0), true),
            (Op::Flags, reply(200, 0), false),
            (headers, reply(20, 1900), true),
            (headers, reply(19, 1800), false),
            (headers, reply(20, 0), false),
            (
                Op::SearchUnseen,
                Reply {
                    search_hits: Some(0),
                    ..Reply::default()
                },
                true,
            ),
            (Op::SearchUnseen, Reply::default(), false),
            (Op::Noop, Reply::default(), true),
            (
                Op::Status,
                Reply {
                    status_messages: Some(Some(201)),
                    ..Reply::default()
                },
                true,
            ),
            (
                Op::Status,
                Reply {
                    status_messages: Some(None),
                    ..Reply::default()
                },
                false,
            ),
            (Op::Body { n: 4 }, reply(1, 2500), true),
            (Op::Body { n: 4 }, reply(0, 0), false),
        ];
        for (op, reply, ok) in cases {
            assert_eq!(op.check(&reply, 201).is_ok(), ok, "{op:?} {reply:?}");
        }
    }
}
