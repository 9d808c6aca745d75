//! `mirror pull`: images from their registries into a layout or archive.
//!
//! Each image's manifests are fetched and digest-checked first (children of an index too,
//! all platforms unless `--platform` narrows them), then its blobs are streamed in parallel
//! into the layout, each checked against its digest before it is renamed into place. The
//! image is recorded in `index.json` only once all of it is there, so an interrupted pull
//! leaves no entry pointing at missing blobs, and a rerun fetches only what is missing.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::StreamExt;
use oci_spec::image::{Descriptor, Digest, MediaType};
use tokio::sync::OnceCell;

use super::layout::LayoutWriter;
use super::progress::{Progress, human_bytes};
use super::{PullArgs, chain, client_options, credentials_for, http_clients};
use crate::oci::reference::ImageReference;
use crate::oci::verify::{VerifiedStream, sha256_digest};
use crate::oci::{HttpClients, Manifest, OciError, Reference, Registry, dependencies, is_index};
use crate::sync::CredentialSet;

/// Blob downloads at once per image (the registry client bounds the total per registry).
const BLOBS_PER_IMAGE: usize = 8;

/// A platform asked for with `--platform`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl std::str::FromStr for Platform {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok =
            |p: &&str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !(2..=3).contains(&parts.len()) || !parts.iter().all(ok) {
            return Err(format!(
                "--platform {s:?}: expected os/arch or os/arch/variant, e.g. linux/amd64"
            ));
        }
        Ok(Platform {
            os: parts[0].to_string(),
            architecture: parts[1].to_string(),
            variant: parts.get(2).map(|v| v.to_string()),
        })
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl Platform {
    fn matches(&self, platform: &serde_json::Value) -> bool {
        let field = |k: &str| platform.get(k).and_then(|v| v.as_str());
        field("os") == Some(self.os.as_str())
            && field("architecture") == Some(self.architecture.as_str())
            && self
                .variant
                .as_deref()
                .is_none_or(|v| field("variant") == Some(v))
    }
}

/// The images of the command line and of `--images FILE`, in order, without duplicates.
pub fn image_list(args: &PullArgs) -> anyhow::Result<Vec<String>> {
    let mut out: Vec<String> = args.images.clone();
    if let Some(file) = &args.images_file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("--images {}", file.display()))?;
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if !line.is_empty() {
                out.push(line.to_string());
            }
        }
    }
    let mut seen = HashSet::new();
    out.retain(|i| seen.insert(i.clone()));
    if out.is_empty() {
        bail!("no images given: name them as arguments or with --images FILE");
    }
    Ok(out)
}

struct Pull {
    layout: LayoutWriter,
    clients: HttpClients,
    auth: Option<CredentialSet>,
    platforms: Vec<Platform>,
    registries: Mutex<HashMap<String, Arc<OnceCell<Arc<Registry>>>>>,
    /// One download per blob digest in a run, however many images share it.
    blobs: Mutex<HashMap<Digest, Arc<OnceCell<()>>>>,
    fetched: AtomicU64,
    present: AtomicU64,
    progress: Progress,
}

pub async fn run(args: PullArgs) -> anyhow::Result<()> {
    let images = image_list(&args)?;
    let platforms = args
        .platforms
        .iter()
        .map(|p| p.parse::<Platform>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!(e))?;
    let auth = match &args.auth_file {
        Some(path) => {
            Some(CredentialSet::from_file(path).map_err(|e| anyhow::anyhow!("--auth-file: {e}"))?)
        }
        None => None,
    };
    let clients = http_clients(args.ca_file.as_deref())?;
    let layout = LayoutWriter::open(&args.to).map_err(|e| anyhow::anyhow!(e))?;
    let pull = Arc::new(Pull {
        layout,
        clients,
        auth,
        platforms,
        registries: Mutex::new(HashMap::new()),
        blobs: Mutex::new(HashMap::new()),
        fetched: AtomicU64::new(0),
        present: AtomicU64::new(0),
        progress: Progress::new(args.quiet, "pull"),
    });
    let total = images.len();
    let results: Vec<(String, Result<(), String>)> = futures::stream::iter(images)
        .map(|image| {
            let pull = pull.clone();
            async move {
                let result = pull.image(&image).await;
                (image, result)
            }
        })
        .buffer_unordered(args.parallel_images.max(1))
        .collect()
        .await;
    pull.progress.finish();
    let failed: Vec<_> = results.iter().filter(|(_, r)| r.is_err()).collect();
    for (image, result) in &failed {
        if let Err(reason) = result {
            pull.progress.failure(&format!("failed: {image}: {reason}"));
        }
    }
    // An archive is written once every image is in; until then its staging directory
    // keeps what a rerun resumes from.
    if failed.is_empty() || !super::layout::is_archive(&args.to) {
        pull.layout.finish().map_err(|e| anyhow::anyhow!(e))?;
    } else {
        pull.progress.failure(&format!(
            "archive {} not written: it is written once every image is in; what was copied stays in {} for the next run",
            args.to.display(),
            pull.layout.staging().display()
        ));
    }
    let fetched = pull.fetched.load(Ordering::Relaxed);
    let present = pull.present.load(Ordering::Relaxed);
    if !args.quiet {
        println!(
            "{} of {total} images pulled into {}, {} failed; fetched {fetched} bytes ({}), already present {present} bytes ({})",
            total - failed.len(),
            pull.layout.shown(),
            failed.len(),
            human_bytes(fetched),
            human_bytes(present),
        );
    }
    if !failed.is_empty() {
        bail!("{} of {total} images failed", failed.len());
    }
    Ok(())
}

impl Pull {
    /// The client of a registry host, made once per run. A registry on loopback is tried
    /// over HTTPS and, when that does not connect, over plain HTTP, as Docker does for
    /// `localhost`; every other registry is HTTPS only.
    async fn registry(&self, host: &str) -> Result<Arc<Registry>, String> {
        let cell = lock(&self.registries)
            .entry(host.to_string())
            .or_default()
            .clone();
        cell.get_or_try_init(|| async {
            if !is_loopback(host) {
                return self.client(host, "https", None);
            }
            // One try each: a refused connection need not be retried to choose the scheme.
            let probe = |scheme| self.client(host, scheme, Some(1));
            if !matches!(
                probe("https")?.ping().await,
                Err(OciError::Transport { .. })
            ) {
                return self.client(host, "https", None);
            }
            // Only a registry answer counts: a TLS server answers plain HTTP with a 400,
            // and then HTTPS and its certificate error are what to report.
            match probe("http")?.ping().await {
                Ok(()) | Err(OciError::Auth { .. } | OciError::Denied { .. }) => {
                    self.client(host, "http", None)
                }
                Err(_) => self.client(host, "https", None),
            }
        })
        .await
        .cloned()
    }

    fn client(
        &self,
        host: &str,
        scheme: &str,
        attempts: Option<u32>,
    ) -> Result<Arc<Registry>, String> {
        let credentials = self.auth.as_ref().and_then(|a| credentials_for(a, host));
        let mut options = client_options(credentials);
        if let Some(attempts) = attempts {
            options.attempts = attempts;
        }
        Ok(Arc::new(Registry::new(
            &format!("{scheme}://{host}"),
            self.clients.clone(),
            &options,
        )?))
    }

    async fn image(&self, image: &str) -> Result<(), String> {
        let reference = ImageReference::parse(image)?;
        let name = reference.to_string();
        let registry = self.registry(reference.api_host()).await?;
        let repo = reference.repository.as_str();
        let top = registry
            .get_manifest(repo, &reference.reference())
            .await
            .map_err(|e| match e.status() {
                Some(404) => format!("image not found ({})", chain(&e)),
                _ => chain(&e),
            })?;
        let top = self.select_platforms(&registry, repo, top).await?;
        let mut manifests: Vec<Manifest> = Vec::new();
        let mut blobs: Vec<Reference> = Vec::new();
        let mut pending = vec![top.clone()];
        let mut seen = HashSet::new();
        while let Some(manifest) = pending.pop() {
            if !seen.insert(manifest.digest.clone()) {
                continue;
            }
            let deps = dependencies(&manifest.media_type, &manifest.bytes)
                .map_err(|e| format!("manifest {}: {e}", manifest.digest))?;
            for child in deps.manifests {
                let child = registry
                    .get_manifest(repo, child.digest.as_ref())
                    .await
                    .map_err(|e| chain(&e))?;
                pending.push(child);
            }
            for blob in deps.blobs {
                if !blobs.iter().any(|b| b.digest == blob.digest) {
                    blobs.push(blob);
                }
            }
            manifests.push(manifest);
        }
        let blob_count = blobs.len();
        self.progress.message(name.clone());
        let results: Vec<Result<(), String>> = futures::stream::iter(blobs)
            .map(|blob| self.blob(&registry, repo, blob))
            .buffer_unordered(BLOBS_PER_IMAGE)
            .collect()
            .await;
        results.into_iter().collect::<Result<Vec<()>, String>>()?;
        for m in &manifests {
            self.layout
                .write_blob_bytes(&m.digest, &m.bytes)
                .await
                .map_err(|e| {
                    format!("layout {}: manifest {}: {e}", self.layout.shown(), m.digest)
                })?;
        }
        let descriptor = Descriptor::new(
            MediaType::from(top.media_type.as_str()),
            top.bytes.len() as u64,
            top.digest.clone(),
        );
        self.layout.add_image(descriptor, &name)?;
        self.progress.line(&format!(
            "pulled {name} ({} manifests, {blob_count} blobs)",
            manifests.len()
        ));
        Ok(())
    }

    /// With `--platform`, an index narrowed to the platforms asked for: the one matching
    /// manifest itself, or a new index of those that match. Without, the manifest as is.
    async fn select_platforms(
        &self,
        registry: &Registry,
        repo: &str,
        top: Manifest,
    ) -> Result<Manifest, String> {
        if self.platforms.is_empty() || !is_index(&top.media_type) {
            return Ok(top);
        }
        let mut index: serde_json::Value =
            serde_json::from_slice(&top.bytes).map_err(|e| format!("index {}: {e}", top.digest))?;
        let all = index
            .get("manifests")
            .and_then(|m| m.as_array())
            .cloned()
            .unwrap_or_default();
        let platform_of = |d: &serde_json::Value| d.get("platform").cloned().unwrap_or_default();
        let kept: Vec<serde_json::Value> = all
            .iter()
            .filter(|d| self.platforms.iter().any(|p| p.matches(&platform_of(d))))
            .cloned()
            .collect();
        if kept.is_empty() {
            let offered: Vec<String> = all
                .iter()
                .filter_map(|d| {
                    let p = platform_of(d);
                    Some(format!(
                        "{}/{}",
                        p.get("os")?.as_str()?,
                        p.get("architecture")?.as_str()?
                    ))
                })
                .collect();
            let asked: Vec<String> = self.platforms.iter().map(|p| p.to_string()).collect();
            return Err(format!(
                "no manifest for platform {} (the image has {})",
                asked.join(", "),
                if offered.is_empty() {
                    "none".to_string()
                } else {
                    offered.join(", ")
                }
            ));
        }
        if kept.len() == 1 {
            let digest = kept[0]
                .get("digest")
                .and_then(|d| d.as_str())
                .unwrap_or_default();
            return registry
                .get_manifest(repo, digest)
                .await
                .map_err(|e| chain(&e));
        }
        index["manifests"] = serde_json::Value::Array(kept);
        let bytes = serde_json::to_vec(&index).map_err(|e| format!("index: {e}"))?;
        let digest: Digest = sha256_digest(&bytes)
            .parse()
            .map_err(|e| format!("index digest: {e}"))?;
        Ok(Manifest {
            media_type: top.media_type,
            digest,
            bytes: Bytes::from(bytes),
        })
    }

    async fn blob(&self, registry: &Registry, repo: &str, blob: Reference) -> Result<(), String> {
        let cell = lock(&self.blobs)
            .entry(blob.digest.clone())
            .or_default()
            .clone();
        cell.get_or_try_init(|| async {
            let size = blob.size.unwrap_or(0);
            self.progress.add_total(size);
            if self.layout.has_blob(&blob.digest, blob.size) {
                self.present.fetch_add(size, Ordering::Relaxed);
                self.progress.advance(size);
                return Ok(());
            }
            self.download(registry, repo, &blob).await
        })
        .await
        .map(|_| ())
    }

    /// Streams a blob into the layout, retrying a transfer that broke or came out wrong.
    async fn download(
        &self,
        registry: &Registry,
        repo: &str,
        blob: &Reference,
    ) -> Result<(), String> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.download_once(registry, repo, blob).await {
                Ok(bytes) => {
                    self.fetched.fetch_add(bytes, Ordering::Relaxed);
                    return Ok(());
                }
                Err(err) if attempt < 3 && err.is_transient() => {
                    tracing::debug!(digest = %blob.digest, attempt, error = %err, "blob download failed, retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(300 << attempt)).await;
                }
                Err(err) => return Err(chain(&err)),
            }
        }
    }

    async fn download_once(
        &self,
        registry: &Registry,
        repo: &str,
        blob: &Reference,
    ) -> Result<u64, OciError> {
        let _permit = registry.blob_permit().await;
        let download = registry.get_blob(repo, &blob.digest).await?;
        let what = format!("blob {repo}@{}", blob.digest);
        if let (Some(expected), Some(served)) = (blob.size, download.size) {
            if expected != served {
                return Err(OciError::Invalid {
                    registry: registry.name().to_string(),
                    what,
                    reason: format!("serves {served} bytes, the manifest says {expected}"),
                });
            }
        }
        let size = blob.size.or(download.size);
        let (verified, report) = VerifiedStream::new(download.stream, blob.digest.clone(), size);
        let progress = self.progress.clone();
        let written = self
            .layout
            .write_blob(&blob.digest, verified, |n| progress.advance(n))
            .await;
        if let Some((expected, actual)) = report.mismatch() {
            return Err(OciError::DigestMismatch {
                registry: registry.name().to_string(),
                what,
                expected,
                actual,
            });
        }
        written.map_err(|e| OciError::Invalid {
            registry: registry.name().to_string(),
            what: format!("{what} into layout {}", self.layout.shown()),
            reason: e.to_string(),
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `localhost`, `127.0.0.0/8` or `::1`, with or without a port.
fn is_loopback(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_parse_and_match() {
        let p: Platform = "linux/arm64/v8".parse().unwrap();
        assert!(
            p.matches(&serde_json::json!({"os":"linux","architecture":"arm64","variant":"v8"}))
        );
        assert!(!p.matches(&serde_json::json!({"os":"linux","architecture":"arm64"})));
        let p: Platform = "linux/amd64".parse().unwrap();
        assert!(
            p.matches(&serde_json::json!({"os":"linux","architecture":"amd64","variant":"v2"}))
        );
        assert!(!p.matches(&serde_json::json!({"os":"windows","architecture":"amd64"})));
        for bad in ["linux", "linux/", "a/b/c/d", "linux/amd 64"] {
            assert!(bad.parse::<Platform>().is_err(), "{bad}");
        }
    }

    #[test]
    fn loopback_hosts() {
        for yes in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "127.3.2.1",
            "[::1]:5000",
        ] {
            assert!(is_loopback(yes), "{yes}");
        }
        for no in [
            "registry.k8s.io",
            "10.96.0.20:443",
            "[fd00::1]:5000",
            "localhost.example",
        ] {
            assert!(!is_loopback(no), "{no}");
        }
    }

    #[test]
    fn image_list_reads_file_with_comments() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("images.txt");
        std::fs::write(
            &file,
            "# base\nregistry.k8s.io/pause:3.10 # sandbox\n\n  nginx:1.27\nnginx:1.27\n",
        )
        .unwrap();
        let args = PullArgs {
            images: vec!["a.io/x:1".into()],
            images_file: Some(file),
            to: "out".into(),
            platforms: vec![],
            auth_file: None,
            ca_file: None,
            quiet: true,
            parallel_images: 1,
        };
        assert_eq!(
            image_list(&args).unwrap(),
            vec!["a.io/x:1", "registry.k8s.io/pause:3.10", "nginx:1.27"]
        );
    }
}
