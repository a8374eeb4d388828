//! IMAP: the pre-auth session (pure), replies, backend login.
