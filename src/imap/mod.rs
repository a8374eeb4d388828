//! IMAP: the pre-auth session (pure), replies, backend login, connection driver, and the
//! IMAP-aware relay (`aware`: the filter, pure; `aware_relay`: its driver).

pub mod aware;
pub mod aware_relay;
pub mod backend;
pub mod parse;
pub mod proxy;
pub mod reply;
pub mod session;
