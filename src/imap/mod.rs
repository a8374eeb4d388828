//! IMAP: the pre-auth session (pure), replies, backend login.
pub mod backend;
pub mod reply;
pub mod proxy;
