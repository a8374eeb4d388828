//! Server-side TLS: the rustls config, the certificate chosen by SNI, the development
//! certificate made on first start.
//!
//! Certificates are looked up by the names they carry (subjectAltName DNS names, exact or
//! `*.` wildcard); a client that sends no SNI, or a name no certificate carries, gets the first
//! configured certificate. The map sits behind an `ArcSwap` so a reload can replace it while
//! handshakes run.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{CertificateConfig, TlsConfig};

/// Names the development certificate is made for.
pub const DEV_CERT_NAMES: [&str; 5] = [
    "imap.skydesk.jp",
    "imappro.skydesk.jp",
    "smtp.skydesk.jp",
    "localhost",
    "127.0.0.1",
];

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("no certificate configured")]
    NoCertificate,
}

fn file_error(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// One loaded certificate: the key rustls signs with, the names it serves, when it expires.
#[derive(Debug)]
pub struct LoadedCertificate {
    pub key: Arc<CertifiedKey>,
    /// Lowercase DNS names from subjectAltName (and the CN when there are none).
    pub names: Vec<String>,
    /// The certificate file, for logs and the expiry metric's label.
    pub label: String,
    /// notAfter of the end-entity certificate, seconds since the epoch.
    pub not_after: i64,
}

/// The certificates by name; the first is the default.
#[derive(Debug)]
pub struct CertificateSet {
    by_name: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
    pub certificates: Vec<LoadedCertificate>,
}

impl CertificateSet {
    pub fn new(certificates: Vec<LoadedCertificate>) -> Result<CertificateSet, TlsError> {
        let default = certificates
            .first()
            .map(|c| c.key.clone())
            .ok_or(TlsError::NoCertificate)?;
        let mut by_name = HashMap::new();
        for cert in &certificates {
            for name in &cert.names {
                // First certificate naming a host wins, as the order in the config says.
                by_name
                    .entry(name.clone())
                    .or_insert_with(|| cert.key.clone());
            }
        }
        Ok(CertificateSet {
            by_name,
            default,
            certificates,
        })
    }

    /// The certificate for `sni`: exact name, then `*.parent` wildcard, then the default.
    pub fn choose(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = sni else {
            return self.default.clone();
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(key) = self.by_name.get(&name) {
            return key.clone();
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(key) = self.by_name.get(&format!("*.{parent}")) {
                return key.clone();
            }
        }
        self.default.clone()
    }
}

/// rustls' hook: picks from the current `CertificateSet`.
#[derive(Debug)]
pub struct SniResolver {
    set: ArcSwap<CertificateSet>,
}

impl SniResolver {
    pub fn new(set: CertificateSet) -> SniResolver {
        SniResolver {
            set: ArcSwap::from_pointee(set),
        }
    }

    /// Replaces the certificates (reload); handshakes under way keep the old ones.
    pub fn replace(&self, set: CertificateSet) {
        self.set.store(Arc::new(set));
    }

    pub fn current(&self) -> Arc<CertificateSet> {
        self.set.load_full()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.set.load().choose(client_hello.server_name()))
    }
}

/// The TLS side of the server: one rustls config for every TLS listener, whose handshakes
/// `tls_stream::accept` runs.
#[derive(Clone)]
pub struct Tls {
    pub config: Arc<ServerConfig>,
    pub resolver: Arc<SniResolver>,
}

impl Tls {
    /// Loads the configured certificates (making the development certificate first where the
    /// config allows it and the files are missing) and builds the rustls server config:
    /// TLS 1.2 and 1.3, session tickets on.
    ///
    /// # Errors
    /// A file that cannot be read or parsed (naming its path), or a key that does not match.
    pub fn from_config(config: &TlsConfig) -> Result<Tls, TlsError> {
        let provider = crate::tls_provider::shared_provider();
        for cert in &config.certificates {
            if config.self_signed_if_missing && !cert.cert.exists() && !cert.key.exists() {
                write_dev_certificate(cert)?;
                tracing::warn!(
                    cert = %cert.cert.display(),
                    key = %cert.key.display(),
                    "made a self-signed DEVELOPMENT certificate because the configured files were missing; \
                     clients will not trust it — configure a real certificate for production"
                );
            }
        }
        let resolver = Arc::new(SniResolver::new(load_certificates(config, &provider)?));
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        server.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
        // One ticket per handshake is all a client needs to resume next time; rustls' default
        // of two costs an extra ticket encryption and record on every login.
        server.send_tls13_tickets = 1;
        // TLS 1.3 lets the server send data right after its Finished (RFC 8446 2, "0.5-RTT"):
        // an implicit-TLS IMAP listener's greeting goes in the server's first flight, so the
        // client has it one round trip sooner and answers the Finished and its LOGIN at once
        // (`tls_stream::accept`). There is no client certificate to wait for, and the
        // greeting is what any client gets anyway. A listener with nothing to send first
        // (after STARTTLS, SMTP) sends nothing early.
        server.send_half_rtt_data = true;
        Ok(Tls {
            config: Arc::new(server),
            resolver,
        })
    }
}

/// Reads every configured certificate (at start, and again at a reload: renewed files are
/// picked up; a missing one is an error then, no development certificate is made).
///
/// # Errors
/// As [`load_certificate`], or no certificate at all.
pub fn load_certificates(
    config: &TlsConfig,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<CertificateSet, TlsError> {
    let loaded = config
        .certificates
        .iter()
        .map(|cert| load_certificate(cert, provider))
        .collect::<Result<Vec<_>, _>>()?;
    CertificateSet::new(loaded)
}

/// Reads one certificate chain and key from PEM files.
///
/// # Errors
/// Missing or unparsable files, or a key that does not belong to the certificate.
pub fn load_certificate(
    cfg: &CertificateConfig,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<LoadedCertificate, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert)
        .map_err(|e| file_error(&cfg.cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(&cfg.cert, e))?;
    let Some(end_entity) = chain.first() else {
        return Err(file_error(&cfg.cert, "no certificate in the file"));
    };
    let (names, not_after) = names_and_expiry(end_entity).map_err(|e| file_error(&cfg.cert, e))?;
    let key = PrivateKeyDer::from_pem_file(&cfg.key).map_err(|e| file_error(&cfg.key, e))?;
    let certified = CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        file_error(
            &cfg.key,
            format!("does not match {}: {e}", cfg.cert.display()),
        )
    })?;
    Ok(LoadedCertificate {
        key: Arc::new(certified),
        names,
        label: cfg.cert.display().to_string(),
        not_after,
    })
}

fn names_and_expiry(der: &CertificateDer<'_>) -> Result<(Vec<String>, i64), String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                names.push(dns.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        for cn in cert.subject().iter_common_name() {
            if let Ok(cn) = cn.as_str() {
                names.push(cn.to_ascii_lowercase());
            }
        }
    }
    Ok((names, cert.validity().not_after.timestamp()))
}

/// Writes a self-signed certificate for `DEV_CERT_NAMES` to the configured paths.
fn write_dev_certificate(cfg: &CertificateConfig) -> Result<(), TlsError> {
    let mut params = rcgen::CertificateParams::new(DEV_CERT_NAMES.map(String::from).to_vec())
        .map_err(|e| file_error(&cfg.cert, e))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    // A year from now, so the expiry metric shows something real.
    let year_secs = (now + Duration::from_secs(365 * 86_400)).as_secs();
    let days = i64::try_from(year_secs / 86_400).unwrap_or(i64::MAX);
    let (y, m, d) = civil_from_days(days);
    params.not_after = rcgen::date_time_ymd(y, m, d);
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        "mailgate development certificate",
    );
    let key = rcgen::KeyPair::generate().map_err(|e| file_error(&cfg.key, e))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| file_error(&cfg.cert, e))?;
    for path in [&cfg.cert, &cfg.key] {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| file_error(dir, e))?;
        }
    }
    write_private(&cfg.key, key.serialize_pem().as_bytes())?;
    std::fs::write(&cfg.cert, cert.pem()).map_err(|e| file_error(&cfg.cert, e))?;
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| file_error(path, e))?;
    file.write_all(bytes).map_err(|e| file_error(path, e))
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        i32::try_from(y).unwrap_or(9999),
        u8::try_from(m).unwrap_or(12),
        u8::try_from(d).unwrap_or(28),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_510), (2026, 2, 26));
    }

    #[test]
    fn dev_certificate_is_made_and_chosen_by_sni() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dev = CertificateConfig {
            cert: dir.path().join("dev/tls/a.crt"),
            key: dir.path().join("dev/tls/a.key"),
        };
        let other = CertificateConfig {
            cert: dir.path().join("b.crt"),
            key: dir.path().join("b.key"),
        };
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["*.example.com".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        std::fs::write(&other.cert, cert.pem()).expect("write");
        std::fs::write(&other.key, key.serialize_pem()).expect("write");

        let config = TlsConfig {
            certificates: vec![dev.clone(), other],
            self_signed_if_missing: true,
        };
        let tls = Tls::from_config(&config).expect("tls");
        assert!(dev.cert.exists() && dev.key.exists());
        let set = tls.resolver.current();
        assert_eq!(set.certificates[0].names, DEV_CERT_NAMES[..4].to_vec());
        let dev_key = set.certificates[0].key.clone();
        let wild_key = set.certificates[1].key.clone();
        assert!(Arc::ptr_eq(
            &set.choose(Some("imappro.skydesk.jp")),
            &dev_key
        ));
        assert!(Arc::ptr_eq(
            &set.choose(Some("MAIL.Example.com")),
            &wild_key
        ));
        assert!(Arc::ptr_eq(&set.choose(Some("unknown.test")), &dev_key));
        assert!(Arc::ptr_eq(&set.choose(None), &dev_key));
        assert!(set.certificates[0].not_after > 1_700_000_000);
    }

    #[test]
    fn missing_files_name_the_path_without_self_signing() {
        let config = TlsConfig {
            certificates: vec![CertificateConfig {
                cert: "/nonexistent/x.crt".into(),
                key: "/nonexistent/x.key".into(),
            }],
            self_signed_if_missing: false,
        };
        let err = Tls::from_config(&config).err().expect("must fail");
        assert!(err.to_string().contains("/nonexistent/x.crt"), "{err}");
    }
}
