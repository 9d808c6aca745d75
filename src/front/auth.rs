//! Who may do what through the front: htpasswd files (bcrypt) of users that may pull, and of
//! users that may also push; Basic credentials checked against them, verified ones cached.
//!
//! bcrypt costs tens of milliseconds by design, and containerd sends the same `Authorization`
//! header on every request, so a verified header is remembered (by its SHA-256, never the
//! header itself) until the user files change. Checks of unknown headers are bounded so a
//! flood of wrong passwords cannot take every core.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

/// What a user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// GET and HEAD.
    Pull,
    /// Everything.
    Push,
}

/// Most verified headers remembered; the cache is emptied when it is full.
const CACHE_LIMIT: usize = 4096;

/// One htpasswd entry: a user may have several (old and new password during a rotation).
#[derive(Debug, Clone)]
struct Entry {
    user: String,
    hash: String,
    role: Role,
}

/// The users, as last read from their files.
#[derive(Debug, Default)]
struct Table {
    entries: Vec<Entry>,
    /// SHA-256 of the files' content, to notice changes.
    fingerprint: [u8; 32],
}

/// Why a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No credentials, malformed ones or wrong ones: 401, without saying which.
    Unauthenticated,
    /// Valid credentials of a user that may not do this: 403.
    Forbidden,
}

/// The users file paths, their entries and the cache of verified headers.
pub struct Users {
    pull_file: Option<PathBuf>,
    push_file: Option<PathBuf>,
    table: RwLock<Arc<Table>>,
    /// SHA-256 of an `Authorization` value → the user's role, for the current table.
    verified: RwLock<HashMap<[u8; 32], (String, Role)>>,
    bcrypt_slots: Semaphore,
}

impl Users {
    /// Reads the files; an unreadable or malformed file is an error naming it.
    pub fn load(pull_file: Option<PathBuf>, push_file: Option<PathBuf>) -> anyhow::Result<Self> {
        let table = read_table(pull_file.as_deref(), push_file.as_deref())?;
        if table.entries.is_empty() {
            anyhow::bail!("no users: give --pull-users and/or --push-users files with entries");
        }
        let slots = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        Ok(Users {
            pull_file,
            push_file,
            table: RwLock::new(Arc::new(table)),
            verified: RwLock::new(HashMap::new()),
            bcrypt_slots: Semaphore::new(slots),
        })
    }

    /// Rereads the files when their content changed. A file that cannot be read or parsed
    /// keeps the previous users (Kubernetes rewrites Secret volumes through a symlink swap,
    /// so a half-written file is not expected, but an edit by hand may be).
    pub fn reload(&self) -> anyhow::Result<bool> {
        let table = read_table(self.pull_file.as_deref(), self.push_file.as_deref())?;
        let current = self.table.read().unwrap_or_else(|e| e.into_inner()).clone();
        if current.fingerprint == table.fingerprint {
            return Ok(false);
        }
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
        self.verified
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        Ok(true)
    }

    /// Polls the files every `interval` and reloads them on change.
    pub async fn watch(self: Arc<Self>, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            match self.reload() {
                Ok(true) => tracing::info!("registry users reloaded"),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reload the registry users; keeping the previous ones")
                }
            }
        }
    }

    /// Checks `authorization` (the header's value, if any) for a request that needs `needed`.
    /// Returns the user's name.
    pub async fn authorize(
        &self,
        authorization: Option<&[u8]>,
        needed: Role,
    ) -> Result<String, Refusal> {
        let value = authorization.ok_or(Refusal::Unauthenticated)?;
        let key: [u8; 32] = Sha256::digest(value).into();
        let cached = self
            .verified
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned();
        let (user, role) = match cached {
            Some(found) => found,
            None => {
                let (user, password) = parse_basic(value).ok_or(Refusal::Unauthenticated)?;
                let table = self.table.read().unwrap_or_else(|e| e.into_inner()).clone();
                let candidates: Vec<Entry> = table
                    .entries
                    .iter()
                    .filter(|e| e.user == user)
                    .cloned()
                    .collect();
                if candidates.is_empty() {
                    return Err(Refusal::Unauthenticated);
                }
                let _slot = self
                    .bcrypt_slots
                    .acquire()
                    .await
                    .map_err(|_| Refusal::Unauthenticated)?;
                let matched = tokio::task::spawn_blocking(move || {
                    candidates
                        .into_iter()
                        .filter(|e| bcrypt::verify(&password, &e.hash).unwrap_or(false))
                        .map(|e| e.role)
                        .max()
                })
                .await
                .ok()
                .flatten()
                .ok_or(Refusal::Unauthenticated)?;
                let mut verified = self.verified.write().unwrap_or_else(|e| e.into_inner());
                // Only for the table the check was made against.
                let current = self.table.read().unwrap_or_else(|e| e.into_inner()).clone();
                if Arc::ptr_eq(&current, &table) {
                    if verified.len() >= CACHE_LIMIT {
                        verified.clear();
                    }
                    verified.insert(key, (user.clone(), matched));
                }
                (user, matched)
            }
        };
        if role >= needed {
            Ok(user)
        } else {
            Err(Refusal::Forbidden)
        }
    }
}

/// `Basic base64(user:password)`, or `None` when malformed.
fn parse_basic(value: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let (scheme, encoded) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    if user.is_empty() {
        return None;
    }
    Some((user.to_string(), password.to_string()))
}

fn read_table(pull: Option<&Path>, push: Option<&Path>) -> anyhow::Result<Table> {
    let mut entries = Vec::new();
    let mut digest = Sha256::new();
    for (path, role) in [(pull, Role::Pull), (push, Role::Push)] {
        let Some(path) = path else { continue };
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read users file {}: {e}", path.display()))?;
        digest.update([role as u8]);
        digest.update(text.as_bytes());
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = line.split_once(':').ok_or_else(|| {
                anyhow::anyhow!(
                    "users file {} line {}: expected user:bcrypt-hash",
                    path.display(),
                    n + 1
                )
            })?;
            if user.is_empty() || !(hash.starts_with("$2")) {
                anyhow::bail!(
                    "users file {} line {}: expected user:bcrypt-hash ($2a$, $2b$ or $2y$)",
                    path.display(),
                    n + 1
                );
            }
            entries.push(Entry {
                user: user.to_string(),
                hash: hash.to_string(),
                role,
            });
        }
    }
    Ok(Table {
        entries,
        fingerprint: digest.finalize().into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user: &str, password: &str) -> Vec<u8> {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        )
        .into_bytes()
    }

    fn users(dir: &Path) -> Users {
        let hash = |p: &str| bcrypt::hash(p, 4).unwrap();
        std::fs::write(dir.join("pull"), format!("ro:{}\n", hash("ro-pw"))).unwrap();
        std::fs::write(
            dir.join("push"),
            format!(
                "# writers\nrw:{}\nsync:{}\n",
                hash("rw-pw"),
                hash("sync-pw")
            ),
        )
        .unwrap();
        Users::load(Some(dir.join("pull")), Some(dir.join("push"))).unwrap()
    }

    #[tokio::test]
    async fn roles_decide_what_a_user_may_do() {
        let dir = tempfile::tempdir().unwrap();
        let users = users(dir.path());
        let ro = basic("ro", "ro-pw");
        let rw = basic("rw", "rw-pw");
        assert_eq!(users.authorize(Some(&ro), Role::Pull).await.unwrap(), "ro");
        assert_eq!(
            users.authorize(Some(&ro), Role::Push).await,
            Err(Refusal::Forbidden)
        );
        assert_eq!(users.authorize(Some(&rw), Role::Push).await.unwrap(), "rw");
        let sync = basic("sync", "sync-pw");
        assert_eq!(
            users.authorize(Some(&sync), Role::Pull).await.unwrap(),
            "sync"
        );
        for bad in [
            None,
            Some(basic("ro", "wrong")),
            Some(basic("nobody", "ro-pw")),
            Some(b"Basic !!!".to_vec()),
            Some(b"Bearer abc".to_vec()),
            Some(b"Basic".to_vec()),
            Some(vec![0xff, 0xfe]),
        ] {
            assert_eq!(
                users.authorize(bad.as_deref(), Role::Pull).await,
                Err(Refusal::Unauthenticated),
                "{bad:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_changed_file_drops_verified_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let users = users(dir.path());
        let ro = basic("ro", "ro-pw");
        users.authorize(Some(&ro), Role::Pull).await.unwrap();
        assert!(!users.reload().unwrap());
        let new_hash = bcrypt::hash("new-pw", 4).unwrap();
        std::fs::write(dir.path().join("pull"), format!("ro:{new_hash}\n")).unwrap();
        assert!(users.reload().unwrap());
        assert_eq!(
            users.authorize(Some(&ro), Role::Pull).await,
            Err(Refusal::Unauthenticated)
        );
        let new = basic("ro", "new-pw");
        assert!(users.authorize(Some(&new), Role::Pull).await.is_ok());
    }

    #[test]
    fn malformed_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pull");
        std::fs::write(&path, "ro:plaintext\n").unwrap();
        let e = Users::load(Some(path.clone()), None).err().unwrap();
        assert!(e.to_string().contains("line 1"), "{e}");
        assert!(Users::load(Some(dir.path().join("missing")), None).is_err());
        std::fs::write(&path, "# nobody\n").unwrap();
        assert!(Users::load(Some(path), None).is_err());
    }
}
