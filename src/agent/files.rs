//! The files the agent owns under containerd's hosts directory: written atomically (a
//! temporary file in the same directory, then a rename), recorded with their hashes in a
//! manifest (`.registry-addon-owned`), and never anything else: no path outside the hosts
//! directory, no `..`, no file the manifest does not name is ever deleted.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::hooks::patches::containerd::{HOSTS_FILE_HEADER, NodeConfig};
use crate::names;

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("refusing path {0:?}: not a plain relative path inside the hosts directory")]
    UnsafePath(String),
    #[error(
        "{0} exists and was not written by registry-addon: left as it is (move it away for the \
         addon to manage that registry)"
    )]
    Foreign(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FilesError + '_ {
    move |source| FilesError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A directory or file name that stays where it is: not empty, not `.` or `..`, no `/`.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

/// `relative` inside `root`, refusing absolute paths, `..` and empty components.
pub fn owned_path(root: &Path, relative: &str) -> Result<PathBuf, FilesError> {
    if relative.split('/').all(is_plain_name) {
        Ok(root.join(relative))
    } else {
        Err(FilesError::UnsafePath(relative.to_string()))
    }
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// What the agent wrote: relative path → hash of the content written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub files: BTreeMap<String, String>,
}

/// The last applied config as recorded on disk.
#[derive(Serialize, Deserialize)]
struct AppliedRecord {
    phase: String,
    files: BTreeMap<String, String>,
}

/// What one pass changed.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    /// Files (re)written because they were absent or differed.
    pub written: Vec<String>,
    /// Files of an earlier configuration removed.
    pub removed: Vec<String>,
}

/// The owned files of a hosts directory.
pub struct CertsDir {
    root: PathBuf,
}

impl CertsDir {
    pub fn new(root: PathBuf) -> CertsDir {
        CertsDir { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn manifest_path(&self) -> PathBuf {
        self.root.join(names::NODE_AGENT_MANIFEST)
    }

    /// The manifest on disk; an absent or unreadable one owns nothing.
    pub fn manifest(&self) -> Manifest {
        std::fs::read(self.manifest_path())
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    fn applied_path(&self) -> PathBuf {
        self.root.join(names::NODE_AGENT_APPLIED)
    }

    /// Records `config` as the last applied one (mode 0600: it holds the `ro` header).
    pub fn save_applied(&self, config: &NodeConfig) -> Result<(), FilesError> {
        let record = AppliedRecord {
            phase: config.phase.as_str().to_string(),
            files: config.files.clone(),
        };
        let body = serde_json::to_vec(&record).unwrap_or_default();
        write_atomic(&self.applied_path(), &body, 0o600)
    }

    /// The last applied config, when one was recorded and still reads; its hash is computed
    /// again from the content, and every path must be one the agent may own.
    pub fn load_applied(&self) -> Option<NodeConfig> {
        let bytes = std::fs::read(self.applied_path()).ok()?;
        let record: AppliedRecord = serde_json::from_slice(&bytes).ok()?;
        let phase = record.phase.parse().ok()?;
        if record
            .files
            .keys()
            .any(|relative| owned_path(&self.root, relative).is_err())
        {
            return None;
        }
        Some(NodeConfig::new(phase, record.files))
    }

    /// Makes the owned files match `config`: writes each one that is absent or differs,
    /// removes files the manifest names that `config` no longer has (only while they still
    /// hold what was written), and records the result. Files already right are not touched.
    pub fn apply(&self, config: &NodeConfig) -> Result<Outcome, FilesError> {
        let mut outcome = Outcome::default();
        let previous = self.manifest();
        // Someone else's hosts file where this config puts one (another registry's mirror
        // set up by hand): refused before anything is written.
        for relative in config.files.keys() {
            let path = owned_path(&self.root, relative)?;
            if relative.ends_with("hosts.toml")
                && !previous.files.contains_key(relative)
                && let Ok(current) = std::fs::read_to_string(&path)
                && !current.starts_with(HOSTS_FILE_HEADER)
            {
                return Err(FilesError::Foreign(path));
            }
        }
        let mut manifest = Manifest::default();
        // The CA bundles before the hosts files that name them, and (below) the hosts files
        // removed before what they named: containerd may read the directory at any moment,
        // and a hosts file whose CA is not there fails every pull of its registry.
        for (relative, content) in hosts_files_last(&config.files) {
            let path = owned_path(&self.root, relative)?;
            self.refuse_symlinks(&path)?;
            let current = std::fs::read(&path).ok();
            if current.as_deref() != Some(content.as_bytes()) {
                // The hosts files carry the ro credentials: root only.
                let mode = if relative.ends_with("/hosts.toml") {
                    0o600
                } else {
                    0o644
                };
                write_atomic(&path, content.as_bytes(), mode)?;
                outcome.written.push(relative.clone());
            }
            manifest
                .files
                .insert(relative.clone(), sha256(content.as_bytes()));
        }
        for (relative, hash) in hosts_files_last(&previous.files).into_iter().rev() {
            if manifest.files.contains_key(relative) {
                continue;
            }
            let Ok(path) = owned_path(&self.root, relative) else {
                continue;
            };
            match std::fs::read(&path) {
                Ok(bytes) if sha256(&bytes) == *hash => {
                    std::fs::remove_file(&path).map_err(io(&path))?;
                    // The host's directory goes too once empty; a non-empty one stays.
                    if let Some(parent) = path.parent().filter(|p| *p != self.root) {
                        let _ = std::fs::remove_dir(parent);
                    }
                    outcome.removed.push(relative.clone());
                }
                Ok(_) => tracing::warn!(
                    file = %path.display(),
                    "left in place: no longer configured, but changed since it was written"
                ),
                Err(_) => {}
            }
        }
        if manifest != previous || !self.manifest_path().exists() {
            let body = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
            write_atomic(&self.manifest_path(), &body, 0o644)?;
        }
        Ok(outcome)
    }

    /// A symlinked directory between the root and `path` could lead outside it.
    fn refuse_symlinks(&self, path: &Path) -> Result<(), FilesError> {
        let mut dir = path.parent();
        while let Some(d) = dir {
            if d == self.root {
                break;
            }
            if let Ok(meta) = std::fs::symlink_metadata(d)
                && meta.file_type().is_symlink()
            {
                return Err(FilesError::UnsafePath(d.display().to_string()));
            }
            dir = d.parent();
        }
        Ok(())
    }
}

/// The entries of `files` with the hosts files after the rest (the CA bundles they name).
fn hosts_files_last<V>(files: &BTreeMap<String, V>) -> Vec<(&String, &V)> {
    let (hosts, rest): (Vec<_>, Vec<_>) = files
        .iter()
        .partition(|(relative, _)| relative.ends_with("hosts.toml"));
    rest.into_iter().chain(hosts).collect()
}

/// Writes `path` through a temporary file in its own directory and a rename, so containerd
/// never reads half a file.
fn write_atomic(path: &Path, content: &[u8], mode: u32) -> Result<(), FilesError> {
    let dir = path
        .parent()
        .ok_or_else(|| FilesError::UnsafePath(path.display().to_string()))?;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(".{name}.registry-addon.tmp"));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&temp)?;
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.write_all(content)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result.map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hooks::patches::containerd::Phase;

    fn config(files: &[(&str, &str)]) -> NodeConfig {
        NodeConfig::new(
            Phase::Final,
            files
                .iter()
                .map(|(p, c)| (p.to_string(), c.to_string()))
                .collect(),
        )
    }

    #[test]
    fn writes_repairs_and_removes_only_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let certs = CertsDir::new(dir.path().to_path_buf());
        std::fs::create_dir_all(dir.path().join("docker.io")).unwrap();
        std::fs::write(dir.path().join("docker.io/hosts.toml"), "foreign").unwrap();
        let first = config(&[("_default/hosts.toml", "h1"), ("10.0.0.1/ca.crt", "c1")]);
        let out = certs.apply(&first).unwrap();
        assert_eq!(out.written.len(), 2);
        let mode = std::fs::metadata(dir.path().join("_default/hosts.toml"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(certs.apply(&first).unwrap(), Outcome::default());
        std::fs::write(dir.path().join("10.0.0.1/ca.crt"), "edited").unwrap();
        assert_eq!(certs.apply(&first).unwrap().written, ["10.0.0.1/ca.crt"]);
        let second = config(&[("_default/hosts.toml", "h2"), ("10.0.0.2/ca.crt", "c2")]);
        let out = certs.apply(&second).unwrap();
        assert_eq!(out.removed, ["10.0.0.1/ca.crt"]);
        assert!(!dir.path().join("10.0.0.1").exists());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("docker.io/hosts.toml")).unwrap(),
            "foreign"
        );
        assert!(matches!(
            certs.apply(&config(&[("../etc/passwd", "x")])),
            Err(FilesError::UnsafePath(_))
        ));
        assert!(owned_path(dir.path(), "/etc/passwd").is_err());
    }

    #[test]
    fn a_hosts_file_is_written_after_its_ca_and_removed_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let certs = CertsDir::new(dir.path().to_path_buf());
        // Sorted by name, the hosts file would come first.
        let direct = config(&[
            ("127.0.0.1:5443/hosts.toml", "h"),
            ("127.222.0.20/ca.crt", "c"),
        ]);
        assert_eq!(
            certs.apply(&direct).unwrap().written,
            ["127.222.0.20/ca.crt", "127.0.0.1:5443/hosts.toml"]
        );
        let other = config(&[("0.example/hosts.toml", "h"), ("0.example/ca.crt", "c")]);
        let out = certs.apply(&other).unwrap();
        assert_eq!(
            out.removed,
            ["127.0.0.1:5443/hosts.toml", "127.222.0.20/ca.crt"]
        );
        assert_eq!(out.written, ["0.example/ca.crt", "0.example/hosts.toml"]);
    }

    #[test]
    fn a_foreign_hosts_file_is_refused_and_a_bootstrap_one_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let certs = CertsDir::new(dir.path().to_path_buf());
        std::fs::create_dir_all(dir.path().join("harbor.example.com")).unwrap();
        let foreign = dir.path().join("harbor.example.com/hosts.toml");
        std::fs::write(&foreign, "server = \"https://harbor.example.com\"\n").unwrap();
        let proxy = config(&[
            (
                "harbor.example.com/hosts.toml",
                "# Managed by registry-addon: x\n",
            ),
            ("10.0.0.1/ca.crt", "c1"),
        ]);
        let err = certs.apply(&proxy).unwrap_err();
        assert!(matches!(err, FilesError::Foreign(_)), "{err}");
        assert!(
            err.to_string().contains("harbor.example.com/hosts.toml"),
            "{err}"
        );
        // Nothing written, the foreign file untouched.
        assert!(!dir.path().join("10.0.0.1").exists());
        assert!(
            std::fs::read_to_string(&foreign)
                .unwrap()
                .starts_with("server")
        );
        // A hosts file of the addon's own (bootstrap wrote it) is taken over.
        std::fs::write(&foreign, "# Managed by registry-addon: bootstrap\n").unwrap();
        assert_eq!(certs.apply(&proxy).unwrap().written.len(), 2);
        // Once owned, a hand edit is repaired as usual.
        std::fs::write(&foreign, "edited").unwrap();
        assert_eq!(
            certs.apply(&proxy).unwrap().written,
            ["harbor.example.com/hosts.toml"]
        );
    }

    #[test]
    fn an_empty_config_removes_every_owned_file_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let certs = CertsDir::new(dir.path().to_path_buf());
        std::fs::create_dir_all(dir.path().join("docker.io")).unwrap();
        std::fs::write(dir.path().join("docker.io/hosts.toml"), "foreign").unwrap();
        let proxy = config(&[("r.example:5443/hosts.toml", "h"), ("10.0.0.1/ca.crt", "c")]);
        certs.apply(&proxy).unwrap();
        let mode = std::fs::metadata(dir.path().join("r.example:5443/hosts.toml"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A file the operator added beside an owned one keeps its directory.
        std::fs::write(dir.path().join("10.0.0.1/client.cert"), "mine").unwrap();
        let out = certs.apply(&config(&[])).unwrap();
        // The hosts file before the CA it names.
        assert_eq!(
            out.removed,
            ["r.example:5443/hosts.toml", "10.0.0.1/ca.crt"]
        );
        assert!(!dir.path().join("r.example:5443").exists());
        assert!(dir.path().join("10.0.0.1/client.cert").exists());
        assert!(dir.path().join("docker.io/hosts.toml").exists());
        assert_eq!(certs.manifest(), Manifest::default());
        assert_eq!(certs.apply(&config(&[])).unwrap(), Outcome::default());
    }
}
