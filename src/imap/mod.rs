//! IMAP: the pre-auth session (pure), replies, backend login.
pub mod parse;
pub mod session;
