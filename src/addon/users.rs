//! Registry users (SPEC §9.1): `ro` pulls, `rw` pulls and pushes, and the sync sidecar's own
//! identity. One place decides what each Secret holds, for the hooks, `render` and later the
//! controller.
//!
//! - On the management cluster, `<cluster>-registry-addon-ro` and `-rw` (type
//!   `kubernetes.io/basic-auth`) hold the passwords. They are generated once and never
//!   regenerated; a Secret edited into an unusable state is an error naming it.
//! - On the workload cluster, `registry-system/registry-auth` holds only what the pods need:
//!   bcrypt hashes, the sync identity and Distribution's shared `http.secret`.

use std::fmt;

use rand::Rng;
use rand::distributions::Alphanumeric;
use rand::rngs::OsRng;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::names;
use crate::render::objects::{b64, cluster_owner_reference, secret_data};
use crate::wire::cluster::Cluster;

/// Length of generated passwords: 40 alphanumerics, about 238 bits.
pub const PASSWORD_LENGTH: usize = 40;
/// bcrypt cost of the hashes the front checks (about 50 ms per check; the front caches
/// verified credentials).
pub const BCRYPT_COST: u32 = 10;

/// A random password of [`PASSWORD_LENGTH`] alphanumerics from the OS's generator.
pub fn generate_password() -> String {
    OsRng
        .sample_iter(&Alphanumeric)
        .take(PASSWORD_LENGTH)
        .map(char::from)
        .collect()
}

pub use crate::oci::Credentials;

/// A user name the front and htpasswd files can carry.
fn check_username(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("username is empty".into());
    }
    if name
        .chars()
        .any(|c| c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err("username must not contain ':', spaces or control characters".into());
    }
    Ok(())
}

/// `<cluster>-registry-addon-<user>` on the management cluster, ownerRef to the Cluster.
pub fn user_secret(cluster: &Cluster, credentials: &Credentials) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": names::user_secret(cluster.name(), &credentials.username),
            "namespace": cluster.namespace(),
            "labels": {
                names::MANAGED_BY_LABEL: names::FIELD_MANAGER,
                names::CLUSTER_NAME_LABEL: cluster.name(),
            },
            "ownerReferences": [cluster_owner_reference(cluster)],
        },
        "type": "kubernetes.io/basic-auth",
        "data": {
            "username": b64(&credentials.username),
            "password": b64(&credentials.password),
        },
    })
}

/// A user Secret as read from the API, with what identifies its version.
#[derive(Debug, Clone)]
pub struct StoredUser {
    pub credentials: Credentials,
    /// `<uid>/<resourceVersion>` of the Secret.
    pub version: String,
}

/// The credentials of a user Secret, or why it cannot be used (the caller names the Secret).
pub fn read_user_secret(secret: &Value) -> Result<StoredUser, String> {
    let username = secret_data(secret, "username")
        .ok_or("key username is missing or not UTF-8")?
        .trim()
        .to_string();
    check_username(&username)?;
    let password = secret_data(secret, "password").ok_or("key password is missing or not UTF-8")?;
    if password.is_empty() {
        return Err("key password is empty".into());
    }
    if password.contains(['\n', '\r']) {
        return Err("key password holds a line break".into());
    }
    let metadata = &secret["metadata"];
    let version = format!(
        "{}/{}",
        metadata["uid"].as_str().unwrap_or_default(),
        metadata["resourceVersion"].as_str().unwrap_or_default()
    );
    Ok(StoredUser {
        credentials: Credentials { username, password },
        version,
    })
}

/// One htpasswd line, `user:$2b$…`.
pub fn htpasswd_line(credentials: &Credentials) -> Result<String, String> {
    let hash = bcrypt::hash(&credentials.password, BCRYPT_COST)
        .map_err(|e| format!("hashing the password of user {}: {e}", credentials.username))?;
    Ok(format!("{}:{hash}", credentials.username))
}

/// What `registry-system/registry-auth` holds.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryAuth {
    /// htpasswd of the users that may pull only.
    pub pull_users: String,
    /// htpasswd of the users that may pull and push (`rw`, `sync`).
    pub push_users: String,
    /// `sync:<password>`.
    pub sync_credentials: String,
    /// Distribution's `http.secret`, shared by every replica.
    pub http_secret: String,
    /// Bearer token of the registry's push notifications to the sync sidecar.
    pub notify_token: String,
    /// [`names::AUTH_SOURCE_ANNOTATION`].
    pub source: String,
}

impl fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl RegistryAuth {
    /// What the hashes were made from: the user Secrets' versions and a digest of the files,
    /// so an edit of either side is noticed without running bcrypt.
    fn source_of(
        ro: &StoredUser,
        rw: &StoredUser,
        retired: &[Credentials],
        files: [&str; 3],
    ) -> String {
        let mut digest = Sha256::new();
        for file in files {
            digest.update(file.as_bytes());
            digest.update([0]);
        }
        // Only a digest of the retiring credentials, never the passwords themselves.
        for old in retired {
            digest.update(old.username.as_bytes());
            digest.update([1]);
            digest.update(old.password.as_bytes());
            digest.update([0]);
        }
        format!(
            "{},{},{}",
            ro.version,
            rw.version,
            hex::encode(&digest.finalize()[..16])
        )
    }

    /// The Secret for `ro` and `rw`: `existing` kept when its hashes were made from these very
    /// user Secrets and nobody edited it; else new hashes, keeping the sync identity and the
    /// HTTP secret when `existing` has usable ones.
    pub fn desired(
        existing: Option<&Value>,
        ro: &StoredUser,
        rw: &StoredUser,
    ) -> Result<Self, String> {
        Self::desired_accepting(existing, ro, rw, &[])
    }

    /// As [`RegistryAuth::desired`], the pull users also accepting `retired`: the `ro`
    /// credentials nodes still send while a new password rolls out to them.
    pub fn desired_accepting(
        existing: Option<&Value>,
        ro: &StoredUser,
        rw: &StoredUser,
        retired: &[Credentials],
    ) -> Result<Self, String> {
        let retired: Vec<Credentials> = retired
            .iter()
            .filter(|old| **old != ro.credentials)
            .cloned()
            .collect();
        if let Some(current) = existing.and_then(Self::from_secret) {
            let files = [
                current.pull_users.as_str(),
                current.push_users.as_str(),
                current.sync_credentials.as_str(),
            ];
            if current.source == Self::source_of(ro, rw, &retired, files) {
                return Ok(current);
            }
        }
        let kept = |key: &str| {
            existing
                .and_then(|s| secret_data(s, key))
                .filter(|v| !v.trim().is_empty())
        };
        let sync_credentials = kept(names::AUTH_SYNC_CREDENTIALS_KEY)
            .filter(|line| {
                line.trim_end()
                    .split_once(':')
                    .is_some_and(|(user, pw)| user == names::SYNC_USER && !pw.is_empty())
            })
            .map(|line| line.trim_end().to_string())
            .unwrap_or_else(|| format!("{}:{}", names::SYNC_USER, generate_password()));
        let sync = Credentials {
            username: names::SYNC_USER.into(),
            password: sync_credentials
                .split_once(':')
                .map(|(_, pw)| pw.to_string())
                .unwrap_or_default(),
        };
        let http_secret = kept(names::AUTH_HTTP_SECRET_KEY).unwrap_or_else(generate_password);
        let notify_token = kept(names::AUTH_NOTIFY_TOKEN_KEY).unwrap_or_else(generate_password);
        let mut pull_users = format!("{}\n", htpasswd_line(&ro.credentials)?);
        for old in &retired {
            pull_users.push_str(&htpasswd_line(old)?);
            pull_users.push('\n');
        }
        let push_users = format!(
            "{}\n{}\n",
            htpasswd_line(&rw.credentials)?,
            htpasswd_line(&sync)?
        );
        let source = Self::source_of(
            ro,
            rw,
            &retired,
            [&pull_users, &push_users, &sync_credentials],
        );
        Ok(RegistryAuth {
            pull_users,
            push_users,
            sync_credentials,
            http_secret,
            notify_token,
            source,
        })
    }

    /// The content of an existing `registry-auth`, when every key is there.
    fn from_secret(secret: &Value) -> Option<Self> {
        let key = |k: &str| secret_data(secret, k).filter(|v| !v.trim().is_empty());
        Some(RegistryAuth {
            pull_users: key(names::AUTH_PULL_USERS_KEY)?,
            push_users: key(names::AUTH_PUSH_USERS_KEY)?,
            sync_credentials: key(names::AUTH_SYNC_CREDENTIALS_KEY)?,
            http_secret: key(names::AUTH_HTTP_SECRET_KEY)?,
            notify_token: key(names::AUTH_NOTIFY_TOKEN_KEY)?,
            source: secret["metadata"]["annotations"][names::AUTH_SOURCE_ANNOTATION]
                .as_str()?
                .to_string(),
        })
    }

    /// `registry-system/registry-auth` on the workload cluster.
    pub fn secret(&self) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": names::REGISTRY_AUTH_SECRET,
                "namespace": names::REGISTRY_NAMESPACE,
                "labels": {names::MANAGED_BY_LABEL: names::FIELD_MANAGER},
                "annotations": {names::AUTH_SOURCE_ANNOTATION: self.source},
            },
            "type": "Opaque",
            "data": {
                names::AUTH_PULL_USERS_KEY: b64(&self.pull_users),
                names::AUTH_PUSH_USERS_KEY: b64(&self.push_users),
                names::AUTH_SYNC_CREDENTIALS_KEY: b64(&self.sync_credentials),
                names::AUTH_HTTP_SECRET_KEY: b64(&self.http_secret),
                names::AUTH_NOTIFY_TOKEN_KEY: b64(&self.notify_token),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(user: &str, password: &str, version: &str) -> StoredUser {
        StoredUser {
            credentials: Credentials {
                username: user.into(),
                password: password.into(),
            },
            version: version.into(),
        }
    }

    fn secret(data: &[(&str, &str)]) -> Value {
        let data: serde_json::Map<String, Value> = data
            .iter()
            .map(|(k, v)| (k.to_string(), json!(b64(v))))
            .collect();
        json!({"metadata": {"uid": "u1", "resourceVersion": "7"}, "data": data})
    }

    #[test]
    fn passwords_are_long_random_alphanumerics() {
        let a = generate_password();
        let b = generate_password();
        assert_eq!(a.len(), PASSWORD_LENGTH);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
    }

    #[test]
    fn reads_user_secrets_and_refuses_unusable_ones() {
        let user = read_user_secret(&secret(&[("username", "ro"), ("password", "pw")])).unwrap();
        assert_eq!(user.credentials.username, "ro");
        assert_eq!(user.version, "u1/7");
        for (data, why) in [
            (vec![("password", "pw")], "username is missing"),
            (vec![("username", "ro")], "password is missing"),
            (
                vec![("username", "ro"), ("password", "")],
                "password is empty",
            ),
            (
                vec![("username", "r:o"), ("password", "x")],
                "must not contain",
            ),
            (vec![("username", "ro"), ("password", "a\nb")], "line break"),
        ] {
            let e = read_user_secret(&secret(&data)).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn debug_hides_passwords() {
        let c = Credentials {
            username: "rw".into(),
            password: "hunter2hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn auth_secret_is_kept_until_a_user_secret_changes() {
        let ro = stored("ro", "ro-password", "a/1");
        let rw = stored("rw", "rw-password", "b/1");
        let first = RegistryAuth::desired(None, &ro, &rw).unwrap();
        let pull_hash = first.pull_users.trim().split_once(':').unwrap().1;
        assert!(bcrypt::verify("ro-password", pull_hash).unwrap());
        let written = first.secret();
        // A repeat keeps everything, hashes included (bcrypt salts differ on each run).
        let again = RegistryAuth::desired(Some(&written), &ro, &rw).unwrap();
        assert_eq!(again, first);
        // A changed rw Secret: new hashes, same sync identity and HTTP secret.
        let rw2 = stored("rw", "new-password", "b/2");
        let changed = RegistryAuth::desired(Some(&written), &ro, &rw2).unwrap();
        assert_ne!(changed.push_users, first.push_users);
        assert_eq!(changed.sync_credentials, first.sync_credentials);
        assert_eq!(changed.http_secret, first.http_secret);
        assert_eq!(changed.notify_token, first.notify_token);
        let rw_hash = changed.push_users.lines().next().unwrap();
        assert!(bcrypt::verify("new-password", rw_hash.split_once(':').unwrap().1).unwrap());
        // A hand edit of the hashes is noticed too.
        let mut edited = written.clone();
        edited["data"][names::AUTH_PULL_USERS_KEY] = json!(b64("ro:garbage\n"));
        let repaired = RegistryAuth::desired(Some(&edited), &ro, &rw).unwrap();
        assert_ne!(repaired.pull_users, "ro:garbage\n");
        assert_eq!(repaired.sync_credentials, first.sync_credentials);
    }

    #[test]
    fn retiring_ro_credentials_stay_accepted_until_dropped() {
        let old = Credentials {
            username: "ro".into(),
            password: "old-password".into(),
        };
        let ro = stored("ro", "new-password", "a/2");
        let rw = stored("rw", "rw-password", "b/1");
        let both =
            RegistryAuth::desired_accepting(None, &ro, &rw, std::slice::from_ref(&old)).unwrap();
        let hashes: Vec<&str> = both
            .pull_users
            .lines()
            .map(|l| l.split_once(':').unwrap().1)
            .collect();
        assert_eq!(hashes.len(), 2);
        assert!(bcrypt::verify("new-password", hashes[0]).unwrap());
        assert!(bcrypt::verify("old-password", hashes[1]).unwrap());
        assert!(!both.source.contains("old-password"));
        // Kept while the same credentials are retiring; re-hashed once they are dropped.
        let written = both.secret();
        let again =
            RegistryAuth::desired_accepting(Some(&written), &ro, &rw, std::slice::from_ref(&old))
                .unwrap();
        assert_eq!(again, both);
        let dropped = RegistryAuth::desired(Some(&written), &ro, &rw).unwrap();
        assert_eq!(dropped.pull_users.lines().count(), 1);
        assert_eq!(dropped.http_secret, both.http_secret);
    }
}
