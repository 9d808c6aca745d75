//! The desired node configuration as it travels: the workload Secret
//! `registry-system/registry-node-config`, read and checked in one place.
//!
//! Keys: `hosts.toml` (the `_default` hosts file), `ca.crt` (the CA bundle, written as
//! `<host>/ca.crt` for every mirror host `hosts.toml` lists), `phase` (`transition` or
//! `final`) and `hash` (of the files and the phase, see [`NodeConfig::new`]).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;

use crate::hooks::patches::containerd::{self, HostsFile, NodeConfig, Phase};
use crate::names;

/// Why a desired-config Secret was refused; names the key at fault.
#[derive(Debug, thiserror::Error)]
#[error("secret {secret}: key {key}: {reason}")]
pub struct DesiredConfigError {
    pub secret: String,
    pub key: &'static str,
    pub reason: String,
}

/// The Secret's data for `config`, as the controller writes it.
pub fn secret_data(config: &NodeConfig) -> BTreeMap<String, String> {
    let mut data = BTreeMap::new();
    if let Some(hosts) = config.files.get(containerd::DEFAULT_HOSTS_FILE) {
        data.insert(names::NODE_CONFIG_HOSTS_KEY.to_string(), hosts.clone());
    }
    // Every host's CA file holds the same bundle.
    if let Some((_, ca)) = config
        .files
        .iter()
        .find(|(path, _)| path.as_str() != containerd::DEFAULT_HOSTS_FILE)
    {
        data.insert(names::NODE_CONFIG_CA_KEY.to_string(), ca.clone());
    }
    data.insert(
        names::NODE_CONFIG_PHASE_KEY.to_string(),
        config.phase.as_str().to_string(),
    );
    data.insert(names::NODE_CONFIG_HASH_KEY.to_string(), config.hash.clone());
    data
}

/// Reads and checks the Secret's data for a node whose hosts directory is `certs_dir`: every
/// key present and well formed, each CA path in `hosts.toml` a `<host>/ca.crt` inside
/// `certs_dir`, and the hash that of the content.
pub fn parse(
    secret: &str,
    data: &BTreeMap<String, ByteString>,
    certs_dir: &str,
) -> Result<NodeConfig, DesiredConfigError> {
    let fail = |key: &'static str, reason: String| DesiredConfigError {
        secret: secret.to_string(),
        key,
        reason,
    };
    let text = |key: &'static str| -> Result<String, DesiredConfigError> {
        let value = data.get(key).ok_or_else(|| fail(key, "missing".into()))?;
        String::from_utf8(value.0.clone()).map_err(|_| fail(key, "not UTF-8".into()))
    };
    let phase: Phase = text(names::NODE_CONFIG_PHASE_KEY)?
        .parse()
        .map_err(|e| fail(names::NODE_CONFIG_PHASE_KEY, e))?;
    let hosts_text = text(names::NODE_CONFIG_HOSTS_KEY)?;
    let hosts: HostsFile = toml::from_str(&hosts_text).map_err(|e| {
        fail(
            names::NODE_CONFIG_HOSTS_KEY,
            format!("not a containerd hosts file: {}", e.message()),
        )
    })?;
    if hosts.host.is_empty() {
        return Err(fail(names::NODE_CONFIG_HOSTS_KEY, "lists no host".into()));
    }
    let ca = text(names::NODE_CONFIG_CA_KEY)?;
    check_ca_bundle(&ca).map_err(|e| fail(names::NODE_CONFIG_CA_KEY, e))?;

    let prefix = format!("{}/", certs_dir.trim_end_matches('/'));
    let mut files = BTreeMap::from([(containerd::DEFAULT_HOSTS_FILE.to_string(), hosts_text)]);
    for (url, entry) in &hosts.host {
        let ca_path = entry.ca.as_deref().ok_or_else(|| {
            fail(
                names::NODE_CONFIG_HOSTS_KEY,
                format!("host {url} names no ca file"),
            )
        })?;
        let relative = ca_path
            .strip_prefix(&prefix)
            .filter(|rel| is_ca_file(rel))
            .ok_or_else(|| {
                fail(
                    names::NODE_CONFIG_HOSTS_KEY,
                    format!("host {url}: ca {ca_path:?} is not <host>/ca.crt inside {certs_dir}"),
                )
            })?;
        files.insert(relative.to_string(), ca.clone());
    }
    let config = NodeConfig::new(phase, files);
    let hash = text(names::NODE_CONFIG_HASH_KEY)?;
    if hash.trim() != config.hash {
        return Err(fail(
            names::NODE_CONFIG_HASH_KEY,
            format!(
                "{:?} is not the hash of the content ({})",
                hash.trim(),
                config.hash
            ),
        ));
    }
    Ok(config)
}

/// `<dir>/ca.crt` with one plain directory name.
fn is_ca_file(relative: &str) -> bool {
    match relative.split_once('/') {
        Some((dir, "ca.crt")) => super::files::is_plain_name(dir),
        _ => false,
    }
}

fn check_ca_bundle(pem: &str) -> Result<(), String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        cert.map_err(|e| format!("not a PEM certificate bundle: {e}"))?;
        count += 1;
    }
    if count == 0 {
        return Err("holds no certificate".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addon::users::Credentials;
    use crate::hooks::patches::containerd::{MirrorSide, Rollout, node_config};

    fn ca() -> String {
        crate::certs::CertificateAuthority::generate(
            crate::cli::KeyAlgorithm::EcdsaP256,
            time::OffsetDateTime::now_utc(),
        )
        .unwrap()
        .cert_pem()
        .to_string()
    }

    fn bytes(data: BTreeMap<String, String>) -> BTreeMap<String, ByteString> {
        data.into_iter()
            .map(|(k, v)| (k, ByteString(v.into_bytes())))
            .collect()
    }

    fn config(certs_dir: &str) -> NodeConfig {
        let side = MirrorSide {
            host: "10.96.0.20".into(),
            ca_pem: ca(),
            ro: Credentials {
                username: "ro".into(),
                password: "pw".into(),
            },
        };
        node_config(certs_dir, &Rollout::Final(&side))
    }

    #[test]
    fn round_trips() {
        let config = config("/etc/containerd/certs.d");
        let data = bytes(secret_data(&config));
        let parsed = parse("s", &data, "/etc/containerd/certs.d").unwrap();
        assert_eq!(parsed, config);
    }

    #[test]
    fn refusals_name_the_key() {
        let good = secret_data(&config("/etc/containerd/certs.d"));
        type Change = Box<dyn Fn(&mut BTreeMap<String, String>)>;
        let cases: Vec<(&str, Change)> = vec![
            (
                "hash",
                Box::new(|d| {
                    d.insert("hash".into(), "sha256:00".into());
                }),
            ),
            (
                "phase",
                Box::new(|d| {
                    d.insert("phase".into(), "third".into());
                }),
            ),
            (
                "ca.crt",
                Box::new(|d| {
                    d.insert("ca.crt".into(), "not pem".into());
                }),
            ),
            (
                "hosts.toml",
                Box::new(|d| {
                    d.insert("hosts.toml".into(), "[host".into());
                }),
            ),
            (
                "hosts.toml",
                Box::new(|d| {
                    let h = d["hosts.toml"].replace("/etc/containerd/certs.d/", "/etc/");
                    d.insert("hosts.toml".into(), h);
                }),
            ),
            (
                "hosts.toml",
                Box::new(|d| {
                    let h = d["hosts.toml"].replace("10.96.0.20/ca.crt", "../x/ca.crt");
                    d.insert("hosts.toml".into(), h);
                }),
            ),
            (
                "ca.crt",
                Box::new(|d| {
                    d.remove("ca.crt");
                }),
            ),
        ];
        for (key, change) in cases {
            let mut data = good.clone();
            change(&mut data);
            let err = parse(
                "registry-system/registry-node-config",
                &bytes(data),
                "/etc/containerd/certs.d",
            )
            .unwrap_err();
            assert_eq!(err.key, key, "{err}");
            assert!(!err.to_string().contains("pw"), "{err}");
        }
        // Another hosts directory than the one it was rendered for.
        let err = parse("s", &bytes(good), "/tmp/certs.d").unwrap_err();
        assert_eq!(err.key, "hosts.toml");
    }
}
