//! What each peer and the local registry last agreed on: per (peer, repository, tag), the
//! digest both held. A round reads it to tell which side of a differing tag moved, so that a
//! fresh push is not reverted to a peer's older digest (see [`super::round`]).
//!
//! Kept in memory, and with `--state-file` also on disk, so that it survives restarts of the
//! sidecar and of the pod. Peers are named by URL, not by position, because the peer list can
//! change between runs. The file is one compact JSON object,
//! `{"version":1,"agreed":{"<peer URL>":{"<repository>":{"<tag>":"<digest>"}}},"local_checked":<unix seconds>}`,
//! written only after a round that changed it, atomically (temporary file in the same
//! directory, fsync, rename), so a crash leaves either the old or the new memory, never half
//! of one. `local_checked` is when a round last HEADed every local tag; a restarted syncer
//! trusts the agreed digests as the local ones while that is recent (see [`super::round`]).
//! Files without it (older syncers) are read as never checked.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use oci_spec::image::Digest;
use serde::{Deserialize, Serialize};

/// The version written into the file; another version is not read.
const FORMAT_VERSION: u32 = 1;

/// peer → repository → tag → digest, sorted so that equal memories give equal files.
type Nested = BTreeMap<String, BTreeMap<String, BTreeMap<String, Digest>>>;

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    agreed: Nested,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    local_checked: Option<u64>,
}

/// (peer, repository, tag).
pub type AgreementKey = (String, String, String);

#[derive(Default)]
struct Entries {
    map: HashMap<AgreementKey, Digest>,
    /// Unix seconds of the last round that HEADed every local tag.
    local_checked: Option<u64>,
    /// Changed since last saved (or since loaded).
    dirty: bool,
}

/// The tags one peer listed in one round.
#[derive(Debug, Default)]
pub struct PeerListing {
    /// (repository, tag).
    pub tags: HashSet<(String, String)>,
    /// Repositories whose tags could not be listed: their tags' presence is unknown.
    pub unlisted: HashSet<String>,
}

/// The agreed digests, optionally backed by a file.
pub struct Agreements {
    path: Option<PathBuf>,
    entries: Mutex<Entries>,
    /// Held across a save: the round and the push notifications both save, and a later
    /// snapshot must not be overwritten by an earlier one.
    saving: tokio::sync::Mutex<()>,
}

impl Agreements {
    /// An empty memory that lives as long as the process.
    pub fn in_memory() -> Self {
        Agreements {
            path: None,
            entries: Mutex::default(),
            saving: tokio::sync::Mutex::default(),
        }
    }

    /// The memory kept in `path`. A missing file is an empty memory; an unreadable or
    /// corrupt one is logged and replaced by an empty memory on the next save: losing it only
    /// means that the next rounds settle differing tags by the tie-break.
    pub fn from_file(path: &Path) -> Self {
        let (map, local_checked) = match load(path) {
            Ok(loaded) => loaded,
            Err(reason) => {
                tracing::warn!(path = %path.display(), reason = %reason, "cannot read the sync state file; starting with no memory of agreed digests");
                (HashMap::new(), None)
            }
        };
        Agreements {
            path: Some(path.to_path_buf()),
            entries: Mutex::new(Entries {
                map,
                local_checked,
                dirty: false,
            }),
            saving: tokio::sync::Mutex::default(),
        }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn get(&self, peer: &str, repo: &str, tag: &str) -> Option<Digest> {
        let key = (peer.to_string(), repo.to_string(), tag.to_string());
        self.lock().map.get(&key).cloned()
    }

    /// Remembers that `peer` and the local registry both hold `digest` under `repo:tag`.
    pub fn record(&self, peer: &str, repo: &str, tag: &str, digest: &Digest) {
        let key = (peer.to_string(), repo.to_string(), tag.to_string());
        let mut entries = self.lock();
        if entries.map.get(&key) != Some(digest) {
            entries.map.insert(key, digest.clone());
            entries.dirty = true;
        }
    }

    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// When a round last HEADed every local tag, as remembered.
    pub fn local_checked(&self) -> Option<SystemTime> {
        self.lock()
            .local_checked
            .map(|secs| UNIX_EPOCH + Duration::from_secs(secs))
    }

    /// Remembers that a round which started at `at` HEADed every local tag.
    pub fn mark_local_checked(&self, at: SystemTime) {
        let secs = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut entries = self.lock();
        if entries.local_checked != Some(secs) {
            entries.local_checked = Some(secs);
            entries.dirty = true;
        }
    }

    /// The local digest of each (repository, tag) as the agreements tell it: the digest
    /// every peer agreed on. A tag agreed at different digests with different peers moved
    /// since one of them, and is left out.
    pub fn local_digests(&self) -> HashMap<(String, String), Digest> {
        let mut out: HashMap<(String, String), Option<Digest>> = HashMap::new();
        for ((_, repo, tag), digest) in &self.lock().map {
            out.entry((repo.clone(), tag.clone()))
                .and_modify(|d| {
                    if d.as_ref() != Some(digest) {
                        *d = None;
                    }
                })
                .or_insert_with(|| Some(digest.clone()));
        }
        out.into_iter()
            .filter_map(|(key, d)| d.map(|d| (key, d)))
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entries whose tag is known to be absent on the peer's side: the peer listed its
    /// repositories (`listings`, by peer name) without it, or the peer is no longer
    /// configured. A peer whose catalog could not be listed (no listing), or the repository's
    /// tags, is not known to lack anything. The caller forgets those of them that are absent
    /// locally too.
    pub fn absent_from_peers(
        &self,
        configured: &[&str],
        listings: &HashMap<String, PeerListing>,
    ) -> Vec<AgreementKey> {
        self.lock()
            .map
            .keys()
            .filter(|(peer, repo, tag)| {
                if !configured.contains(&peer.as_str()) {
                    return true;
                }
                match listings.get(peer) {
                    None => false,
                    Some(l) if l.unlisted.contains(repo) => false,
                    Some(l) => !l.tags.contains(&(repo.clone(), tag.clone())),
                }
            })
            .cloned()
            .collect()
    }

    /// Forgets the given entries.
    pub fn remove<'k>(&self, keys: impl IntoIterator<Item = &'k AgreementKey>) {
        let mut entries = self.lock();
        for key in keys {
            if entries.map.remove(key).is_some() {
                entries.dirty = true;
            }
        }
    }

    /// Writes the file when the memory changed since it was last written; nothing to do
    /// without a file. On failure the memory stays marked changed, so the next round tries
    /// again.
    pub async fn save_if_changed(&self) -> Result<bool, String> {
        let Some(path) = self.path.clone() else {
            return Ok(false);
        };
        let _saving = self.saving.lock().await;
        let bytes = {
            let mut entries = self.lock();
            if !entries.dirty {
                return Ok(false);
            }
            entries.dirty = false;
            encode(&entries.map, entries.local_checked)
        };
        let written = tokio::task::spawn_blocking({
            let path = path.clone();
            move || write_atomically(&path, &bytes)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        if let Err(reason) = written {
            self.lock().dirty = true;
            return Err(format!("sync state file {}: {reason}", path.display()));
        }
        Ok(true)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        // Every update is one insert or remove: nothing is left half-done by a panic.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

type Loaded = (HashMap<AgreementKey, Digest>, Option<u64>);

fn load(path: &Path) -> Result<Loaded, String> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Ok((HashMap::new(), None));
        }
        Err(err) => return Err(err.to_string()),
    };
    decode(&bytes)
}

fn decode(bytes: &[u8]) -> Result<Loaded, String> {
    let file: StateFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if file.version != FORMAT_VERSION {
        return Err(format!(
            "format version {} (this syncer reads {FORMAT_VERSION})",
            file.version
        ));
    }
    let mut map = HashMap::new();
    for (peer, repos) in file.agreed {
        for (repo, tags) in repos {
            for (tag, digest) in tags {
                map.insert((peer.clone(), repo.clone(), tag), digest);
            }
        }
    }
    Ok((map, file.local_checked))
}

fn encode(map: &HashMap<AgreementKey, Digest>, local_checked: Option<u64>) -> Vec<u8> {
    let mut agreed = Nested::new();
    for ((peer, repo, tag), digest) in map {
        agreed
            .entry(peer.clone())
            .or_default()
            .entry(repo.clone())
            .or_default()
            .insert(tag.clone(), digest.clone());
    }
    let file = StateFile {
        version: FORMAT_VERSION,
        agreed,
        local_checked,
    };
    let mut bytes = serde_json::to_vec(&file).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

/// Replaces `path` with `bytes`: a temporary file beside it, flushed to disk, renamed over
/// it, then the directory flushed so that the rename itself survives a crash.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let name = path
        .file_name()
        .ok_or_else(|| "not a file name".to_string())?
        .to_string_lossy();
    let temp = dir.join(format!(".{name}.tmp"));
    let result = (|| {
        let mut file =
            std::fs::File::create(&temp).map_err(|e| format!("create {}: {e}", temp.display()))?;
        file.write_all(bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| format!("write {}: {e}", temp.display()))?;
        std::fs::rename(&temp, path).map_err(|e| format!("rename {}: {e}", temp.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result?;
    // Not every filesystem lets a directory be opened for fsync; the data is written anyway.
    if let Ok(dir) = std::fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> Digest {
        format!("sha256:{}", hex::encode([n; 32])).parse().unwrap()
    }

    #[tokio::test]
    async fn saved_memory_loads_back_by_peer_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/agreed.json");
        let a = Agreements::from_file(&path);
        assert!(a.is_empty(), "a missing file is an empty memory");
        a.record(
            "https://registry-1:5000",
            "library/alpine",
            "3.19",
            &digest(1),
        );
        a.record(
            "https://registry-1:5000",
            "library/alpine",
            "latest",
            &digest(2),
        );
        a.record("https://registry-2:5000", "apps/web", "v1", &digest(3));
        assert_eq!(a.save_if_changed().await, Ok(true));

        let b = Agreements::from_file(&path);
        assert_eq!(b.len(), 3);
        assert_eq!(
            b.get("https://registry-1:5000", "library/alpine", "latest"),
            Some(digest(2))
        );
        assert_eq!(
            b.get("https://registry-2:5000", "library/alpine", "3.19"),
            None
        );
        // Compact and nested: each peer and repository written once.
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1);
        assert_eq!(text.matches("library/alpine").count(), 1, "{text}");
        assert!(text.starts_with(r#"{"version":1,"agreed":{"https://registry-1:5000":"#));
        // No temporary file left beside it.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["agreed.json"]);
    }

    #[tokio::test]
    async fn only_a_change_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agreed.json");
        let a = Agreements::from_file(&path);
        assert_eq!(a.save_if_changed().await, Ok(false));
        assert!(!path.exists(), "nothing to remember, nothing written");
        a.record("p", "r", "t", &digest(1));
        assert_eq!(a.save_if_changed().await, Ok(true));
        a.record("p", "r", "t", &digest(1));
        assert_eq!(
            a.save_if_changed().await,
            Ok(false),
            "the same digest again"
        );
        a.remove(&[("p".into(), "r".into(), "gone".into())]);
        assert_eq!(a.save_if_changed().await, Ok(false), "nothing was there");
        a.record("p", "r", "t", &digest(2));
        assert_eq!(a.save_if_changed().await, Ok(true));
        a.remove(&[("p".into(), "r".into(), "t".into())]);
        assert_eq!(a.save_if_changed().await, Ok(true));
        assert!(Agreements::from_file(&path).is_empty());
        // Without a file nothing is ever written.
        let m = Agreements::in_memory();
        m.record("p", "r", "t", &digest(1));
        assert_eq!(m.save_if_changed().await, Ok(false));
    }

    #[test]
    fn corrupt_files_give_an_empty_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agreed.json");
        for bad in [
            &b""[..],
            b"{\"version\":1,\"agreed\":{\"p\":{\"r\":{\"t\":\"sha256:1234\"}}}}",
            b"{\"version\":2,\"agreed\":{}}",
            b"{\"version\":1,\"agreed\":{\"p\":[]}}",
            b"\x00\xff garbage",
        ] {
            std::fs::write(&path, bad).unwrap();
            assert!(decode(bad).is_err(), "{}", String::from_utf8_lossy(bad));
            assert!(Agreements::from_file(&path).is_empty());
        }
        // A directory where the file should be: unreadable, not fatal.
        let not_a_file = dir.path().join("dir");
        std::fs::create_dir(&not_a_file).unwrap();
        assert!(load(&not_a_file).is_err());
        assert!(Agreements::from_file(&not_a_file).is_empty());
    }

    #[tokio::test]
    async fn pruning_forgets_tags_gone_from_the_peer_side() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agreed.json");
        let a = Agreements::from_file(&path);
        for (peer, repo, tag) in [
            ("p1", "r", "listed"),
            ("p1", "r", "deleted"),
            ("p1", "broken", "t"),
            ("p2", "r", "t"),
            ("p3", "r", "t"),
        ] {
            a.record(peer, repo, tag, &digest(1));
        }
        assert_eq!(a.save_if_changed().await, Ok(true));
        let listings = HashMap::from([(
            "p1".to_string(),
            PeerListing {
                tags: [("r".to_string(), "listed".to_string())].into(),
                unlisted: ["broken".to_string()].into(),
            },
        )]);
        // p2's catalog failed: no listing. p3 is not configured any more.
        let mut absent = a.absent_from_peers(&["p1", "p2"], &listings);
        absent.sort();
        let key = |p: &str, r: &str, t: &str| (p.to_string(), r.to_string(), t.to_string());
        assert_eq!(absent, [key("p1", "r", "deleted"), key("p3", "r", "t")]);
        // The caller found p3's tag still present locally: only the other is forgotten.
        a.remove(&absent[..1]);
        assert_eq!(a.save_if_changed().await, Ok(true));
        let b = Agreements::from_file(&path);
        assert_eq!(b.len(), 4);
        assert_eq!(b.get("p1", "r", "deleted"), None);
        assert_eq!(b.get("p3", "r", "t"), Some(digest(1)));
        // Nothing removed, nothing written.
        a.remove(&absent[..1]);
        assert_eq!(a.save_if_changed().await, Ok(false));
    }

    #[tokio::test]
    async fn local_digests_and_the_last_full_check_load_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agreed.json");
        let a = Agreements::from_file(&path);
        assert_eq!(a.local_checked(), None);
        a.record("p1", "r", "same", &digest(1));
        a.record("p2", "r", "same", &digest(1));
        a.record("p1", "r", "moved", &digest(2));
        a.record("p2", "r", "moved", &digest(3));
        a.record("p2", "r", "one", &digest(4));
        let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        a.mark_local_checked(at);
        assert_eq!(a.save_if_changed().await, Ok(true));
        a.mark_local_checked(at);
        assert_eq!(a.save_if_changed().await, Ok(false), "the same time again");

        let b = Agreements::from_file(&path);
        assert_eq!(b.local_checked(), Some(at));
        let key = |t: &str| ("r".to_string(), t.to_string());
        assert_eq!(
            b.local_digests(),
            HashMap::from([(key("same"), digest(1)), (key("one"), digest(4))]),
            "a tag agreed at two digests is not taken as known"
        );
        // A file of an older syncer, without the field: never checked.
        std::fs::write(&path, r#"{"version":1,"agreed":{"p":{"r":{"t":"sha256:0101010101010101010101010101010101010101010101010101010101010101"}}}}"#).unwrap();
        let c = Agreements::from_file(&path);
        assert_eq!((c.len(), c.local_checked()), (1, None));
    }

    #[tokio::test]
    async fn a_corrupt_file_is_replaced_on_the_next_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agreed.json");
        std::fs::write(&path, "{not json").unwrap();
        let a = Agreements::from_file(&path);
        a.record("p", "r", "t", &digest(7));
        assert_eq!(a.save_if_changed().await, Ok(true));
        assert_eq!(
            Agreements::from_file(&path).get("p", "r", "t"),
            Some(digest(7))
        );
    }

    #[tokio::test]
    async fn a_failed_write_is_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        // The parent is a file: the directory cannot be created.
        let blocker = dir.path().join("blocker");
        std::fs::write(&blocker, "").unwrap();
        let a = Agreements::from_file(&blocker.join("agreed.json"));
        a.record("p", "r", "t", &digest(1));
        let err = a.save_if_changed().await.unwrap_err();
        assert!(err.contains("blocker"), "{err}");
        std::fs::remove_file(&blocker).unwrap();
        assert_eq!(a.save_if_changed().await, Ok(true));
    }
}
