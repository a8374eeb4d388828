//! Accounts: the account model, the file source, password verification and its cache.
//!
//! (Being written: see the helper brief. Public interface below is the contract.)
