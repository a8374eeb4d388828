//! A small IMAP client: enough of the protocol to log in, select, append, idle, fetch a literal
//! and log out, over any byte stream (plain TCP to seed the backend, TLS to the targets), and
//! to count the FETCH, SEARCH and STATUS answers the mixed workload checks.
//! Literals in responses are read and counted, never kept; lines are capped.

use std::net::SocketAddr;

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::tls::Negotiated;

/// The longest response line accepted (the rest of a message is in literals).
const MAX_LINE: u64 = 64 * 1024;

pub type Tls = TlsStream<TcpStream>;

/// What a tagged command brought back besides its OK.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// Bytes of all literals in the untagged responses.
    pub literal_bytes: u64,
    /// `* N EXISTS`, when the server sent one.
    pub exists: Option<u32>,
    /// How many `* N FETCH` responses came.
    pub fetches: u32,
    /// How many numbers a `* SEARCH` response held, when one came.
    pub search_hits: Option<u32>,
    /// `MESSAGES` of a `* STATUS` response, when one came (`Some(None)`: without MESSAGES).
    pub status_messages: Option<Option<u32>>,
}

impl Reply {
    /// Takes note of one response line (the first line of a response, before any literal).
    fn note(&mut self, line: &[u8]) {
        match untagged(line) {
            Some(Untagged::Exists(n)) => self.exists = Some(n),
            Some(Untagged::Fetch) => self.fetches += 1,
            Some(Untagged::Search(hits)) => self.search_hits = Some(hits),
            Some(Untagged::Status { messages }) => self.status_messages = Some(messages),
            None => {}
        }
    }
}

/// The untagged responses the bench looks at.
#[derive(Debug, PartialEq, Eq)]
enum Untagged {
    Exists(u32),
    Fetch,
    /// The number of hits.
    Search(u32),
    Status {
        messages: Option<u32>,
    },
}

pub struct Client<S> {
    io: BufReader<S>,
    next_tag: u32,
    line: Vec<u8>,
}

/// TCP (no Nagle) then TLS; the greeting is read before returning.
pub async fn connect_tls(
    addr: SocketAddr,
    connector: &TlsConnector,
    name: &rustls::pki_types::ServerName<'static>,
    buffer: usize,
) -> Result<Client<Tls>> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    tcp.set_nodelay(true)?;
    let tls = connector
        .connect(name.clone(), tcp)
        .await
        .with_context(|| format!("TLS handshake with {addr}"))?;
    let mut client = Client::new(tls, buffer);
    client.greeting().await?;
    Ok(client)
}

/// Plain TCP (for the backend's own port); the greeting is read before returning.
pub async fn connect_plain(addr: SocketAddr) -> Result<Client<TcpStream>> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    tcp.set_nodelay(true)?;
    let mut client = Client::new(tcp, 64 * 1024);
    client.greeting().await?;
    Ok(client)
}

impl Client<Tls> {
    pub fn negotiated(&self) -> Negotiated {
        Negotiated::of(self.io.get_ref().get_ref().1)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    pub fn new(stream: S, buffer: usize) -> Client<S> {
        Client {
            io: BufReader::with_capacity(buffer, stream),
            next_tag: 1,
            line: Vec::new(),
        }
    }

    async fn greeting(&mut self) -> Result<()> {
        self.read_line().await?;
        ensure!(
            self.line.starts_with(b"* OK"),
            "greeting: {}",
            String::from_utf8_lossy(&self.line).trim_end()
        );
        Ok(())
    }

    /// Reads one line (through its LF) into `self.line`.
    async fn read_line(&mut self) -> Result<()> {
        self.line.clear();
        let n = (&mut self.io)
            .take(MAX_LINE)
            .read_until(b'\n', &mut self.line)
            .await?;
        ensure!(n > 0, "connection closed by the server");
        ensure!(
            self.line.ends_with(b"\n"),
            "response line longer than {MAX_LINE} bytes"
        );
        Ok(())
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        let stream = self.io.get_mut();
        stream.write_all(bytes).await?;
        stream.flush().await?;
        Ok(())
    }

    fn tag(&mut self) -> String {
        let tag = format!("t{}", self.next_tag);
        self.next_tag += 1;
        tag
    }

    /// Sends `tag command` and reads every response up to the tagged one, which must be OK.
    pub async fn run(&mut self, command: &str) -> Result<Reply> {
        let tag = self.tag();
        self.send(format!("{tag} {command}\r\n").as_bytes()).await?;
        self.tagged(&tag, command).await
    }

    /// Reads responses until `tag`'s; literals are consumed and counted.
    async fn tagged(&mut self, tag: &str, what: &str) -> Result<Reply> {
        let mut reply = Reply::default();
        loop {
            self.read_line().await?;
            reply.note(&self.line);
            // A response line may end in a literal, after which the same response goes on.
            while let Some(size) = literal_size(&self.line) {
                let copied =
                    tokio::io::copy_buf(&mut (&mut self.io).take(size), &mut tokio::io::sink())
                        .await?;
                ensure!(copied == size, "connection closed inside a literal");
                reply.literal_bytes += size;
                self.read_line().await?;
            }
            let line = &self.line;
            if let Some(status) = line
                .strip_prefix(tag.as_bytes())
                .and_then(|rest| rest.strip_prefix(b" "))
            {
                if status.starts_with(b"OK") {
                    return Ok(reply);
                }
                bail!(
                    "{}: {}",
                    what.split(' ').next().unwrap_or(what),
                    String::from_utf8_lossy(line).trim_end()
                );
            }
        }
    }

    pub async fn login(&mut self, user: &str, password: &str) -> Result<()> {
        self.run(&format!("LOGIN {} {}", quoted(user), quoted(password)))
            .await
            .map(|_| ())
    }

    /// `SELECT mailbox`; the number of messages in it.
    pub async fn select(&mut self, mailbox: &str) -> Result<u32> {
        let reply = self.run(&format!("SELECT {}", quoted(mailbox))).await?;
        reply
            .exists
            .ok_or_else(|| anyhow!("SELECT {mailbox}: no EXISTS"))
    }

    /// `IDLE`, up to the server's continuation request; the session then stays idle.
    pub async fn idle(&mut self) -> Result<()> {
        let tag = self.tag();
        self.send(format!("{tag} IDLE\r\n").as_bytes()).await?;
        loop {
            self.read_line().await?;
            if self.line.starts_with(b"+") {
                return Ok(());
            }
            if self.line.starts_with(tag.as_bytes()) {
                bail!("IDLE: {}", String::from_utf8_lossy(&self.line).trim_end());
            }
        }
    }

    /// `APPEND mailbox` with a non-synchronising literal (LITERAL+).
    pub async fn append(&mut self, mailbox: &str, message: &[u8]) -> Result<()> {
        let tag = self.tag();
        let head = format!(
            "{tag} APPEND {} {{{}+}}\r\n",
            quoted(mailbox),
            message.len()
        );
        let stream = self.io.get_mut();
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(message).await?;
        stream.write_all(b"\r\n").await?;
        stream.flush().await?;
        self.tagged(&tag, "APPEND").await.map(|_| ())
    }

    pub async fn logout(&mut self) -> Result<()> {
        self.run("LOGOUT").await.map(|_| ())
    }
}

/// `{123}` or `{123+}` at the end of a line.
fn literal_size(line: &[u8]) -> Option<u64> {
    let body = line
        .strip_suffix(b"\r\n")
        .or_else(|| line.strip_suffix(b"\n"))?;
    let body = body.strip_suffix(b"}")?;
    let body = body.strip_suffix(b"+").unwrap_or(body);
    let open = body.iter().rposition(|&b| b == b'{')?;
    let digits = body.get(open + 1..)?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// `* N EXISTS`, `* N FETCH (…`, `* SEARCH n…`, `* STATUS mailbox (…)`; other lines are
/// `None`.
fn untagged(line: &[u8]) -> Option<Untagged> {
    let text = std::str::from_utf8(line).ok()?.trim_end();
    let rest = text.strip_prefix("* ")?;
    let (first, rest) = rest.split_once(' ').unwrap_or((rest, ""));
    if first.eq_ignore_ascii_case("SEARCH") {
        let hits = rest.split_ascii_whitespace().take_while(|w| is_number(w));
        return Some(Untagged::Search(u32::try_from(hits.count()).ok()?));
    }
    if first.eq_ignore_ascii_case("STATUS") {
        // The mailbox name may be quoted and hold spaces: the attributes are the last (…).
        let open = rest.rfind('(')?;
        let inner = rest.get(open + 1..)?.strip_suffix(')')?;
        let words: Vec<&str> = inner.split_ascii_whitespace().collect();
        let messages = words
            .chunks(2)
            .find(|pair| {
                pair.first()
                    .is_some_and(|k| k.eq_ignore_ascii_case("MESSAGES"))
            })
            .and_then(|pair| pair.get(1))
            .and_then(|v| v.parse().ok());
        return Some(Untagged::Status { messages });
    }
    let n: u32 = first.parse().ok()?;
    let word = rest.split(' ').next()?;
    if word.eq_ignore_ascii_case("EXISTS") && rest.len() == word.len() {
        Some(Untagged::Exists(n))
    } else if word.eq_ignore_ascii_case("FETCH") {
        Some(Untagged::Fetch)
    } else {
        None
    }
}

fn is_number(word: &str) -> bool {
    !word.is_empty() && word.bytes().all(|b| b.is_ascii_digit())
}

/// An IMAP quoted string (the bench's names and passwords hold no CR/LF).
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_sizes() {
        assert_eq!(
            literal_size(b"* 1 FETCH (BODY[] {10485760}\r\n"),
            Some(10_485_760)
        );
        assert_eq!(literal_size(b"* 1 FETCH (BODY[] {5+}\r\n"), Some(5));
        assert_eq!(literal_size(b"* OK {x}\r\n"), None);
        assert_eq!(literal_size(b"* OK {}\r\n"), None);
        assert_eq!(literal_size(b"t1 OK done\r\n"), None);
    }

    #[test]
    fn untagged_lines() {
        use Untagged::*;
        let cases: &[(&[u8], Option<Untagged>)] = &[
            (b"* 201 EXISTS\r\n", Some(Exists(201))),
            (b"* 201 exists\r\n", Some(Exists(201))),
            (b"* 3 RECENT\r\n", None),
            (b"* OK [UIDNEXT 4] Predicted next UID\r\n", None),
            (b"* 7 FETCH (UID 7 FLAGS (\\Seen))\r\n", Some(Fetch)),
            (
                b"* 12 FETCH (UID 12 BODY[HEADER.FIELDS (FROM SUBJECT DATE)] {95}\r\n",
                Some(Fetch),
            ),
            (b"* SEARCH 1 2 3 200\r\n", Some(Search(4))),
            (b"* SEARCH\r\n", Some(Search(0))),
            (b"* SEARCH \r\n", Some(Search(0))),
            (
                b"* STATUS INBOX (MESSAGES 201 UNSEEN 190)\r\n",
                Some(Status {
                    messages: Some(201),
                }),
            ),
            (
                b"* STATUS \"My (old) box\" (UNSEEN 3 MESSAGES 9)\r\n",
                Some(Status { messages: Some(9) }),
            ),
            (
                b"* STATUS INBOX (UNSEEN 3)\r\n",
                Some(Status { messages: None }),
            ),
            (b"* STATUS INBOX\r\n", None),
            (b"t4 OK Fetch completed.\r\n", None),
            (b"* 5 EXPUNGE\r\n", None),
            (b"\xff\xfe\r\n", None),
        ];
        for (line, want) in cases {
            assert_eq!(&untagged(line), want, "{}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn reply_notes_counts() {
        let mut reply = Reply::default();
        for line in [
            &b"* 1 FETCH (UID 1 FLAGS ())\r\n"[..],
            b"* 2 FETCH (UID 2 FLAGS ())\r\n",
            b"* 2 EXISTS\r\n",
            b"* SEARCH 1 2\r\n",
            b"* STATUS INBOX (MESSAGES 2 UNSEEN 2)\r\n",
        ] {
            reply.note(line);
        }
        assert_eq!(
            reply,
            Reply {
                literal_bytes: 0,
                exists: Some(2),
                fetches: 2,
                search_hits: Some(2),
                status_messages: Some(Some(2)),
            }
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(quoted(r#"a"b\c"#), r#""a\"b\\c""#);
    }
}
