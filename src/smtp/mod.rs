//! SMTP submission: the pre-auth session (pure), replies, backend login, connection driver.

pub mod backend;
mod command;
pub mod ehlo;
pub mod proxy;
pub mod reply;
mod sasl;
pub mod session;
