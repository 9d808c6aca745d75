//! The desired node configuration as it travels: the workload Secret
//! `registry-system/registry-node-config`, read and checked in one place.
//!
//! Keys: `hosts.toml` (the `_default` hosts file, Local), `hosts-<n>.toml` (the hosts file of
//! an upstream host, Proxy and Direct: its directory is the host its `server` names), `ca.crt`
//! (the CA bundle, written as `<host>/ca.crt` for every mirror host the hosts files list),
//! `phase` (`transition` or `final`) and `hash` (of the files and the phase, see
//! [`NodeConfig::new`]). No hosts file and no `ca.crt` (Unmanaged): the node keeps no file of
//! the addon, and the agent removes those it wrote.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;

use crate::hooks::patches::containerd::{self, HostsFile, NodeConfig, Phase};
use crate::names;

/// Why a desired-config Secret was refused; names the key at fault.
#[derive(Debug, thiserror::Error)]
#[error("secret {secret}: key {key}: {reason}")]
pub struct DesiredConfigError {
    pub secret: String,
    pub key: String,
    pub reason: String,
}

/// Whether `relative` is a hosts file (`<dir>/hosts.toml`), not a CA file.
fn is_hosts_file(relative: &str) -> bool {
    relative.ends_with("/hosts.toml")
}

/// Key of the `n`th upstream host's hosts file.
fn upstream_hosts_key(n: usize) -> String {
    format!("hosts-{n}.toml")
}

/// The Secret's data for `config`, as the controller writes it.
pub fn secret_data(config: &NodeConfig) -> BTreeMap<String, String> {
    let mut data = BTreeMap::new();
    let mut upstream = 0;
    for (path, content) in &config.files {
        if path == containerd::DEFAULT_HOSTS_FILE {
            data.insert(names::NODE_CONFIG_HOSTS_KEY.to_string(), content.clone());
        } else if is_hosts_file(path) {
            data.insert(upstream_hosts_key(upstream), content.clone());
            upstream += 1;
        }
    }
    // Every host's CA file holds the same bundle.
    if let Some((_, ca)) = config.files.iter().find(|(path, _)| !is_hosts_file(path)) {
        data.insert(names::NODE_CONFIG_CA_KEY.to_string(), ca.clone());
    }
    data.insert(
        names::NODE_CONFIG_PHASE_KEY.to_string(),
        config.phase.as_str().to_string(),
    );
    data.insert(names::NODE_CONFIG_HASH_KEY.to_string(), config.hash.clone());
    data
}

/// The directory of an upstream host's hosts file: the host its `server` names
/// (`https://host[:port]`, nothing after it).
fn server_directory(hosts: &HostsFile) -> Result<String, String> {
    let server = hosts.server.as_deref().ok_or("names no server")?;
    let host = server
        .strip_prefix("https://")
        .filter(|h| !h.is_empty() && !h.contains(['/', '?', '#', '@']))
        .ok_or_else(|| format!("server {server:?} is not https://host[:port]"))?;
    if !super::files::is_plain_name(host) {
        return Err(format!("server {server:?} is not https://host[:port]"));
    }
    Ok(crate::hooks::patches::containerd::hosts_directory(host).to_string())
}

/// Reads and checks the Secret's data for a node whose hosts directory is `certs_dir`: every
/// key present and well formed, each CA path in the hosts files a `<host>/ca.crt` inside
/// `certs_dir`, and the hash that of the content.
pub fn parse(
    secret: &str,
    data: &BTreeMap<String, ByteString>,
    certs_dir: &str,
) -> Result<NodeConfig, DesiredConfigError> {
    let fail = |key: &str, reason: String| DesiredConfigError {
        secret: secret.to_string(),
        key: key.to_string(),
        reason,
    };
    let text = |key: &str| -> Result<String, DesiredConfigError> {
        let value = data.get(key).ok_or_else(|| fail(key, "missing".into()))?;
        String::from_utf8(value.0.clone()).map_err(|_| fail(key, "not UTF-8".into()))
    };
    let phase: Phase = text(names::NODE_CONFIG_PHASE_KEY)?
        .parse()
        .map_err(|e| fail(names::NODE_CONFIG_PHASE_KEY, e))?;

    // (key, directory, text, parsed) of every hosts file.
    let mut hosts_files = Vec::new();
    for key in data.keys() {
        let upstream = key
            .strip_prefix("hosts-")
            .and_then(|k| k.strip_suffix(".toml"))
            .is_some_and(|n| n.parse::<usize>().is_ok());
        if key != names::NODE_CONFIG_HOSTS_KEY && !upstream {
            continue;
        }
        let hosts_text = text(key)?;
        let hosts: HostsFile = toml::from_str(&hosts_text)
            .map_err(|e| fail(key, format!("not a containerd hosts file: {}", e.message())))?;
        if hosts.host.is_empty() {
            return Err(fail(key, "lists no host".into()));
        }
        let directory = if upstream {
            server_directory(&hosts).map_err(|e| fail(key, e))?
        } else {
            "_default".to_string()
        };
        hosts_files.push((key.clone(), directory, hosts_text, hosts));
    }

    let mut files = BTreeMap::new();
    if !hosts_files.is_empty() || data.contains_key(names::NODE_CONFIG_CA_KEY) {
        let ca = text(names::NODE_CONFIG_CA_KEY)?;
        crate::certs::check_pem_certificates(&ca)
            .map_err(|e| fail(names::NODE_CONFIG_CA_KEY, e))?;
        if hosts_files.is_empty() {
            return Err(fail(
                names::NODE_CONFIG_HOSTS_KEY,
                "missing while ca.crt is set".into(),
            ));
        }
        let prefix = format!("{}/", certs_dir.trim_end_matches('/'));
        for (key, directory, hosts_text, hosts) in hosts_files {
            let path = format!("{directory}/hosts.toml");
            if files.insert(path, hosts_text).is_some() {
                return Err(fail(&key, format!("a second hosts file for {directory}")));
            }
            for (url, entry) in &hosts.host {
                let ca_path = entry
                    .ca
                    .as_deref()
                    .ok_or_else(|| fail(&key, format!("host {url} names no ca file")))?;
                let relative = ca_path
                    .strip_prefix(&prefix)
                    .filter(|rel| is_ca_file(rel))
                    .ok_or_else(|| {
                        fail(
                            &key,
                            format!(
                                "host {url}: ca {ca_path:?} is not <host>/ca.crt inside {certs_dir}"
                            ),
                        )
                    })?;
                files.insert(relative.to_string(), ca.clone());
            }
        }
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
        let side = MirrorSide::local(
            "10.96.0.20".into(),
            ca(),
            Credentials {
                username: "ro".into(),
                password: "pw".into(),
            },
        );
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
    fn round_trips_every_mode() {
        use crate::hooks::patches::containerd::Route;
        let certs = "/etc/containerd/certs.d";
        let local = config(certs);
        let side = |route| MirrorSide {
            host: "10.96.0.20".into(),
            ca_pem: local.files["10.96.0.20/ca.crt"].clone(),
            ro: Credentials {
                username: "ro".into(),
                password: "pw".into(),
            },
            route,
        };
        let proxy = side(Some(Route::Host("r.example:5443".into())));
        let other = side(Some(Route::Host("s.example".into())));
        let none = side(None);
        let local_side = side(Some(Route::Default));
        // Docker Hub: its API host serves what containerd looks up under docker.io.
        let hub = side(Some(Route::Host("registry-1.docker.io".into())));
        assert!(
            node_config(certs, &Rollout::Final(&hub))
                .files
                .contains_key("docker.io/hosts.toml")
        );
        for config in [
            node_config(certs, &Rollout::Final(&hub)),
            node_config(certs, &Rollout::Final(&proxy)),
            node_config(certs, &Rollout::Final(&none)),
            node_config(
                certs,
                &Rollout::Transition {
                    old: &local_side,
                    new: &proxy,
                },
            ),
            node_config(
                certs,
                &Rollout::Transition {
                    old: &other,
                    new: &proxy,
                },
            ),
            node_config(
                certs,
                &Rollout::Transition {
                    old: &proxy,
                    new: &none,
                },
            ),
        ] {
            let data = bytes(secret_data(&config));
            assert_eq!(parse("s", &data, certs).unwrap(), config, "{data:?}");
        }
        let empty = secret_data(&node_config(certs, &Rollout::Final(&none)));
        assert_eq!(empty.keys().collect::<Vec<_>>(), ["hash", "phase"]);
        // A hosts file naming no server, or one outside the hosts directory, is refused.
        let mut data = secret_data(&node_config(certs, &Rollout::Final(&proxy)));
        let text = data["hosts-0.toml"].replace(
            "server = \"https://r.example:5443\"",
            "server = \"https://../x\"",
        );
        data.insert("hosts-0.toml".into(), text);
        let err = parse("s", &bytes(data), certs).unwrap_err();
        assert_eq!(err.key, "hosts-0.toml", "{err}");
        let mut data = secret_data(&node_config(certs, &Rollout::Final(&proxy)));
        data.remove("hosts-0.toml");
        assert_eq!(
            parse("s", &bytes(data), certs).unwrap_err().key,
            "hosts.toml"
        );
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
