//! IMAP: the pre-auth session (pure), replies, backend login, connection driver.

pub mod aware;
pub mod aware_relay;
pub mod backend;
pub mod parse;
pub mod proxy;
pub mod reply;
pub mod session;
