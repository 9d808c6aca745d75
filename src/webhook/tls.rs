//! The serving certificate: loaded from PEM files and reloaded when they change (cert-manager
//! rewrites them in place), or generated self-signed at start for a developer's machine.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

/// Where [`CertFiles::watch`] counts reloads and failed reloads.
#[derive(Debug, Clone, Default)]
pub struct ReloadCounters {
    pub reloads: Counter,
    pub errors: Counter,
}

/// Hands every new TLS connection the current certificate.
#[derive(Debug)]
pub struct ReloadingResolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadingResolver {
    pub fn new(key: CertifiedKey) -> Self {
        ReloadingResolver {
            current: RwLock::new(Arc::new(key)),
        }
    }

    pub fn replace(&self, key: CertifiedKey) {
        let mut guard = self.current.write().unwrap_or_else(|e| e.into_inner());
        *guard = Arc::new(key);
    }
}

impl ResolvesServerCert for ReloadingResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// TLS 1.2 and 1.3 only, ALPN `h2` then `http/1.1`.
pub fn server_config(resolver: Arc<ReloadingResolver>) -> anyhow::Result<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Builds a signing certificate from PEM: the chain (leaf first) and its private key, checked
/// to belong together. Errors never include key material.
pub fn certified_key_from_pem(cert_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<CertifiedKey> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("certificate PEM: {e}"))?;
    if chain.is_empty() {
        anyhow::bail!("certificate PEM holds no certificate");
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|_| anyhow::anyhow!("private key PEM holds no usable private key"))?;
    let provider: &CryptoProvider = &rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(chain, key, provider)
        .map_err(|e| anyhow::anyhow!("certificate and private key: {e}"))
}

/// The certificate and key files given with `--tls-cert-file` and `--tls-key-file`.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertFiles {
    /// Reads both files; returns their content hash with the parsed key.
    fn load(&self) -> anyhow::Result<([u8; 32], CertifiedKey)> {
        let cert = read(&self.cert)?;
        let key = read(&self.key)?;
        let hash = content_hash(&cert, &key);
        let certified = certified_key_from_pem(&cert, &key).map_err(|e| {
            anyhow::anyhow!("{} and {}: {e}", self.cert.display(), self.key.display())
        })?;
        Ok((hash, certified))
    }

    fn hash(&self) -> anyhow::Result<[u8; 32]> {
        Ok(content_hash(&read(&self.cert)?, &read(&self.key)?))
    }

    /// Loads the files once, for start-up.
    pub fn initial(&self) -> anyhow::Result<([u8; 32], CertifiedKey)> {
        self.load()
    }

    /// Polls the files and swaps the certificate when their content changes. A change that
    /// cannot be loaded (e.g. the key written but not yet the certificate) keeps the old
    /// certificate and is retried on the next poll; it counts as a reload error once it has
    /// stayed broken for two polls.
    pub async fn watch(
        self,
        mut loaded: [u8; 32],
        resolver: Arc<ReloadingResolver>,
        counters: ReloadCounters,
        interval: Duration,
    ) {
        // Content that failed to load, and whether that failure was already reported.
        let mut failed: Option<([u8; 32], bool)> = None;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let hash = match self.hash() {
                Ok(hash) => hash,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the serving certificate files");
                    continue;
                }
            };
            if hash == loaded {
                continue;
            }
            match self.load() {
                Ok((hash, key)) => {
                    resolver.replace(key);
                    loaded = hash;
                    failed = None;
                    counters.reloads.inc();
                    tracing::info!(cert = %self.cert.display(), "serving certificate reloaded");
                }
                Err(e) => match failed {
                    Some((seen, false)) if seen == hash => {
                        counters.errors.inc();
                        tracing::warn!(error = %e, "serving certificate changed but cannot be loaded; keeping the previous one");
                        failed = Some((hash, true));
                    }
                    Some((seen, true)) if seen == hash => {}
                    _ => failed = Some((hash, false)),
                },
            }
        }
    }
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))
}

fn content_hash(cert: &[u8], key: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update((cert.len() as u64).to_be_bytes());
    hasher.update(cert);
    hasher.update(key);
    hasher.finalize().into()
}

/// A throw-away CA and a serving certificate it signed, for `serve` without certificate files.
pub struct SelfSigned {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Generates a CA and a serving certificate for `localhost`, 127.0.0.1, ::1 and `extra_ips`.
pub fn self_signed(extra_names: &[String]) -> anyhow::Result<SelfSigned> {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let now = time::OffsetDateTime::now_utc();

    let mut ca_params = CertificateParams::default();
    let mut ca_name = DistinguishedName::new();
    ca_name.push(DnType::CommonName, "registry-addon self-signed serving CA");
    ca_params.distinguished_name = ca_name;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_before = now - time::Duration::minutes(5);
    ca_params.not_after = now + time::Duration::days(365);
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    names.extend(extra_names.iter().cloned());
    names.dedup();
    let mut params = CertificateParams::new(names)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "registry-addon");
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(365);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(SelfSigned {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_pair_loads() {
        let pair = self_signed(&[]).unwrap();
        certified_key_from_pem(pair.cert_pem.as_bytes(), pair.key_pem.as_bytes()).unwrap();
    }

    #[test]
    fn mismatched_key_is_refused_without_leaking_it() {
        let a = self_signed(&[]).unwrap();
        let b = self_signed(&[]).unwrap();
        let err = certified_key_from_pem(a.cert_pem.as_bytes(), b.key_pem.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(!err.contains("PRIVATE KEY"), "{err}");
        let err = certified_key_from_pem(b"junk", b"junk")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no certificate") || err.contains("certificate PEM"),
            "{err}"
        );
    }
}
