//! OCI Distribution client used by the syncer: listings, manifests, blobs, uploads and
//! cross-repository mounts, with Basic and Bearer authentication.

pub mod auth;
pub mod client;
pub mod error;
pub mod link;
pub mod reference;
pub mod verify;

pub use auth::Credentials;
pub use client::{
    BlobDownload, ClientOptions, HttpClients, Manifest, ManifestHead, Registry, UploadStart,
    build_http_client, build_http_clients, build_http_clients_with_agent,
    build_remote_http_clients,
};
pub use error::OciError;
pub use reference::{ImageReference, MirrorPath};

use oci_spec::image::{Descriptor, Digest, ImageIndex, ImageManifest};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST_V1_SIGNED: &str =
    "application/vnd.docker.distribution.manifest.v1+prettyjws";
pub const DOCKER_MANIFEST_V1: &str = "application/vnd.docker.distribution.manifest.v1+json";

/// Every manifest type we copy. A registry asked without one of these may convert (or
/// refuse) the manifest, which would change its digest.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v1+prettyjws, \
application/vnd.docker.distribution.manifest.v1+json";

/// Registries refuse larger manifests (the distribution spec's recommended limit).
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// A blob or manifest a manifest points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub digest: Digest,
    pub size: Option<u64>,
    pub media_type: String,
}

impl From<&Descriptor> for Reference {
    fn from(d: &Descriptor) -> Self {
        Reference {
            digest: d.digest().clone(),
            size: Some(d.size()),
            media_type: d.media_type().to_string(),
        }
    }
}

/// What a manifest needs to exist before it may be pushed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Dependencies {
    /// Child manifests (of an index or manifest list).
    pub manifests: Vec<Reference>,
    /// Config and layers (of an image manifest).
    pub blobs: Vec<Reference>,
}

/// Whether a media type is an index or manifest list.
pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
}

/// The `mediaType` field of a manifest body, for registries that serve no useful
/// Content-Type.
pub fn media_type_from_body(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(default, rename = "mediaType")]
        media_type: Option<String>,
        #[serde(default, rename = "schemaVersion")]
        schema_version: Option<u32>,
        #[serde(default)]
        manifests: Option<serde_json::Value>,
        #[serde(default)]
        signatures: Option<serde_json::Value>,
    }
    let probe: Probe = serde_json::from_slice(bytes).ok()?;
    if let Some(mt) = probe.media_type.filter(|m| !m.is_empty()) {
        return Some(mt);
    }
    match probe.schema_version {
        Some(1) if probe.signatures.is_some() => Some(DOCKER_MANIFEST_V1_SIGNED.into()),
        Some(1) => Some(DOCKER_MANIFEST_V1.into()),
        Some(2) if probe.manifests.is_some() => Some(OCI_INDEX.into()),
        Some(2) => Some(OCI_MANIFEST.into()),
        _ => None,
    }
}

/// Lists what a manifest refers to. Blobs that registries do not hold (foreign or
/// non-distributable layers with external URLs) are left out.
pub fn dependencies(media_type: &str, bytes: &[u8]) -> Result<Dependencies, String> {
    if is_index(media_type) {
        let index: ImageIndex =
            serde_json::from_slice(bytes).map_err(|e| format!("bad index: {e}"))?;
        return Ok(Dependencies {
            manifests: index.manifests().iter().map(Reference::from).collect(),
            blobs: Vec::new(),
        });
    }
    if media_type == DOCKER_MANIFEST_V1 || media_type == DOCKER_MANIFEST_V1_SIGNED {
        #[derive(serde::Deserialize)]
        struct V1 {
            #[serde(rename = "fsLayers", default)]
            fs_layers: Vec<V1Layer>,
        }
        #[derive(serde::Deserialize)]
        struct V1Layer {
            #[serde(rename = "blobSum")]
            blob_sum: Digest,
        }
        let v1: V1 =
            serde_json::from_slice(bytes).map_err(|e| format!("bad schema 1 manifest: {e}"))?;
        let mut blobs: Vec<Reference> = Vec::new();
        for layer in v1.fs_layers {
            if !blobs.iter().any(|b| b.digest == layer.blob_sum) {
                blobs.push(Reference {
                    digest: layer.blob_sum,
                    size: None,
                    media_type: String::new(),
                });
            }
        }
        return Ok(Dependencies {
            manifests: Vec::new(),
            blobs,
        });
    }
    // OCI and Docker image manifests, and artifacts built the same way.
    let manifest: ImageManifest =
        serde_json::from_slice(bytes).map_err(|e| format!("bad manifest: {e}"))?;
    let mut blobs: Vec<Reference> = Vec::new();
    for d in std::iter::once(manifest.config()).chain(manifest.layers().iter()) {
        if is_external(d) || blobs.iter().any(|b| &b.digest == d.digest()) {
            continue;
        }
        blobs.push(Reference::from(d));
    }
    Ok(Dependencies {
        manifests: Vec::new(),
        blobs,
    })
}

fn is_external(d: &Descriptor) -> bool {
    let has_urls = d.urls().as_ref().is_some_and(|u| !u.is_empty());
    let mt = d.media_type().to_string();
    has_urls && (mt.contains("foreign") || mt.contains("nondistributable"))
}

/// Checks a repository name against the distribution grammar: lower-case components of
/// letters and digits joined by `.`, `_`, `__` or dashes, separated by `/`. Peers' names
/// are put into URL paths, so nothing else may pass.
pub fn valid_repository(name: &str) -> bool {
    if name.is_empty() || name.len() > 255 {
        return false;
    }
    name.split('/').all(|component| {
        let b = component.as_bytes();
        let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
        if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
            return false;
        }
        let mut i = 0;
        while i < b.len() {
            if alnum(b[i]) {
                i += 1;
                continue;
            }
            // A separator run: ".", "_", "__" or any number of "-".
            let start = i;
            while i < b.len() && !alnum(b[i]) {
                i += 1;
            }
            let sep = &component[start..i];
            let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-');
            if !ok {
                return false;
            }
        }
        true
    })
}

/// Checks a tag: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
    const D3: &str = "sha256:3333333333333333333333333333333333333333333333333333333333333333";

    #[test]
    fn docker_manifest_list_children() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST_LIST}","manifests":[
            {{"mediaType":"{DOCKER_MANIFEST}","size":7,"digest":"{D1}","platform":{{"architecture":"amd64","os":"linux"}}}},
            {{"mediaType":"{DOCKER_MANIFEST}","size":9,"digest":"{D2}","platform":{{"architecture":"arm","os":"linux","variant":"v7"}}}}]}}"#
        );
        let deps = dependencies(DOCKER_MANIFEST_LIST, body.as_bytes()).unwrap();
        assert_eq!(deps.manifests.len(), 2);
        assert_eq!(deps.manifests[1].digest.as_ref(), D2);
        assert_eq!(deps.manifests[1].size, Some(9));
        assert!(deps.blobs.is_empty());
    }

    #[test]
    fn image_manifest_blobs_skip_foreign_and_duplicates() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}",
            "config":{{"mediaType":"application/vnd.docker.container.image.v1+json","size":3,"digest":"{D1}"}},
            "layers":[{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","size":5,"digest":"{D2}"}},
            {{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","size":5,"digest":"{D2}"}},
            {{"mediaType":"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip","size":5,"digest":"{D3}","urls":["https://x.example/l"]}}]}}"#
        );
        let deps = dependencies(DOCKER_MANIFEST, body.as_bytes()).unwrap();
        let digests: Vec<_> = deps.blobs.iter().map(|b| b.digest.to_string()).collect();
        assert_eq!(digests, vec![D1, D2]);
    }

    #[test]
    fn schema1_and_media_type_probe() {
        let body = format!(
            r#"{{"schemaVersion":1,"name":"a","tag":"t","fsLayers":[{{"blobSum":"{D1}"}},{{"blobSum":"{D1}"}}],"signatures":[]}}"#
        );
        assert_eq!(
            media_type_from_body(body.as_bytes()).as_deref(),
            Some(DOCKER_MANIFEST_V1_SIGNED)
        );
        let deps = dependencies(DOCKER_MANIFEST_V1_SIGNED, body.as_bytes()).unwrap();
        assert_eq!(deps.blobs.len(), 1);
        assert_eq!(
            media_type_from_body(br#"{"schemaVersion":2,"manifests":[]}"#).as_deref(),
            Some(OCI_INDEX)
        );
        assert_eq!(media_type_from_body(b"not json"), None);
        assert!(dependencies(OCI_MANIFEST, b"{}").is_err());
    }

    #[test]
    fn repository_and_tag_names() {
        for ok in ["a", "library/alpine", "a.b_c__d--e/f-g", "x0/1y"] {
            assert!(valid_repository(ok), "{ok}");
        }
        for bad in [
            "", "A", "a/../b", "..", "a//b", "a/", "-a", "a_.b", "a?b", "a b",
        ] {
            assert!(!valid_repository(bad), "{bad}");
        }
        for ok in ["latest", "v1.2.3-rc_1", "_x"] {
            assert!(valid_tag(ok), "{ok}");
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", &"x".repeat(129)] {
            assert!(!valid_tag(bad), "{bad}");
        }
    }
}
