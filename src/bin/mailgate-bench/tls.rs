//! The client side of TLS: one rustls client config per login client and target (so session
//! tickets of one target are never offered to another, and each client keeps its own, as a
//! device does), restricted to one protocol version, cipher suite and key exchange group
//! (X25519) so every target negotiates the same, and a verifier that checks the handshake
//! signature (real work, as in a mail client) but not the chain of the bench's self-signed
//! certificate. The crypto is mailgate's own provider (`mailgate::tls_provider`: ring's AEADs,
//! aws-lc-rs for the rest), the cheapest this machine has, so the load generator takes as little
//! as it can of the two cores it shares with the targets; it is the same client for every target.

use std::fmt;
use std::sync::Arc;

use anyhow::{anyhow, Context as _, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, HandshakeKind, SignatureScheme,
};
use tokio_rustls::TlsConnector;

/// What the client offers: one version, one suite.
#[derive(Debug, Clone)]
pub struct TlsChoice {
    pub suite: rustls::SupportedCipherSuite,
    pub resumption: bool,
}

impl TlsChoice {
    /// `name` is a rustls suite name such as `TLS13_AES_256_GCM_SHA384` or
    /// `TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384`.
    pub fn new(name: &str, resumption: bool) -> Result<TlsChoice> {
        let suites = mailgate::tls_provider::provider().cipher_suites;
        let suite = suites
            .iter()
            .find(|s| format!("{:?}", s.suite()).eq_ignore_ascii_case(name))
            .copied()
            .ok_or_else(|| {
                let names: Vec<String> =
                    suites.iter().map(|s| format!("{:?}", s.suite())).collect();
                anyhow!("unknown cipher suite {name}; one of {}", names.join(", "))
            })?;
        Ok(TlsChoice { suite, resumption })
    }

    /// A fresh connector (own session store) for one target.
    pub fn connector(&self) -> Result<TlsConnector> {
        let provider = Arc::new(CryptoProvider {
            cipher_suites: vec![self.suite],
            // X25519 alone: nginx's OpenSSL 3.0 has no post-quantum group, and every target
            // must negotiate the same.
            kx_groups: vec![aws_lc_rs::kx_group::X25519],
            ..mailgate::tls_provider::provider()
        });
        let version = self.suite.version();
        let mut config = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[version])
            .context("client TLS config")?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SignatureOnly(provider)))
            .with_no_client_auth();
        if !self.resumption {
            config.resumption = Resumption::disabled();
        }
        Ok(TlsConnector::from(Arc::new(config)))
    }
}

/// The name every target's certificate carries and the client sends as SNI.
pub fn server_name() -> Result<ServerName<'static>> {
    ServerName::try_from("imap.skydesk.jp").context("server name")
}

/// What one handshake negotiated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub version: String,
    pub suite: String,
    pub group: String,
    pub resumed: bool,
}

impl Negotiated {
    pub fn of(conn: &ClientConnection) -> Negotiated {
        let none = || "?".to_owned();
        Negotiated {
            version: conn
                .protocol_version()
                .map_or_else(none, |v| format!("{v:?}")),
            suite: conn
                .negotiated_cipher_suite()
                .map_or_else(none, |s| format!("{:?}", s.suite())),
            group: conn
                .negotiated_key_exchange_group()
                .map_or_else(none, |g| format!("{:?}", g.name())),
            resumed: conn.handshake_kind() == Some(HandshakeKind::Resumed),
        }
    }
}

impl fmt::Display for Negotiated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.version, self.suite, self.group)
    }
}

/// Accepts the bench certificate without a chain check, verifies handshake signatures.
#[derive(Debug)]
struct SignatureOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for SignatureOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailgate::config::{CertificateConfig, TlsConfig};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::TlsAcceptor;

    /// A target with mailgate's own TLS server config (its tickets, one per handshake), on the
    /// development certificate it makes in `dir`.
    fn target(dir: &std::path::Path) -> TlsAcceptor {
        let tls = mailgate::tls::Tls::from_config(&TlsConfig {
            certificates: vec![CertificateConfig {
                cert: dir.join("dev.crt"),
                key: dir.join("dev.key"),
            }],
            self_signed_if_missing: true,
        })
        .expect("mailgate's TLS config");
        TlsAcceptor::from(tls.config)
    }

    /// One connection of `client` to `target`, reading the server's first byte (the TLS 1.3
    /// tickets come before it, as they come before a target's greeting). Whether it resumed.
    async fn resumed(client: &TlsConnector, target: &TlsAcceptor) -> bool {
        let (near, far) = tokio::io::duplex(64 * 1024);
        let server = async {
            let mut tls = target.accept(far).await.expect("server handshake");
            tls.write_all(b"*").await.expect("server write");
            tls.flush().await.expect("server flush");
            let mut rest = Vec::new();
            let _ = tls.read_to_end(&mut rest).await;
        };
        let client = async {
            let mut tls = client
                .connect(server_name().expect("name"), near)
                .await
                .expect("client handshake");
            let mut first = [0_u8; 1];
            tls.read_exact(&mut first).await.expect("client read");
            let resumed = Negotiated::of(tls.get_ref().1).resumed;
            tls.shutdown().await.expect("client close");
            resumed
        };
        tokio::join!(server, client).1
    }

    /// Each login client keeps its own tickets, as a device does: a client that has one
    /// resumes, though another client connected in between. (Were the store shared, the two
    /// would take each other's tickets, which rustls does not resume with under another
    /// client's verifier: a store shared by all connectors fails this test.) A client offering
    /// no resumption always does a full handshake.
    #[tokio::test]
    async fn each_login_client_keeps_its_own_tickets() {
        let choice = TlsChoice::new("TLS13_AES_256_GCM_SHA384", true).expect("suite");
        let dir = tempfile::tempdir().expect("tempdir");
        let server = target(dir.path());
        let a = choice.connector().expect("connector");
        let b = choice.connector().expect("connector");
        assert!(
            !resumed(&a, &server).await,
            "a's first connection is a full handshake"
        );
        assert!(!resumed(&b, &server).await, "b has no ticket of its own");
        assert!(resumed(&a, &server).await, "a resumes with its own ticket");
        assert!(resumed(&b, &server).await, "b resumes with its own ticket");
        assert!(
            resumed(&a, &server).await,
            "a resumes with the ticket it was just sent"
        );

        let none = TlsChoice::new("TLS13_AES_256_GCM_SHA384", false).expect("suite");
        let d = none.connector().expect("connector");
        assert!(!resumed(&d, &server).await);
        assert!(
            !resumed(&d, &server).await,
            "no resumption offered: always a full handshake"
        );
    }
}
