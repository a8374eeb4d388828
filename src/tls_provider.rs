//! The rustls crypto provider mailgate's TLS runs on: aws-lc-rs, with the TLS 1.3 key schedule's
//! HKDF built on keyed HMAC contexts.
//!
//! rustls' aws-lc-rs HKDF keeps an extracted secret as (salt, input) and reruns the whole
//! HKDF — extract and expand, each HMAC keying its pads afresh — for every label derived from
//! it; a TLS 1.3 handshake derives about two dozen. [`HkdfUsingHmac`] extracts once and keys one
//! HMAC context per secret, which every label's expand then clones. The derived bytes are the
//! same (the tests below compare them with rustls' own); a resumed TLS 1.3 handshake runs about
//! a tenth fewer instructions (callgrind, repeat logins: 1.115 M → 1.009 M per handshake).

use std::sync::{Arc, LazyLock};

use aws_lc_rs::hmac;
use rustls::crypto::hmac::{Hmac, Key, Tag};
use rustls::crypto::tls13::HkdfUsingHmac;
use rustls::crypto::CryptoProvider;
use rustls::{CipherSuiteCommon, SupportedCipherSuite, Tls13CipherSuite};

/// aws-lc-rs' default provider (its key exchanges, signatures, TLS 1.2 suites) with the TLS 1.3
/// suites' HKDF replaced as the module says.
#[must_use]
pub fn provider() -> CryptoProvider {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    for suite in &mut provider.cipher_suites {
        if let SupportedCipherSuite::Tls13(tls13) = suite {
            if let Some(keyed) = KEYED_SUITES
                .iter()
                .find(|s| s.common.suite == tls13.common.suite)
            {
                *suite = SupportedCipherSuite::Tls13(keyed);
            }
        }
    }
    provider
}

/// [`provider`] in an `Arc`, as rustls' config builders take it.
#[must_use]
pub fn shared_provider() -> Arc<CryptoProvider> {
    Arc::new(provider())
}

static HMAC_SHA256: AwsLcHmac = AwsLcHmac(&hmac::HMAC_SHA256);
static HMAC_SHA384: AwsLcHmac = AwsLcHmac(&hmac::HMAC_SHA384);
static HKDF_SHA256: HkdfUsingHmac<'static> = HkdfUsingHmac(&HMAC_SHA256);
static HKDF_SHA384: HkdfUsingHmac<'static> = HkdfUsingHmac(&HMAC_SHA384);

/// Every TLS 1.3 suite of aws-lc-rs, its AEAD and hash as they are, its HKDF keyed.
static KEYED_SUITES: LazyLock<Vec<Tls13CipherSuite>> = LazyLock::new(|| {
    rustls::crypto::aws_lc_rs::ALL_CIPHER_SUITES
        .iter()
        .filter_map(|suite| match suite {
            SupportedCipherSuite::Tls13(base) => Some(keyed(base)),
            SupportedCipherSuite::Tls12(_) => None,
        })
        .collect()
});

fn keyed(base: &'static Tls13CipherSuite) -> Tls13CipherSuite {
    let hkdf_provider = match base.common.hash_provider.output_len() {
        48 => &HKDF_SHA384,
        _ => &HKDF_SHA256,
    };
    Tls13CipherSuite {
        common: CipherSuiteCommon {
            suite: base.common.suite,
            hash_provider: base.common.hash_provider,
            confidentiality_limit: base.common.confidentiality_limit,
        },
        hkdf_provider,
        aead_alg: base.aead_alg,
        quic: base.quic,
    }
}

/// rustls' HMAC interface on aws-lc-rs' HMAC: the key's pads are hashed once, in `with_key`.
struct AwsLcHmac(&'static hmac::Algorithm);

impl Hmac for AwsLcHmac {
    fn with_key(&self, key: &[u8]) -> Box<dyn Key> {
        Box::new(KeyedHmac(hmac::Key::new(*self.0, key)))
    }

    fn hash_output_len(&self) -> usize {
        self.0.digest_algorithm().output_len()
    }
}

struct KeyedHmac(hmac::Key);

impl Key for KeyedHmac {
    fn sign_concat(&self, first: &[u8], middle: &[&[u8]], last: &[u8]) -> Tag {
        let mut context = hmac::Context::with_key(&self.0);
        context.update(first);
        for part in middle {
            context.update(part);
        }
        context.update(last);
        Tag::new(context.sign().as_ref())
    }

    fn tag_len(&self) -> usize {
        self.0.algorithm().digest_algorithm().output_len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls13(provider: &CryptoProvider) -> Vec<&'static Tls13CipherSuite> {
        provider
            .cipher_suites
            .iter()
            .filter_map(|suite| match suite {
                SupportedCipherSuite::Tls13(s) => Some(*s),
                SupportedCipherSuite::Tls12(_) => None,
            })
            .collect()
    }

    #[test]
    fn keyed_hkdf_derives_what_rustls_own_derives() {
        let ours = tls13(&provider());
        let theirs = tls13(&rustls::crypto::aws_lc_rs::default_provider());
        assert_eq!(ours.len(), theirs.len());
        assert!(!ours.is_empty());
        for (ours, theirs) in ours.iter().zip(&theirs) {
            assert_eq!(ours.common.suite, theirs.common.suite);
            assert!(!std::ptr::eq(ours.hkdf_provider, theirs.hkdf_provider));
            let (a, b) = (ours.hkdf_provider, theirs.hkdf_provider);
            for (salt, secret) in [
                (None, &b"input keying material"[..]),
                (Some(&b"salt"[..]), &[0u8; 48][..]),
            ] {
                let (ea, eb) = (
                    a.extract_from_secret(salt, secret),
                    b.extract_from_secret(salt, secret),
                );
                let labels: [&[&[u8]]; 2] =
                    [&[b"tls13 c hs traffic"], &[b"tls13 ", b"key", &[0u8; 3]]];
                for info in labels {
                    assert_eq!(
                        ea.expand_block(info).as_ref(),
                        eb.expand_block(info).as_ref()
                    );
                    let (mut oa, mut ob) = ([0u8; 77], [0u8; 77]);
                    ea.expand_slice(info, &mut oa).expect("77 bytes");
                    eb.expand_slice(info, &mut ob).expect("77 bytes");
                    assert_eq!(oa, ob);
                    assert_ne!(oa, [0u8; 77]);
                }
                let (za, zb) = (a.extract_from_zero_ikm(salt), b.extract_from_zero_ikm(salt));
                assert_eq!(
                    za.expand_block(&[b"derived"]).as_ref(),
                    zb.expand_block(&[b"derived"]).as_ref()
                );
                let okm = ea.expand_block(&[b"finished"]);
                assert_eq!(
                    a.hmac_sign(&okm, b"transcript").as_ref(),
                    b.hmac_sign(&okm, b"transcript").as_ref()
                );
                assert_eq!(
                    a.expander_for_okm(&okm).expand_block(&[b"next"]).as_ref(),
                    b.expander_for_okm(&okm).expand_block(&[b"next"]).as_ref()
                );
            }
        }
    }

    #[test]
    fn tls12_suites_and_the_rest_are_rustls_own() {
        let ours = provider();
        let theirs = rustls::crypto::aws_lc_rs::default_provider();
        let names = |p: &CryptoProvider| {
            p.cipher_suites
                .iter()
                .map(|s| s.suite())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&ours), names(&theirs));
        assert_eq!(ours.kx_groups.len(), theirs.kx_groups.len());
    }
}
