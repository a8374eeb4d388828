//! SMTP submission: the pre-auth session (pure), replies, backend login.
pub mod backend;
