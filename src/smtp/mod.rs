//! SMTP submission: the pre-auth session (pure), replies, backend login.

mod command;
pub mod ehlo;
pub mod reply;
mod sasl;
pub mod session;
