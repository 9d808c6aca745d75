//! Certificates: root CA, per-cluster CA copy, registry server certificates (SPEC §5).
//!
//! Issued with `rcgen`, inspected with `x509-parser`. Private keys are PEM strings wrapped in
//! [`PrivateKeyPem`], whose `Debug` never shows the key.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SerialNumber,
};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};
use x509_parser::extensions::GeneralName;

use crate::cli::KeyAlgorithm;
use crate::names;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating a {0} key: {1}")]
    Generate(&'static str, String),
    #[error("signing a certificate: {0}")]
    Sign(#[from] rcgen::Error),
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("private key: {0}")]
    Key(String),
    #[error("the private key does not belong to the certificate")]
    KeyMismatch,
    #[error("the certificate is not a CA (basicConstraints CA:TRUE missing)")]
    NotCa,
}

/// A PEM private key. Its `Debug` output is redacted so it cannot leak through logs.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKeyPem(String);

impl PrivateKeyPem {
    pub fn new(pem: impl Into<String>) -> Self {
        PrivateKeyPem(pem.into())
    }
    /// The PEM text, for writing into a Secret.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PrivateKeyPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKeyPem(<redacted>)")
    }
}

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertifiedKey {
    pub cert_pem: String,
    pub key_pem: PrivateKeyPem,
}

/// The names a registry server certificate must carry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubjectNames {
    pub dns: BTreeSet<String>,
    pub ips: BTreeSet<IpAddr>,
}

/// SANs of the registry's server certificate (SPEC §5): the Service and the headless Service
/// with their `.registry-system[.svc[.cluster.local]]` forms, every replica's pod name and
/// its name under the headless Service, the fixed Service IP and 127.0.0.1 (the sync sidecar).
pub fn registry_subject_names(replicas: u8, service_ip: IpAddr) -> SubjectNames {
    let ns = names::REGISTRY_NAMESPACE;
    let headless = names::REGISTRY_HEADLESS_SERVICE;
    let mut dns = BTreeSet::new();
    let mut with_suffixes = |base: String| {
        for suffix in ["", ".svc", ".svc.cluster.local"] {
            dns.insert(format!("{base}.{ns}{suffix}"));
        }
    };
    with_suffixes(names::REGISTRY_NAME.to_string());
    with_suffixes(headless.to_string());
    for i in 0..replicas {
        with_suffixes(format!("{}-{i}.{headless}", names::REGISTRY_NAME));
    }
    dns.insert(names::REGISTRY_NAME.to_string());
    for i in 0..replicas {
        dns.insert(format!("{}-{i}", names::REGISTRY_NAME));
    }
    let ips = BTreeSet::from([service_ip, IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    SubjectNames { dns, ips }
}

/// A CA that signs registry server certificates: the root CA of the extension.
pub struct CertificateAuthority {
    cert_pem: String,
    cert_der: Vec<u8>,
    key_pem: PrivateKeyPem,
    /// Earlier root CAs still trusted while clusters rotate away from them: the other
    /// certificates of the root CA Secret's `ca.crt`, as DER.
    previous: Vec<Vec<u8>>,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &self.key_pem)
            .finish()
    }
}

impl CertificateAuthority {
    /// A new self-signed CA valid for `names::ROOT_CA_DAYS` from `now` (backdated like the
    /// server certificates, so clocks a little behind still accept it).
    pub fn generate(algorithm: KeyAlgorithm, now: OffsetDateTime) -> Result<Self, CertError> {
        let key = generate_key(algorithm)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "registry-addon root CA");
        dn.push(DnType::OrganizationName, "registry-addon");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - Duration::minutes(names::CERT_BACKDATE_MINUTES);
        params.not_after = now + Duration::days(names::ROOT_CA_DAYS);
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key)?;
        Ok(CertificateAuthority {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            key_pem: PrivateKeyPem::new(key.serialize_pem()),
            previous: Vec::new(),
        })
    }

    /// A CA from PEM: the first certificate of `cert_pem` (a chain may follow) and its key
    /// (PKCS#8, PKCS#1 RSA or SEC1 EC, as cert-manager or openssl write them).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let blocks = pem_certificates(cert_pem)?;
        let cert_der = blocks
            .into_iter()
            .next()
            .ok_or_else(|| CertError::Certificate("no PEM CERTIFICATE block".into()))?;
        let (_, x509) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| CertError::Certificate(e.to_string()))?;
        if !x509.is_ca() {
            return Err(CertError::NotCa);
        }
        let key = load_key(key_pem)?;
        if key.subject_public_key_info() != x509.tbs_certificate.subject_pki.raw {
            return Err(CertError::KeyMismatch);
        }
        Ok(CertificateAuthority {
            cert_pem: pem_encode(&cert_der),
            cert_der,
            key_pem: PrivateKeyPem::new(key.serialize_pem()),
            previous: Vec::new(),
        })
    }

    /// The CA certificate, one PEM block: what nodes and `ca.crt` keys hold.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Takes the certificates of `bundle` other than this CA's as earlier root CAs: the
    /// root CA Secret's `ca.crt` lists the previous CA during a rotation. A bundle that
    /// cannot be read adds none.
    pub fn with_previous(mut self, bundle: &str) -> Self {
        self.previous = pem_certificates(bundle)
            .unwrap_or_default()
            .into_iter()
            .filter(|der| *der != self.cert_der)
            .collect();
        self
    }

    /// Whether every certificate of `bundle_pem` is this CA or an earlier root CA, and there
    /// is at least one.
    pub fn trusts_bundle(&self, bundle_pem: &str) -> bool {
        pem_certificates(bundle_pem).is_ok_and(|blocks| {
            blocks
                .iter()
                .all(|der| *der == self.cert_der || self.previous.contains(der))
        })
    }

    /// Whether `bundle_pem` holds an earlier root CA: the cluster is rotating away from it.
    pub fn bundle_has_previous(&self, bundle_pem: &str) -> bool {
        pem_certificates(bundle_pem)
            .is_ok_and(|blocks| blocks.iter().any(|der| self.previous.contains(der)))
    }

    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    pub fn key_pem(&self) -> &PrivateKeyPem {
        &self.key_pem
    }

    /// Whether a PEM bundle (e.g. a `ca.crt` value) contains this CA's certificate.
    pub fn is_in_bundle(&self, bundle_pem: &str) -> bool {
        pem_certificates(bundle_pem).is_ok_and(|blocks| blocks.contains(&self.cert_der))
    }

    /// Issues a registry server certificate for `subject` (SPEC §5): 730 days, backdated
    /// 5 minutes, ExtendedKeyUsage ServerAuth, with a fresh key of `algorithm`.
    pub fn issue_server(
        &self,
        subject: &SubjectNames,
        algorithm: KeyAlgorithm,
        now: OffsetDateTime,
    ) -> Result<CertifiedKey, CertError> {
        let issuer_key = load_key(self.key_pem.expose())?;
        let issuer = Issuer::from_ca_cert_der(&self.cert_der.as_slice().into(), issuer_key)?;
        let key = generate_key(algorithm)?;
        let sans: Vec<String> = subject
            .dns
            .iter()
            .cloned()
            .chain(subject.ips.iter().map(IpAddr::to_string))
            .collect();
        let mut params = CertificateParams::new(sans)?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("{}.{}.svc", names::REGISTRY_NAME, names::REGISTRY_NAMESPACE),
        );
        params.distinguished_name = dn;
        params.key_usages = match algorithm {
            KeyAlgorithm::EcdsaP256 => vec![KeyUsagePurpose::DigitalSignature],
            KeyAlgorithm::Rsa2048 => vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ],
        };
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - Duration::minutes(names::CERT_BACKDATE_MINUTES);
        params.not_after = now + Duration::days(names::SERVER_CERT_DAYS);
        params.serial_number = Some(random_serial()?);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: PrivateKeyPem::new(key.serialize_pem()),
        })
    }
}

/// What the addon reads from a certificate.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub der: Vec<u8>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub names: SubjectNames,
}

impl CertInfo {
    /// Parses the first certificate of a PEM text.
    pub fn from_pem(cert_pem: &str) -> Result<Self, CertError> {
        let der = pem_certificates(cert_pem)?
            .into_iter()
            .next()
            .ok_or_else(|| CertError::Certificate("no PEM CERTIFICATE block".into()))?;
        let (_, x509) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| CertError::Certificate(e.to_string()))?;
        let validity = x509.validity();
        let mut names = SubjectNames::default();
        let san = x509
            .subject_alternative_name()
            .map_err(|e| CertError::Certificate(format!("subjectAltName: {e}")))?;
        for name in san.iter().flat_map(|ext| ext.value.general_names.iter()) {
            match name {
                GeneralName::DNSName(dns) => {
                    names.dns.insert((*dns).to_string());
                }
                GeneralName::IPAddress(bytes) => {
                    if let Some(ip) = ip_from_bytes(bytes) {
                        names.ips.insert(ip);
                    }
                }
                _ => {}
            }
        }
        let (not_before, not_after) = (
            validity.not_before.to_datetime(),
            validity.not_after.to_datetime(),
        );
        Ok(CertInfo {
            der,
            not_before,
            not_after,
            names,
        })
    }

    /// Total validity period.
    pub fn lifetime(&self) -> Duration {
        self.not_after - self.not_before
    }

    /// Validity left at `now` (negative once expired).
    pub fn remaining(&self, now: OffsetDateTime) -> Duration {
        self.not_after - now
    }

    /// Whether `now` lies inside the validity period.
    pub fn is_valid_at(&self, now: OffsetDateTime) -> bool {
        self.not_before <= now && now < self.not_after
    }

    /// Whether less than `fraction` of the lifetime remains at `now`.
    pub fn in_renewal_window(&self, now: OffsetDateTime, fraction: f64) -> bool {
        self.remaining(now) < self.lifetime() * fraction
    }

    /// Whether `ca` signed this certificate: the issuer names the CA's subject and the
    /// signature verifies with the CA's public key.
    pub fn is_signed_by(&self, ca: &CertificateAuthority) -> bool {
        self.is_signed_by_der(ca.cert_der())
    }

    /// Whether this certificate is signed by the first certificate of `ca_pem`.
    pub fn is_signed_by_pem(&self, ca_pem: &str) -> bool {
        pem_certificates(ca_pem)
            .ok()
            .and_then(|blocks| blocks.into_iter().next())
            .is_some_and(|der| self.is_signed_by_der(&der))
    }

    fn is_signed_by_der(&self, ca_der: &[u8]) -> bool {
        let (Ok((_, cert)), Ok((_, ca_cert))) = (
            x509_parser::parse_x509_certificate(&self.der),
            x509_parser::parse_x509_certificate(ca_der),
        ) else {
            return false;
        };
        cert.issuer() == ca_cert.subject()
            && cert.verify_signature(Some(ca_cert.public_key())).is_ok()
    }

    /// Whether `key_pem` is the private key of this certificate.
    pub fn key_matches(&self, key_pem: &str) -> bool {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(&self.der) else {
            return false;
        };
        load_key(key_pem).is_ok_and(|key| key.subject_public_key_info() == cert.public_key().raw)
    }

    /// SHA-256 of the DER certificate, hex: changes whenever the certificate does.
    pub fn sha256_hex(&self) -> String {
        hex::encode(Sha256::digest(&self.der))
    }
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

/// At least one PEM certificate, each one parsing as X.509: a `ca.crt` worth trusting. The
/// problem is worded to follow the key's name ("key ca.crt holds no PEM certificate").
pub fn check_pem_certificates(pem: &str) -> Result<(), String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("is not a PEM certificate bundle: {e}"))?;
        x509_parser::parse_x509_certificate(&cert)
            .map_err(|e| format!("holds a certificate that does not parse: {e}"))?;
        count += 1;
    }
    if count == 0 {
        return Err("holds no PEM certificate".into());
    }
    Ok(())
}

/// Every CERTIFICATE block of a PEM text, as DER.
pub fn pem_certificates(pem_text: &str) -> Result<Vec<Vec<u8>>, CertError> {
    let mut out = Vec::new();
    for pem in x509_parser::pem::Pem::iter_from_buffer(pem_text.as_bytes()) {
        let pem = pem.map_err(|e| CertError::Certificate(format!("invalid PEM: {e}")))?;
        if pem.label == "CERTIFICATE" {
            out.push(pem.contents);
        }
    }
    if out.is_empty() {
        return Err(CertError::Certificate("no PEM CERTIFICATE block".into()));
    }
    Ok(out)
}

fn pem_encode(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn generate_key(algorithm: KeyAlgorithm) -> Result<KeyPair, CertError> {
    match algorithm {
        KeyAlgorithm::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CertError::Generate("ECDSA P-256", e.to_string())),
        KeyAlgorithm::Rsa2048 => {
            // ring cannot generate RSA keys: generate with `rsa` and hand rcgen the PKCS#8.
            use rsa::pkcs8::EncodePrivateKey;
            let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)
                .map_err(|e| CertError::Generate("RSA 2048", e.to_string()))?;
            let der = key
                .to_pkcs8_der()
                .map_err(|e| CertError::Generate("RSA 2048", e.to_string()))?;
            KeyPair::from_pkcs8_der_and_sign_algo(
                &der.as_bytes().to_vec().into(),
                &rcgen::PKCS_RSA_SHA256,
            )
            .map_err(|e| CertError::Generate("RSA 2048", e.to_string()))
        }
    }
}

/// Loads a PEM private key: PKCS#8 (`PRIVATE KEY`), PKCS#1 (`RSA PRIVATE KEY`) or SEC1
/// P-256 (`EC PRIVATE KEY`). Errors never include key material.
fn load_key(key_pem: &str) -> Result<KeyPair, CertError> {
    let pem = x509_parser::pem::Pem::iter_from_buffer(key_pem.as_bytes())
        .filter_map(Result::ok)
        .find(|p| p.label.ends_with("PRIVATE KEY"))
        .ok_or_else(|| CertError::Key("no PEM PRIVATE KEY block".into()))?;
    let pkcs8 = match pem.label.as_str() {
        "PRIVATE KEY" => pem.contents,
        "RSA PRIVATE KEY" => {
            use rsa::pkcs1::DecodeRsaPrivateKey;
            use rsa::pkcs8::EncodePrivateKey;
            let key = rsa::RsaPrivateKey::from_pkcs1_der(&pem.contents)
                .map_err(|_| CertError::Key("invalid PKCS#1 RSA key".into()))?;
            key.to_pkcs8_der()
                .map_err(|_| CertError::Key("invalid PKCS#1 RSA key".into()))?
                .as_bytes()
                .to_vec()
        }
        "EC PRIVATE KEY" => sec1_p256_to_pkcs8(&pem.contents),
        other => return Err(CertError::Key(format!("unsupported PEM block {other:?}"))),
    };
    KeyPair::try_from(pkcs8.as_slice())
        .map_err(|_| CertError::Key("unsupported or invalid private key".into()))
}

/// Wraps a SEC1 `ECPrivateKey` in PKCS#8 `PrivateKeyInfo` with the P-256 algorithm
/// identifier (ring reads only PKCS#8).
fn sec1_p256_to_pkcs8(sec1: &[u8]) -> Vec<u8> {
    // AlgorithmIdentifier { id-ecPublicKey, prime256v1 }
    const ALGORITHM: [u8; 21] = [
        0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86,
        0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
    ];
    let mut body = vec![0x02, 0x01, 0x00];
    body.extend_from_slice(&ALGORITHM);
    body.push(0x04);
    der_length(&mut body, sec1.len());
    body.extend_from_slice(sec1);
    let mut out = vec![0x30];
    der_length(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

fn der_length(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else if len < 0x100 {
        out.extend_from_slice(&[0x81, len as u8]);
    } else {
        out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]);
    }
}

fn random_serial() -> Result<SerialNumber, CertError> {
    use rsa::rand_core::RngCore;
    let mut bytes = [0u8; 16];
    rsa::rand_core::OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| CertError::Generate("serial number", e.to_string()))?;
    // Positive and non-zero in the leading byte, as RFC 5280 asks.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    #[test]
    fn subject_names_cover_every_replica() {
        let names = registry_subject_names(3, "10.96.0.20".parse().unwrap());
        for dns in [
            "registry",
            "registry.registry-system",
            "registry.registry-system.svc",
            "registry.registry-system.svc.cluster.local",
            "registry-headless.registry-system.svc",
            "registry-0",
            "registry-2",
            "registry-2.registry-headless.registry-system",
            "registry-2.registry-headless.registry-system.svc.cluster.local",
        ] {
            assert!(names.dns.contains(dns), "{dns}");
        }
        assert!(!names.dns.contains("registry-3"));
        assert_eq!(names.ips.len(), 2);
    }

    #[test]
    fn issues_and_inspects_for_both_algorithms() {
        for alg in [KeyAlgorithm::EcdsaP256, KeyAlgorithm::Rsa2048] {
            let ca = CertificateAuthority::generate(alg, now()).unwrap();
            let subject = registry_subject_names(2, "fd00::14".parse().unwrap());
            let server = ca.issue_server(&subject, alg, now()).unwrap();
            let info = CertInfo::from_pem(&server.cert_pem).unwrap();
            assert_eq!(info.names, subject);
            assert_eq!(info.lifetime(), Duration::days(730) + Duration::minutes(5));
            assert!(info.is_signed_by(&ca));
            assert!(info.key_matches(server.key_pem.expose()));
            assert!(!info.in_renewal_window(now(), 1.0 / 3.0));

            let other = CertificateAuthority::generate(alg, now()).unwrap();
            assert!(!info.is_signed_by(&other));
            assert!(!info.key_matches(other.key_pem().expose()));

            let reloaded =
                CertificateAuthority::from_pem(ca.cert_pem(), ca.key_pem().expose()).unwrap();
            assert_eq!(reloaded.cert_der(), ca.cert_der());
            assert!(ca.is_in_bundle(&format!("{}{}", other.cert_pem(), ca.cert_pem())));
            assert!(!other.is_in_bundle(ca.cert_pem()));
        }
    }

    #[test]
    fn renewal_window() {
        let ca = CertificateAuthority::generate(KeyAlgorithm::EcdsaP256, now()).unwrap();
        let subject = registry_subject_names(1, "10.96.0.20".parse().unwrap());
        let issued_at = now() - Duration::days(630);
        let server = ca
            .issue_server(&subject, KeyAlgorithm::EcdsaP256, issued_at)
            .unwrap();
        let info = CertInfo::from_pem(&server.cert_pem).unwrap();
        assert!(info.in_renewal_window(now(), 1.0 / 3.0));
        assert!(!info.in_renewal_window(now(), 0.1));
    }

    #[test]
    fn rejects_mismatched_key_and_non_ca() {
        let ca = CertificateAuthority::generate(KeyAlgorithm::EcdsaP256, now()).unwrap();
        let other = CertificateAuthority::generate(KeyAlgorithm::EcdsaP256, now()).unwrap();
        let err = CertificateAuthority::from_pem(ca.cert_pem(), other.key_pem().expose());
        assert!(matches!(err, Err(CertError::KeyMismatch)));
        let server = ca
            .issue_server(
                &registry_subject_names(1, "10.0.0.20".parse().unwrap()),
                KeyAlgorithm::EcdsaP256,
                now(),
            )
            .unwrap();
        let err = CertificateAuthority::from_pem(&server.cert_pem, server.key_pem.expose());
        assert!(matches!(err, Err(CertError::NotCa)));
        let err = CertificateAuthority::from_pem("garbage", "garbage").unwrap_err();
        assert!(!err.to_string().contains("garbage"));
    }

    #[test]
    fn debug_never_shows_keys() {
        let ca = CertificateAuthority::generate(KeyAlgorithm::EcdsaP256, now()).unwrap();
        let text = format!("{ca:?}");
        assert!(!text.contains("PRIVATE KEY"), "{text}");
    }
}
