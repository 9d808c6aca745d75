//! Where the syncer's peers and credentials come from: explicit flags, the StatefulSet the
//! sidecar runs in, a credentials file, or the environment.

use std::collections::HashMap;
use std::path::Path;

use base64::Engine;

use crate::oci::Credentials;

/// The StatefulSet a sidecar runs in, as seen from its own pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatefulSetPeers {
    /// This pod's name, `<statefulset>-<ordinal>`.
    pub pod_name: String,
    pub replicas: u32,
    pub headless_service: String,
    pub namespace: String,
    pub scheme: String,
    pub port: u16,
}

impl StatefulSetPeers {
    /// The other replicas' URLs, `<scheme>://<statefulset>-<i>.<headless>.<ns>.svc:<port>`,
    /// in ordinal order, without this pod.
    pub fn peer_urls(&self) -> Result<Vec<String>, String> {
        let (statefulset, ordinal) = self.pod_name.rsplit_once('-').ok_or_else(|| {
            format!(
                "pod name {:?} is not <statefulset>-<ordinal>",
                self.pod_name
            )
        })?;
        let ordinal: u32 = ordinal.parse().map_err(|_| {
            format!(
                "pod name {:?}: {ordinal:?} is not a StatefulSet ordinal",
                self.pod_name
            )
        })?;
        if statefulset.is_empty() {
            return Err(format!(
                "pod name {:?} has no StatefulSet name",
                self.pod_name
            ));
        }
        if self.replicas == 0 {
            return Err("replica count must be at least 1".into());
        }
        if ordinal >= self.replicas {
            return Err(format!(
                "pod {} has ordinal {ordinal}, but there are only {} replicas",
                self.pod_name, self.replicas
            ));
        }
        Ok((0..self.replicas)
            .filter(|i| *i != ordinal)
            .map(|i| {
                format!(
                    "{}://{statefulset}-{i}.{}.{}.svc:{}",
                    self.scheme, self.headless_service, self.namespace, self.port
                )
            })
            .collect())
    }
}

/// Registry credentials: one pair for every registry, or per host (`host[:port]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CredentialSet {
    pub all: Option<Credentials>,
    pub by_host: HashMap<String, Credentials>,
}

impl CredentialSet {
    pub fn for_host(&self, host: &str) -> Option<Credentials> {
        self.by_host
            .get(host)
            .or_else(|| {
                // `host:443` written without the port, or the other way round.
                let bare = host.strip_suffix(":443").unwrap_or(host);
                self.by_host.get(bare)
            })
            .cloned()
            .or_else(|| self.all.clone())
    }

    /// Reads a credentials file. Two formats:
    /// - one line `user:password` (the password may contain `:`), used for every registry;
    /// - JSON: `{"username": "u", "password": "p"}` for every registry, or a Docker config
    ///   `{"auths": {"host:port": {"auth": "<base64 user:password>"}}}` (or `username` and
    ///   `password` instead of `auth`) per registry host.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("credentials file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("credentials file {}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let trimmed = text.trim();
        if trimmed.starts_with('{') {
            return Self::parse_json(trimmed);
        }
        let line = trimmed
            .lines()
            .next()
            .unwrap_or_default()
            .trim_end_matches('\r');
        let (username, password) = line
            .split_once(':')
            .ok_or("expected user:password or JSON")?;
        if username.is_empty() {
            return Err("empty user name".into());
        }
        Ok(CredentialSet {
            all: Some(Credentials {
                username: username.to_string(),
                password: password.to_string(),
            }),
            by_host: HashMap::new(),
        })
    }

    fn parse_json(text: &str) -> Result<Self, String> {
        #[derive(serde::Deserialize)]
        struct Entry {
            #[serde(default)]
            auth: Option<String>,
            #[serde(default)]
            username: Option<String>,
            #[serde(default)]
            password: Option<String>,
        }
        #[derive(serde::Deserialize)]
        struct File {
            #[serde(default)]
            auths: Option<HashMap<String, Entry>>,
            #[serde(flatten)]
            top: Entry,
        }
        let file: File = serde_json::from_str(text).map_err(|e| format!("bad JSON: {e}"))?;
        let decode = |entry: Entry, at: &str| -> Result<Option<Credentials>, String> {
            if let Some(auth) = entry.auth.filter(|a| !a.is_empty()) {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|_| format!("{at}: auth is not base64"))?;
                let raw = String::from_utf8(raw).map_err(|_| format!("{at}: auth is not UTF-8"))?;
                let (u, p) = raw
                    .split_once(':')
                    .ok_or_else(|| format!("{at}: auth is not user:password"))?;
                return Ok(Some(Credentials {
                    username: u.to_string(),
                    password: p.to_string(),
                }));
            }
            match (entry.username, entry.password) {
                (Some(u), Some(p)) if !u.is_empty() => Ok(Some(Credentials {
                    username: u,
                    password: p,
                })),
                (None, None) => Ok(None),
                _ => Err(format!("{at}: needs both username and password")),
            }
        };
        let mut set = CredentialSet {
            all: decode(file.top, "top level")?,
            by_host: HashMap::new(),
        };
        for (host, entry) in file.auths.unwrap_or_default() {
            let key = host
                .trim_start_matches("https://")
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_string();
            if let Some(creds) = decode(entry, &format!("auths.{host}"))? {
                set.by_host.insert(key, creds);
            }
        }
        if set.all.is_none() && set.by_host.is_empty() {
            return Err("no credentials in the file".into());
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sts(pod: &str, replicas: u32) -> StatefulSetPeers {
        StatefulSetPeers {
            pod_name: pod.into(),
            replicas,
            headless_service: "registry-headless".into(),
            namespace: "registry-system".into(),
            scheme: "https".into(),
            port: 5000,
        }
    }

    #[test]
    fn derives_peers_skipping_itself() {
        assert_eq!(
            sts("registry-1", 3).peer_urls().unwrap(),
            vec![
                "https://registry-0.registry-headless.registry-system.svc:5000",
                "https://registry-2.registry-headless.registry-system.svc:5000",
            ]
        );
        // Dashes in the StatefulSet name: the ordinal follows the last one.
        assert_eq!(
            sts("my-registry-0", 2).peer_urls().unwrap(),
            vec!["https://my-registry-1.registry-headless.registry-system.svc:5000"]
        );
        assert!(sts("registry-0", 1).peer_urls().unwrap().is_empty());
    }

    #[test]
    fn refuses_bad_pod_names_and_counts() {
        for (pod, n) in [
            ("registry", 2),
            ("registry-x", 2),
            ("-0", 2),
            ("registry-2", 2),
            ("registry-0", 0),
        ] {
            assert!(sts(pod, n).peer_urls().is_err(), "{pod} {n}");
        }
    }

    #[test]
    fn reads_user_password_line() {
        let set = CredentialSet::parse("admin:pa:ss\n").unwrap();
        let c = set.for_host("anything:5000").unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("admin", "pa:ss")
        );
        assert!(CredentialSet::parse("nocolon").is_err());
        assert!(CredentialSet::parse(":pw").is_err());
    }

    #[test]
    fn reads_docker_config() {
        // base64("u1:p1") = dTE6cDE=
        let set = CredentialSet::parse(
            r#"{"auths":{"registry-0.h.ns.svc:5000":{"auth":"dTE6cDE="},"https://other.example":{"username":"u2","password":"p2"}}}"#,
        )
        .unwrap();
        assert_eq!(
            set.for_host("registry-0.h.ns.svc:5000").unwrap().username,
            "u1"
        );
        assert_eq!(set.for_host("other.example:443").unwrap().password, "p2");
        assert_eq!(set.for_host("unknown:5000"), None);
        let set = CredentialSet::parse(r#"{"username":"u","password":"p"}"#).unwrap();
        assert_eq!(set.for_host("x").unwrap().username, "u");
        assert!(CredentialSet::parse(r#"{"auths":{"h":{"auth":"!!"}}}"#).is_err());
        assert!(CredentialSet::parse(r#"{}"#).is_err());
    }
}
