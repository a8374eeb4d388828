//! Shutdown phases, broadcast to every connection.
//!
//! `Running` → `Draining` (SIGTERM: stop accepting, say goodbye to sessions not yet logged in,
//! let spliced sessions run) → `Closing` (drain deadline passed, or SIGINT: close everything).

use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running,
    Draining,
    Closing,
}

/// Sends phase changes; held by `main` (signals) or a test.
#[derive(Debug)]
pub struct Trigger {
    tx: watch::Sender<Phase>,
}

impl Trigger {
    /// Moves forward to `phase` (never back).
    pub fn advance(&self, phase: Phase) {
        self.tx.send_if_modified(|current| {
            if phase > *current {
                *current = phase;
                true
            } else {
                false
            }
        });
    }

    pub fn subscribe(&self) -> Shutdown {
        Shutdown {
            rx: self.tx.subscribe(),
        }
    }
}

/// A connection's view of the shutdown phase.
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<Phase>,
}

/// A new trigger and its first receiver.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(Phase::Running);
    (Trigger { tx }, Shutdown { rx })
}

impl Shutdown {
    pub fn phase(&self) -> Phase {
        *self.rx.borrow()
    }

    /// Resolves once the phase is `phase` or later (or the trigger is gone, which counts as
    /// `Closing`).
    pub async fn reached(&mut self, phase: Phase) {
        let _ = self.rx.wait_for(|p| *p >= phase).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn phases_only_move_forward() {
        let (trigger, mut shutdown) = channel();
        assert_eq!(shutdown.phase(), Phase::Running);
        trigger.advance(Phase::Closing);
        trigger.advance(Phase::Draining);
        assert_eq!(shutdown.phase(), Phase::Closing);
        shutdown.reached(Phase::Draining).await;
    }
}
