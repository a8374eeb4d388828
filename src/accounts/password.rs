//! Password hashes: parsed and checked once when the account file is loaded, verified on the
//! blocking pool at login.
//!
//! Supported formats, as existing mail stores write them:
//! - Argon2 PHC strings: `$argon2id$v=19$m=..,t=..,p=..$salt$hash` (also `$argon2i$`, `$argon2d$`);
//! - bcrypt: `$2a$`, `$2b$`, `$2y$` (not `$2x$`, the old buggy variant);
//! - SHA512-CRYPT: `$6$[rounds=N$]salt$hash`.
//!
//! Each may carry Dovecot's scheme prefix (`{ARGON2ID}`, `{ARGON2I}`, `{BLF-CRYPT}`,
//! `{SHA512-CRYPT}`), so a `doveadm pw` line can be pasted as is.

use std::fmt;
use std::str::FromStr;
use std::sync::LazyLock;

use argon2::{Argon2, PasswordHasher, PasswordVerifier};
use base64::Engine;
use serde::Deserialize;
use sha_crypt::ShaCrypt;
use zeroize::Zeroize;

/// A stored password hash, validated at load so that a login never meets a malformed one.
///
/// `Debug` shows only the scheme: hashes are not secrets, but they do not belong in logs either.
#[derive(Clone, PartialEq, Eq)]
pub struct PasswordHash(Scheme);

#[derive(Clone, PartialEq, Eq)]
enum Scheme {
    /// The parsed PHC string: algorithm, version, params, salt and output are all in it.
    Argon2(Box<argon2::PasswordHash>),
    /// The canonical `$2?$NN$<53 chars>` string; the bcrypt crate verifies from the string.
    Bcrypt(String),
    /// The parsed `$6$` modular-crypt string.
    Sha512Crypt(sha_crypt::PasswordHash),
}

/// Why a stored hash was refused at load.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a supported hash: {0}")]
pub struct HashParseError(String);

/// `hash_password` could not produce a hash (the OS random generator failed, or the password
/// is longer than argon2 accepts).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot hash the password: {0}")]
pub struct HashError(String);

impl PasswordHash {
    /// Which kind of hash this is, for messages and `Debug`.
    pub fn scheme(&self) -> &'static str {
        match &self.0 {
            Scheme::Argon2(h) => match h.algorithm.as_str() {
                "argon2i" => "argon2i",
                "argon2d" => "argon2d",
                _ => "argon2id",
            },
            Scheme::Bcrypt(_) => "bcrypt",
            Scheme::Sha512Crypt(_) => "sha512-crypt",
        }
    }

    /// Whether `password` matches. Runs the full hash function (milliseconds of CPU, megabytes
    /// of memory for argon2): call it on the blocking pool. The comparison of the outputs is
    /// constant-time (done by the hash crates).
    pub fn verify(&self, password: &[u8]) -> bool {
        match &self.0 {
            // `Argon2::default()` only supplies the hasher: algorithm, version and params are
            // taken from the stored hash.
            Scheme::Argon2(h) => verify_argon2(h, password),
            // `verify` (not `non_truncating_verify`): bcrypt stores only ever saw the first 72
            // bytes of a password, and must keep accepting what they accepted before.
            Scheme::Bcrypt(h) => bcrypt::verify(password, h).unwrap_or(false),
            Scheme::Sha512Crypt(h) => ShaCrypt::default().verify_password(password, h).is_ok(),
        }
    }
}

/// Argon2 working memory (about 19 MiB per hash at the default parameters), reused across
/// verifications. Allocating it per login made the allocator keep a copy per thread arena: a
/// few hundred MiB after a burst of first logins. Concurrent hashing is already bounded (the
/// authenticator's semaphore), so the pool holds at most that many areas.
static ARGON2_MEMORY: std::sync::Mutex<Vec<Vec<argon2::Block>>> = std::sync::Mutex::new(Vec::new());
/// Areas kept for reuse; one more than the hashing concurrency of a large machine.
const ARGON2_MEMORY_KEPT: usize = 16;

/// Recomputes the stored hash's output for `password` (algorithm, version, parameters and salt
/// from the PHC string) in pooled memory, and compares in constant time.
fn verify_argon2(hash: &argon2::PasswordHash, password: &[u8]) -> bool {
    let (Some(salt), Some(expected)) = (&hash.salt, &hash.hash) else {
        return false;
    };
    let Ok(algorithm) = argon2::Algorithm::try_from(hash.algorithm.as_str()) else {
        return false;
    };
    let version = match hash.version {
        Some(v) => match argon2::Version::try_from(v) {
            Ok(v) => v,
            Err(_) => return false,
        },
        None => argon2::Version::default(),
    };
    // Takes the output length from the stored hash too.
    let Ok(params) = argon2::Params::try_from(hash) else {
        return false;
    };
    let blocks_needed = params.block_count();
    let hasher = Argon2::new(algorithm, version, params);
    let mut memory = ARGON2_MEMORY
        .lock()
        .map(|mut pool| pool.pop())
        .ok()
        .flatten()
        .unwrap_or_default();
    memory.resize(blocks_needed, argon2::Block::default());
    let mut out = vec![0u8; expected.len()];
    let computed =
        hasher.hash_password_into_with_memory(password, salt.as_ref(), &mut out, &mut memory[..]);
    if let Ok(mut pool) = ARGON2_MEMORY.lock() {
        if pool.len() < ARGON2_MEMORY_KEPT {
            pool.push(memory);
        }
    }
    let matches = computed.is_ok()
        && argon2::password_hash::phc::Output::new(&out).is_ok_and(|o| o == *expected);
    out.zeroize();
    matches
}

impl fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PasswordHash({}, ***)", self.scheme())
    }
}

impl FromStr for PasswordHash {
    type Err = HashParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (prefix, hash) = split_dovecot_prefix(s.trim())?;
        let scheme = if hash.starts_with("$argon2") {
            parse_argon2(hash)?
        } else if hash.starts_with("$2") {
            parse_bcrypt(hash)?
        } else if hash.starts_with("$6$") {
            parse_sha512_crypt(hash)?
        } else {
            return Err(HashParseError(
                "expected an argon2 PHC string ($argon2id$...), bcrypt ($2b$...) or \
                 SHA512-CRYPT ($6$...)"
                    .into(),
            ));
        };
        let parsed = PasswordHash(scheme);
        if let Some(prefix) = prefix {
            let agrees = match prefix {
                "ARGON2ID" => parsed.scheme() == "argon2id",
                "ARGON2I" => parsed.scheme() == "argon2i",
                "BLF-CRYPT" => parsed.scheme() == "bcrypt",
                "SHA512-CRYPT" => parsed.scheme() == "sha512-crypt",
                _ => false,
            };
            if !agrees {
                return Err(HashParseError(format!(
                    "scheme prefix {{{prefix}}} does not match the {} hash after it",
                    parsed.scheme()
                )));
            }
        }
        Ok(parsed)
    }
}

impl<'de> Deserialize<'de> for PasswordHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Parsing inside the visitor (not after `String::deserialize`) lets serde_norway give
        // the error the hash's own line and key path.
        struct HashVisitor;

        impl serde::de::Visitor<'_> for HashVisitor {
            type Value = PasswordHash;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a password hash string")
            }

            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<PasswordHash, E> {
                s.parse().map_err(E::custom)
            }
        }

        d.deserialize_str(HashVisitor)
    }
}

/// Splits a Dovecot `{SCHEME}` prefix off.
fn split_dovecot_prefix(s: &str) -> Result<(Option<&str>, &str), HashParseError> {
    let Some(rest) = s.strip_prefix('{') else {
        return Ok((None, s));
    };
    let (scheme, hash) = rest
        .split_once('}')
        .ok_or_else(|| HashParseError("`{` without a closing `}`".into()))?;
    match scheme {
        "ARGON2ID" | "ARGON2I" | "BLF-CRYPT" | "SHA512-CRYPT" => Ok((Some(scheme), hash)),
        other => Err(HashParseError(format!(
            "scheme {{{other}}} is not supported (use ARGON2ID, ARGON2I, BLF-CRYPT or SHA512-CRYPT)"
        ))),
    }
}

fn parse_argon2(s: &str) -> Result<Scheme, HashParseError> {
    let bad = |why: String| HashParseError(format!("argon2 PHC string: {why}"));
    let hash = argon2::PasswordHash::new(s).map_err(|e| bad(e.to_string()))?;
    argon2::Algorithm::try_from(hash.algorithm.as_str()).map_err(|e| bad(e.to_string()))?;
    if let Some(v) = hash.version {
        argon2::Version::try_from(v).map_err(|e| bad(e.to_string()))?;
    }
    argon2::Params::try_from(&hash).map_err(|e| bad(e.to_string()))?;
    if hash.salt.is_none() || hash.hash.is_none() {
        return Err(bad("salt or hash output missing".into()));
    }
    Ok(Scheme::Argon2(Box::new(hash)))
}

fn parse_bcrypt(s: &str) -> Result<Scheme, HashParseError> {
    let bad = |why: &str| HashParseError(format!("bcrypt: {why}"));
    // `$2b$12$` + 22 characters of salt + 31 of hash.
    let mut fields = s.split('$');
    let (Some(""), Some(version), Some(cost), Some(rest), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(bad("expected $2b$NN$<salt and hash>"));
    };
    if !matches!(version, "2a" | "2b" | "2y") {
        return Err(bad("version must be 2a, 2b or 2y"));
    }
    let cost_ok = cost.len() == 2 && cost.parse::<u32>().is_ok_and(|c| (4..=31).contains(&c));
    if !cost_ok {
        return Err(bad("cost must be two digits, 04 to 31"));
    }
    let (Some(salt), Some(output), 53) = (rest.get(..22), rest.get(22..), rest.len()) else {
        return Err(bad("salt and hash must be 53 characters"));
    };
    let salt_ok = bcrypt::BASE_64
        .decode(salt)
        .is_ok_and(|bytes| bytes.len() == 16);
    let output_ok = bcrypt::BASE_64
        .decode(output)
        .is_ok_and(|bytes| bytes.len() == 23);
    if !salt_ok || !output_ok {
        return Err(bad("salt or hash is not bcrypt base64"));
    }
    Ok(Scheme::Bcrypt(s.to_owned()))
}

fn parse_sha512_crypt(s: &str) -> Result<Scheme, HashParseError> {
    let bad = |why: &str| HashParseError(format!("SHA512-CRYPT: {why}"));
    let hash = sha_crypt::PasswordHash::new(s).map_err(|_| bad("not a $6$ crypt string"))?;
    // `$6$` then an optional `rounds=N`, the salt, and 86 characters of output.
    let fields: Vec<&str> = hash.fields().map(|f| f.as_str()).collect();
    let (params, salt, output) = match fields.as_slice() {
        [salt, output] => (None, *salt, *output),
        [params, salt, output] => (Some(*params), *salt, *output),
        _ => return Err(bad("expected $6$[rounds=N$]salt$hash")),
    };
    if let Some(params) = params {
        let rounds_ok = params
            .strip_prefix("rounds=")
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|n| sha_crypt::Params::new(n).is_ok());
        if !rounds_ok {
            return Err(bad("rounds must be rounds=N with N from 1000 to 999999999"));
        }
    }
    // Longer salts are legal: crypt(3) uses the first 16 characters.
    if salt.is_empty() {
        return Err(bad("salt is empty"));
    }
    let output_ok = output.len() == 86
        && output
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'/');
    if !output_ok {
        return Err(bad("hash must be 86 characters of crypt base64"));
    }
    Ok(Scheme::Sha512Crypt(hash))
}

/// Hashes `password` as argon2id with the crate's default params (m=19456, t=2, p=1) and a
/// random salt, as a PHC string (for `mailgate hash-password`).
///
/// # Panics
/// Only where [`try_hash_password`] fails: the OS random generator is broken, or the password
/// is over 4 GiB.
pub fn hash_password(password: &[u8]) -> String {
    match try_hash_password(password) {
        Ok(hash) => hash,
        Err(e) => panic!("{e}"),
    }
}

/// [`hash_password`] that reports failure instead of panicking.
///
/// # Errors
/// The OS random generator failed, or the password is longer than argon2 accepts.
pub fn try_hash_password(password: &[u8]) -> Result<String, HashError> {
    Argon2::default()
        .hash_password(password)
        .map(|hash| hash.to_string())
        .map_err(|e| HashError(e.to_string()))
}

/// An argon2id hash with default params of a random password nobody knows. Unknown users, and
/// accounts without any hash, are verified against it so that their failure costs the same
/// work as a wrong password for a real account.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$osx1+PlmmbhyjVNzxoncBw$l/2Sqy50BDSoiBn+riypFw1TMt2BDKTAjxyLazEOHzc";

static DUMMY: LazyLock<Option<PasswordHash>> = LazyLock::new(|| DUMMY_HASH.parse().ok());

/// Spends the work of one default argon2id verification and always fails.
pub(crate) fn verify_dummy(password: &[u8]) {
    if let Some(dummy) = DUMMY.as_ref() {
        // The result is irrelevant: nobody knows the dummy password, and it says nothing.
        let _ = dummy.verify(password);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let path = format!(
            "{}/testdata/accounts/hashes/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        match std::fs::read_to_string(&path) {
            Ok(s) => s.trim().to_owned(),
            Err(e) => panic!("{path}: {e}"),
        }
    }

    fn parse(s: &str) -> PasswordHash {
        match s.parse() {
            Ok(h) => h,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    /// Every fixture hashes the password `correct horse`; each was made by a different tool.
    #[test]
    fn each_supported_format_verifies_and_rejects_a_wrong_password() {
        let cases = [
            ("argon2id.phc", "argon2id"),
            ("argon2i.phc", "argon2i"),
            ("argon2d.phc", "argon2d"),
            ("bcrypt-2b.txt", "bcrypt"),
            ("bcrypt-2a.txt", "bcrypt"),
            ("sha512-crypt.txt", "sha512-crypt"),
            ("sha512-crypt-rounds.txt", "sha512-crypt"),
            ("dovecot-argon2id.txt", "argon2id"),
            ("dovecot-blf-crypt.txt", "bcrypt"),
            ("dovecot-sha512-crypt.txt", "sha512-crypt"),
        ];
        for (file, scheme) in cases {
            let hash = parse(&fixture(file));
            assert_eq!(hash.scheme(), scheme, "{file}");
            assert!(hash.verify(b"correct horse"), "{file}: right password");
            assert!(!hash.verify(b"correct horsE"), "{file}: wrong password");
            assert!(!hash.verify(b""), "{file}: empty password");
        }
    }

    #[test]
    fn malformed_hashes_are_refused_with_a_reason() {
        let good_bcrypt = fixture("bcrypt-2b.txt");
        let cases: Vec<(String, &str)> = vec![
            ("plaintext".into(), "expected an argon2 PHC string"),
            ("".into(), "expected an argon2 PHC string"),
            (
                "$argon2id$v=19$m=256,t=1,p=1$c2FsdHNhbHQ".into(),
                "salt or hash output missing",
            ),
            (
                "$argon2xx$v=19$m=256,t=1,p=1$c2FsdHNhbHQ$aGFzaA".into(),
                "argon2 PHC string",
            ),
            (
                "$argon2id$v=19$m=1,t=1,p=1$c2FsdHNhbHQ$YWFhYWFhYWFhYWFhYWFhYQ".into(),
                "argon2 PHC string",
            ),
            (
                good_bcrypt.replacen("$2b$", "$2x$", 1),
                "version must be 2a, 2b or 2y",
            ),
            (
                good_bcrypt.replacen("$04$", "$32$", 1),
                "cost must be two digits",
            ),
            (
                good_bcrypt[..good_bcrypt.len() - 1].to_owned(),
                "53 characters",
            ),
            ("$6$salt$tooshort".into(), "86 characters"),
            (
                "$6$rounds=10$salt$".to_owned() + &"a".repeat(86),
                "rounds must be",
            ),
            ("$5$salt$abc".into(), "expected an argon2 PHC string"),
            ("{PLAIN}secret".into(), "scheme {PLAIN} is not supported"),
            (
                format!("{{SHA512-CRYPT}}{good_bcrypt}"),
                "does not match the bcrypt hash",
            ),
        ];
        for (input, expected) in cases {
            match input.parse::<PasswordHash>() {
                Ok(h) => panic!("{input:?} accepted as {h:?}"),
                Err(e) => assert!(
                    e.to_string().contains(expected),
                    "{input:?}: `{e}` lacks `{expected}`"
                ),
            }
        }
    }

    #[test]
    fn hash_password_makes_default_argon2id_that_verifies() {
        let hash = hash_password(b"s3cret");
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        let parsed = parse(&hash);
        assert!(parsed.verify(b"s3cret"));
        assert!(!parsed.verify(b"s3cret "));
        // A random salt each time.
        assert_ne!(hash, hash_password(b"s3cret"));
    }

    #[test]
    fn dummy_hash_parses_with_default_params() {
        let dummy = DUMMY.as_ref().map(PasswordHash::scheme);
        assert_eq!(dummy, Some("argon2id"));
        assert!(DUMMY_HASH.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
    }

    #[test]
    fn debug_does_not_show_the_hash() {
        let hash = parse(&fixture("argon2id.phc"));
        assert_eq!(format!("{hash:?}"), "PasswordHash(argon2id, ***)");
    }
}
