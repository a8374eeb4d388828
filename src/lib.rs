//! mailgate: an IMAP and SMTP-submission reverse proxy.
#![forbid(unsafe_code)]

pub mod accounts;
pub mod config;
pub mod imap;
pub mod login;
pub mod policy;
pub mod relay;
pub mod routing;
pub mod shutdown;
pub mod smtp;
pub mod tls;
