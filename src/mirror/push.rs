//! `mirror push`: every image of a layout or archive into a registry, at the repository
//! containerd's `_default` mirror is asked for ([`ImageReference::mirror_path`]).
//!
//! Blobs the repository has are skipped (HEAD); a blob already in another repository of
//! the registry (pushed or found earlier in this run) is mounted; the others are streamed
//! from the layout, checked against their digest on the way, several at once. Manifests go
//! children first and the tag last: a push that fails half-way leaves no tag pointing at a
//! manifest whose blobs or children are missing, and a rerun sends only what is missing.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::bail;
use futures::StreamExt;
use oci_spec::image::{Descriptor, Digest};
use reqwest::Url;
use tokio::sync::OnceCell;

use super::layout::{CONTAINERD_NAME, LayoutReader, ref_name};
use super::progress::{Progress, human_bytes};
use super::{PushArgs, chain, client_options, credentials_for, http_clients};
use crate::oci::reference::ImageReference;
use crate::oci::{
    Credentials, MAX_MANIFEST_BYTES, Manifest, OciError, Reference, Registry, UploadStart,
    dependencies, media_type_from_body, valid_tag,
};
use crate::sync::CredentialSet;

/// Blob uploads at once per image (the registry client bounds the total).
const BLOBS_PER_IMAGE: usize = 8;

/// Where one image of the layout goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// How the image is named in messages: its full reference.
    pub label: String,
    pub repository: String,
    /// Pushed last; `None` pushes the image by digest only.
    pub tag: Option<String>,
}

/// Where a layout entry goes: a full name (`registry.k8s.io/pause:3.10`, as `mirror pull`
/// and oras write) by the `_default` path rule; a bare tag (as `skopeo copy … oci:DIR:TAG`
/// writes) into `--repository`, or else into containerd's full name when the entry has one.
pub fn target(entry: &Descriptor, repository: Option<&ImageReference>) -> Result<Target, String> {
    let annotations = entry.annotations().as_ref();
    let containerd_name = annotations.and_then(|a| a.get(CONTAINERD_NAME));
    let full = |name: &str| -> Result<Target, String> {
        let reference = ImageReference::parse(name)?;
        let path = reference.mirror_path();
        Ok(Target {
            label: reference.to_string(),
            repository: path.repository,
            // A name with a digest and no tag is pushed by digest only.
            tag: reference.tag,
        })
    };
    match ref_name(entry) {
        Some(name) if is_full_name(name) => full(name),
        Some(tag) => {
            if !valid_tag(tag) {
                return Err(format!(
                    "layout entry {}: ref name {tag:?} is neither an image reference nor a tag",
                    entry.digest()
                ));
            }
            match (repository, containerd_name) {
                (Some(repo), _) => {
                    let reference = repo.with_tag(tag);
                    Ok(Target {
                        label: reference.to_string(),
                        repository: reference.mirror_path().repository,
                        tag: Some(tag.to_string()),
                    })
                }
                (None, Some(name)) if is_full_name(name) => full(name),
                (None, _) => Err(format!(
                    "layout entry {tag:?} ({}) names only a tag: say where it goes with --repository",
                    entry.digest()
                )),
            }
        }
        None => match (repository, containerd_name) {
            (_, Some(name)) if is_full_name(name) => full(name),
            (Some(repo), _) => Ok(Target {
                label: format!("{}/{}@{}", repo.registry, repo.repository, entry.digest()),
                repository: repo.mirror_path().repository,
                tag: None,
            }),
            (None, _) => Err(format!(
                "layout entry {} has no name ({}): say where it goes with --repository",
                entry.digest(),
                super::layout::REF_NAME
            )),
        },
    }
}

/// A full image reference rather than a bare tag: tags hold no `/`, `:` or `@`.
fn is_full_name(name: &str) -> bool {
    name.contains(['/', ':', '@'])
}

/// Checks `--to`: an `http(s)://host[:port]` URL without a path.
pub fn registry_url(to: &str) -> Result<Url, String> {
    let help =
        "expected a registry URL such as https://10.96.0.20 or https://registry.example:5000";
    let url =
        Url::parse(to).map_err(|e| format!("--to {to:?} is not a registry URL ({e}): {help}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!("--to {to:?} is not a registry URL: {help}"));
    }
    if url.path() != "/" && !url.path().is_empty() || url.query().is_some() {
        return Err(format!(
            "--to {to:?}: a registry URL has no path; images go to the paths nodes ask for: {help}"
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("--to: put no credentials in the URL; use --username with --password-stdin, or --credentials-file".to_string());
    }
    Ok(url)
}

struct Push {
    layout: LayoutReader,
    registry: Registry,
    /// Blobs known to be in a repository.
    present: Mutex<HashSet<(String, Digest)>>,
    /// A repository of the registry holding each blob, to mount from.
    home: Mutex<HashMap<Digest, String>>,
    /// One upload per blob digest in a run; resolves to the repository it went into.
    uploads: Mutex<HashMap<Digest, Arc<OnceCell<String>>>>,
    sent: AtomicU64,
    skipped: AtomicU64,
    mounted: AtomicU64,
    progress: Progress,
}

pub async fn run(args: PushArgs, password: Option<String>) -> anyhow::Result<()> {
    let url = registry_url(&args.to).map_err(|e| anyhow::anyhow!(e))?;
    let host = match url.port() {
        Some(p) => format!("{}:{p}", url.host_str().unwrap_or_default()),
        None => url.host_str().unwrap_or_default().to_string(),
    };
    let credentials = match (&args.username, password, &args.credentials_file) {
        (Some(username), Some(password), _) => Some(Credentials {
            username: username.clone(),
            password,
        }),
        (_, _, Some(file)) => {
            let set = CredentialSet::from_file(file).map_err(|e| anyhow::anyhow!(e))?;
            Some(credentials_for(&set, &host).ok_or_else(|| {
                anyhow::anyhow!("credentials file {}: nothing for {host}", file.display())
            })?)
        }
        _ => None,
    };
    let repository = match &args.repository {
        Some(name) => {
            let last = name.rsplit('/').next().unwrap_or_default();
            if name.contains('@') || last.contains(':') {
                bail!(
                    "--repository {name:?}: an image name without tag or digest, e.g. registry.k8s.io/pause"
                );
            }
            Some(ImageReference::parse(name).map_err(|e| anyhow::anyhow!("--repository: {e}"))?)
        }
        None => None,
    };
    let layout = LayoutReader::open(&args.from).map_err(|e| anyhow::anyhow!(e))?;
    let clients = http_clients(args.ca_file.as_deref())?;
    let base = url.as_str().trim_end_matches('/');
    let registry = Registry::new(base, clients, &client_options(credentials))
        .map_err(|e| anyhow::anyhow!(e))?;
    if let Err(err) = registry.ping().await {
        match &err {
            OciError::Status { status, .. } => bail!(
                "--to {base}: does not answer the registry API (GET /v2/ answered HTTP {status})"
            ),
            OciError::Transport { .. } => bail!("cannot reach the registry: {}", chain(&err)),
            _ => bail!("{}", chain(&err)),
        }
    }
    let entries: Vec<Descriptor> = layout.index().manifests().clone();
    if entries.is_empty() {
        bail!(
            "layout {}: index.json lists no images",
            layout.path().display()
        );
    }
    let push = Arc::new(Push {
        layout,
        registry,
        present: Mutex::new(HashSet::new()),
        home: Mutex::new(HashMap::new()),
        uploads: Mutex::new(HashMap::new()),
        sent: AtomicU64::new(0),
        skipped: AtomicU64::new(0),
        mounted: AtomicU64::new(0),
        progress: Progress::new(args.quiet, "push"),
    });
    let total = entries.len();
    let results: Vec<(String, Result<(), String>)> = futures::stream::iter(entries)
        .map(|entry| {
            let push = push.clone();
            let repository = repository.clone();
            async move {
                let target = match target(&entry, repository.as_ref()) {
                    Ok(t) => t,
                    Err(e) => return (entry.digest().to_string(), Err(e)),
                };
                let result = push.image(&entry, &target).await;
                (target.label, result)
            }
        })
        .buffer_unordered(args.parallel_images.max(1))
        .collect()
        .await;
    push.progress.finish();
    let failed: Vec<_> = results.iter().filter(|(_, r)| r.is_err()).collect();
    for (label, result) in &failed {
        if let Err(reason) = result {
            push.progress.failure(&format!("failed: {label}: {reason}"));
        }
    }
    let sent = push.sent.load(Ordering::Relaxed);
    let skipped = push.skipped.load(Ordering::Relaxed);
    if !args.quiet {
        println!(
            "{} of {total} images pushed to {base}, {} failed; sent {sent} bytes ({}), skipped {skipped} bytes ({}), {} blobs mounted",
            total - failed.len(),
            failed.len(),
            human_bytes(sent),
            human_bytes(skipped),
            push.mounted.load(Ordering::Relaxed),
        );
    }
    if !failed.is_empty() {
        bail!("{} of {total} images failed", failed.len());
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Push {
    fn read_manifest(&self, digest: &Digest, media_type: &str) -> Result<Manifest, String> {
        let bytes = self.layout.read_blob(digest, MAX_MANIFEST_BYTES as u64)?;
        // The manifest's own `mediaType`, else its descriptor's, else a guess from its shape.
        let explicit = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| Some(v.get("mediaType")?.as_str()?.to_string()))
            .filter(|m| !m.is_empty());
        let media_type = explicit
            .or_else(|| Some(media_type.to_string()).filter(|m| !m.is_empty()))
            .or_else(|| media_type_from_body(&bytes))
            .ok_or_else(|| {
                format!(
                    "layout {}: manifest {digest} has no media type",
                    self.layout.path().display()
                )
            })?;
        Ok(Manifest {
            media_type,
            digest: digest.clone(),
            bytes,
        })
    }

    async fn image(&self, entry: &Descriptor, target: &Target) -> Result<(), String> {
        let repo = target.repository.as_str();
        let top = self.read_manifest(entry.digest(), entry.media_type().as_ref())?;
        // Children before parents: a post-order walk of the manifest tree.
        let mut order: Vec<Manifest> = Vec::new();
        let mut blobs: Vec<Reference> = Vec::new();
        let mut seen = HashSet::new();
        let mut stack: Vec<(Manifest, bool)> = vec![(top, false)];
        while let Some((manifest, expanded)) = stack.pop() {
            if expanded {
                order.push(manifest);
                continue;
            }
            if !seen.insert(manifest.digest.clone()) {
                continue;
            }
            let deps = dependencies(&manifest.media_type, &manifest.bytes).map_err(|e| {
                format!(
                    "layout {}: manifest {}: {e}",
                    self.layout.path().display(),
                    manifest.digest
                )
            })?;
            let children = deps
                .manifests
                .iter()
                .map(|c| self.read_manifest(&c.digest, &c.media_type))
                .collect::<Result<Vec<_>, _>>()?;
            for blob in deps.blobs {
                if !blobs.iter().any(|b| b.digest == blob.digest) {
                    blobs.push(blob);
                }
            }
            stack.push((manifest, true));
            stack.extend(children.into_iter().map(|c| (c, false)));
        }
        self.progress.message(target.label.clone());
        let results: Vec<Result<(), String>> = futures::stream::iter(blobs.iter())
            .map(|blob| self.blob(repo, blob))
            .buffer_unordered(BLOBS_PER_IMAGE)
            .collect()
            .await;
        results.into_iter().collect::<Result<Vec<()>, String>>()?;
        let Some((top, children)) = order.split_last() else {
            return Err("no manifest".into());
        };
        for child in children {
            self.put_manifest_once(repo, child).await?;
        }
        match &target.tag {
            Some(tag) => self
                .registry
                .put_manifest(repo, tag, top)
                .await
                .map_err(|e| chain(&e))?,
            None => self.put_manifest_once(repo, top).await?,
        }
        self.progress.line(&format!(
            "pushed {} to {repo}{} ({} manifests, {} blobs)",
            target.label,
            target
                .tag
                .as_ref()
                .map(|t| format!(":{t}"))
                .unwrap_or_default(),
            order.len(),
            blobs.len()
        ));
        Ok(())
    }

    async fn put_manifest_once(&self, repo: &str, manifest: &Manifest) -> Result<(), String> {
        let digest = manifest.digest.as_ref();
        let there = self
            .registry
            .head_manifest(repo, digest)
            .await
            .map_err(|e| chain(&e))?;
        if there.is_none() {
            self.registry
                .put_manifest(repo, digest, manifest)
                .await
                .map_err(|e| chain(&e))?;
        }
        Ok(())
    }

    fn is_in(&self, repo: &str, digest: &Digest) {
        lock(&self.present).insert((repo.to_string(), digest.clone()));
        lock(&self.home)
            .entry(digest.clone())
            .or_insert_with(|| repo.to_string());
    }

    fn skip(&self, bytes: u64) {
        self.skipped.fetch_add(bytes, Ordering::Relaxed);
        self.progress.add_total(bytes);
        self.progress.advance(bytes);
    }

    /// Makes a blob present in `repo`: already there, mounted, or uploaded.
    async fn blob(&self, repo: &str, blob: &Reference) -> Result<(), String> {
        let key = (repo.to_string(), blob.digest.clone());
        if lock(&self.present).contains(&key) {
            return Ok(());
        }
        let size = blob.size.unwrap_or(0);
        if self
            .registry
            .blob_exists(repo, &blob.digest)
            .await
            .map_err(|e| chain(&e))?
        {
            if lock(&self.present).insert(key) {
                self.skip(size);
            }
            self.is_in(repo, &blob.digest);
            return Ok(());
        }
        let cell = lock(&self.uploads)
            .entry(blob.digest.clone())
            .or_default()
            .clone();
        let home = cell
            .get_or_try_init(|| async {
                let home = lock(&self.home).get(&blob.digest).cloned();
                match home {
                    Some(home) if home != repo => self.mount_or_upload(repo, blob, &home).await?,
                    _ => self.upload(repo, blob, None).await?,
                }
                Ok::<String, String>(repo.to_string())
            })
            .await?
            .clone();
        if home != repo {
            self.mount_or_upload(repo, blob, &home).await?;
        }
        self.is_in(repo, &blob.digest);
        Ok(())
    }

    async fn mount_or_upload(
        &self,
        repo: &str,
        blob: &Reference,
        from: &str,
    ) -> Result<(), String> {
        let start = self
            .registry
            .start_upload(repo, Some((&blob.digest, from)))
            .await
            .map_err(|e| chain(&e))?;
        match start {
            UploadStart::Mounted => {
                self.mounted.fetch_add(1, Ordering::Relaxed);
                self.skip(blob.size.unwrap_or(0));
                Ok(())
            }
            // The registry declined the mount and opened an ordinary upload instead.
            UploadStart::Session(session) => self.upload(repo, blob, Some(session)).await,
        }
    }

    /// Streams a blob from the layout, retrying a broken transfer with a new session.
    async fn upload(
        &self,
        repo: &str,
        blob: &Reference,
        mut session: Option<Url>,
    ) -> Result<(), String> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let url = match session.take() {
                Some(url) => url,
                None => match self
                    .registry
                    .start_upload(repo, None)
                    .await
                    .map_err(|e| chain(&e))?
                {
                    UploadStart::Session(url) => url,
                    UploadStart::Mounted => return Ok(()),
                },
            };
            match self.upload_once(repo, blob, url.clone()).await {
                Ok(bytes) => {
                    self.sent.fetch_add(bytes, Ordering::Relaxed);
                    return Ok(());
                }
                Err(failure) => {
                    self.registry.cancel_upload(repo, url).await;
                    let retry = match &failure {
                        Failure::Layout(_) => false,
                        Failure::Registry(OciError::MonolithicRefused { .. }) => true,
                        Failure::Registry(e) => e.is_transient(),
                    };
                    if attempt >= 3 || !retry {
                        return Err(match failure {
                            Failure::Layout(e) => e,
                            Failure::Registry(e) => chain(&e),
                        });
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(300 << attempt)).await;
                }
            }
        }
    }

    async fn upload_once(
        &self,
        repo: &str,
        blob: &Reference,
        session: Url,
    ) -> Result<u64, Failure> {
        let (stream, report, size) = self
            .layout
            .blob_stream(&blob.digest)
            .map_err(Failure::Layout)?;
        let layout = self.layout.path().display();
        if let Some(expected) = blob.size {
            if expected != size {
                return Err(Failure::Layout(format!(
                    "layout {layout}: blob {} holds {size} bytes, its descriptor says {expected}",
                    blob.digest
                )));
            }
        }
        self.progress.add_total(size);
        let progress = self.progress.clone();
        let stream = stream.inspect(move |chunk| {
            if let Ok(c) = chunk {
                progress.advance(c.len() as u64);
            }
        });
        let _permit = self.registry.blob_permit().await;
        let result = if self.registry.chunked_uploads() {
            self.registry
                .upload_chunked(repo, session, &blob.digest, Some(size), stream)
                .await
        } else {
            self.registry
                .upload_monolithic(
                    repo,
                    session,
                    &blob.digest,
                    Some(size),
                    reqwest::Body::wrap_stream(stream),
                )
                .await
        };
        if let Some((_, actual)) = report.mismatch() {
            return Err(Failure::Layout(format!(
                "layout {layout}: blob {} does not match its digest (content is {actual})",
                blob.digest
            )));
        }
        result.map_err(Failure::Registry)?;
        Ok(report.bytes())
    }
}

enum Failure {
    /// The layout is wrong: trying again cannot help.
    Layout(String),
    Registry(OciError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::image::MediaType;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn entry(annotations: &[(&str, &str)]) -> Descriptor {
        let mut d = Descriptor::new(MediaType::ImageManifest, 10, D.parse::<Digest>().unwrap());
        if !annotations.is_empty() {
            d.set_annotations(Some(
                annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ));
        }
        d
    }

    const REF: &str = super::super::layout::REF_NAME;

    #[test]
    fn full_names_follow_the_default_mirror_rule() {
        let t = target(&entry(&[(REF, "registry.k8s.io/pause:3.10")]), None).unwrap();
        assert_eq!(
            (t.repository.as_str(), t.tag.as_deref()),
            ("pause", Some("3.10"))
        );
        let t = target(&entry(&[(REF, "docker.io/library/nginx:1.27")]), None).unwrap();
        assert_eq!(
            (t.repository.as_str(), t.tag.as_deref()),
            ("library/nginx", Some("1.27"))
        );
        let t = target(&entry(&[(REF, &format!("ghcr.io/a/b@{D}"))]), None).unwrap();
        assert_eq!((t.repository.as_str(), t.tag.as_deref()), ("a/b", None));
        let t = target(&entry(&[(REF, &format!("ghcr.io/a/b:v1@{D}"))]), None).unwrap();
        assert_eq!(t.tag.as_deref(), Some("v1"));
    }

    #[test]
    fn bare_tags_need_a_repository() {
        let e = entry(&[(REF, "3.10")]);
        let err = target(&e, None).unwrap_err();
        assert!(
            err.contains("--repository") && err.contains("3.10"),
            "{err}"
        );
        let repo = ImageReference::parse("registry.k8s.io/pause").unwrap();
        let t = target(&e, Some(&repo)).unwrap();
        assert_eq!(
            (t.repository.as_str(), t.tag.as_deref()),
            ("pause", Some("3.10"))
        );
        assert_eq!(t.label, "registry.k8s.io/pause:3.10");
        let repo = ImageReference::parse("nginx").unwrap();
        assert_eq!(target(&e, Some(&repo)).unwrap().repository, "library/nginx");
        // containerd's own name when there is no --repository.
        let e = entry(&[(REF, "v1"), (CONTAINERD_NAME, "quay.io/x/y:v1")]);
        assert_eq!(target(&e, None).unwrap().repository, "x/y");
        assert!(target(&entry(&[]), None).unwrap_err().contains("no name"));
    }

    #[test]
    fn to_must_be_a_registry_url() {
        assert!(registry_url("https://10.96.0.20").is_ok());
        assert!(registry_url("https://reg.example:5000/").is_ok());
        for bad in [
            "reg.example:5000",
            "10.96.0.20",
            "ftp://x",
            "https://r/v2/pause",
            "https://u:p@r",
            "not a url",
        ] {
            let err = registry_url(bad).unwrap_err();
            assert!(err.contains("--to"), "{bad}: {err}");
            assert!(!err.contains(":p@"), "{err}");
        }
    }
}
