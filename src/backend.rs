//! What both protocols' backend logins share: the connect step and the error that says
//! whether the next backend in the user's order may serve.

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::config::Protocol;
use crate::metrics::Metrics;
use crate::routing::Pool;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Could not connect, or the backend turned us away at once (BYE / 421 greeting):
    /// another backend may serve.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The backend refused the login, with its response code (IMAP) or reply code (SMTP)
    /// if it gave one.
    #[error("login refused{}", code.as_deref().map(|c| format!(" [{c}]")).unwrap_or_default())]
    Refused { code: Option<String> },
    /// The backend broke the protocol, closed, or was too slow after connect.
    #[error("backend failed: {0}")]
    Failed(String),
}

impl BackendError {
    /// Whether the next backend in the user's order should be tried.
    pub fn try_next(&self) -> bool {
        matches!(self, BackendError::Unreachable(_))
    }
}

/// Connects with a deadline and `TCP_NODELAY` (login exchanges are small round trips).
///
/// # Errors
/// `Unreachable` on refusal, DNS failure or timeout.
pub async fn connect(address: &str, timeout: Duration) -> Result<TcpStream, BackendError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(address))
        .await
        .map_err(|_| BackendError::Unreachable(format!("{address}: connect timed out")))?
        .map_err(|e| BackendError::Unreachable(format!("{address}: {e}")))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Tries `login` on each backend of `pool` in the user's rendezvous order (healthy backends
/// first), moving on only when a backend is unreachable. Returns the backend's address with
/// the session. Each attempt's time goes to `mailgate_backend_connect_duration_seconds`; an
/// unreachable backend counts as a failed health check.
///
/// # Errors
/// The first error that is not "unreachable", or `Unreachable` when every backend was.
pub async fn first_available<T, F, Fut>(
    session_id: &str,
    pool: &Pool,
    protocol: Protocol,
    user: &str,
    metrics: &Metrics,
    mut login: F,
) -> Result<(String, T), BackendError>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<T, BackendError>>,
{
    let histogram = metrics.backend_connect(&pool.name);
    for backend in pool.order(protocol, user) {
        let timer = histogram.map(|h| h.start_timer());
        let result = login(backend.address.clone()).await;
        drop(timer);
        match result {
            Ok(session) => return Ok((backend.address.clone(), session)),
            Err(e) if e.try_next() => {
                if backend.health().record(false) == Some(false) {
                    tracing::warn!(pool = %pool.name, backend = %backend.address, "backend marked down after failed logins");
                }
                tracing::warn!(session = session_id, pool = %pool.name, backend = %backend.address, error = %e, "backend unreachable; trying the next");
            }
            Err(e) => {
                tracing::warn!(session = session_id, pool = %pool.name, backend = %backend.address, error = %e, "backend login failed");
                return Err(e);
            }
        }
    }
    Err(BackendError::Unreachable(format!(
        "no {} backend of pool {} reachable",
        protocol.as_str(),
        pool.name
    )))
}
