//! mailgate: an IMAP and SMTP-submission reverse proxy.
#![forbid(unsafe_code)]

pub mod accounts;
pub mod config;
pub mod imap;
pub mod login;
pub mod policy;
pub mod smtp;
