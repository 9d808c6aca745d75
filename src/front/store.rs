//! Blobs read straight from the registry's storage, which the front mounts read-only.
//!
//! A pull is mostly blob GETs. Served by the registry behind, each one crosses the pod's
//! loopback twice (the registry writes it out, the front reads it in) before the front
//! encrypts it; read from the volume, it goes from the page cache to TLS once. The answer is
//! the registry's own: a blob is given out only where the registry would give it out, the
//! repository's link to the digest present (Distribution's filesystem layout,
//! `docker/registry/v2/`, unchanged since 2.0 and the same in 3.x), and the content is what
//! the registry stored under its digest.
//!
//! Anything else goes to the registry: a blob missing here (a cold blob of a pull-through
//! cache, which the registry fetches; an unknown one, which it answers 404), a request with
//! a `Range` or a condition, a manifest.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;

use super::proxy::Body;

/// Bytes read from the volume per file operation.
const CHUNK: usize = 256 * 1024;

/// Headers whose presence sends a request on to the registry, which handles them.
const HANDLED_BY_THE_REGISTRY: [header::HeaderName; 5] = [
    header::RANGE,
    header::IF_MATCH,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_UNMODIFIED_SINCE,
];

/// The registry's storage root (its `storage.filesystem.rootdirectory`), read-only.
pub struct BlobStore {
    v2: PathBuf,
}

/// A blob found in the store, open.
struct Stored {
    file: std::fs::File,
    size: u64,
    digest: String,
}

impl BlobStore {
    pub fn new(root: &Path) -> anyhow::Result<Self> {
        if !root.is_absolute() {
            anyhow::bail!("--blob-store {}: expected an absolute path", root.display());
        }
        Ok(BlobStore {
            v2: root.join("docker/registry/v2"),
        })
    }

    /// The answer to `request` from the store, or why the registry must answer it.
    pub async fn serve<B>(&self, request: &Request<B>) -> Lookup {
        let head = match *request.method() {
            Method::GET => false,
            Method::HEAD => true,
            _ => return Lookup::NotABlob,
        };
        if HANDLED_BY_THE_REGISTRY
            .iter()
            .any(|h| request.headers().contains_key(h))
        {
            return Lookup::NotABlob;
        }
        let Some((repository, hex)) = blob_of(request.uri().path()) else {
            return Lookup::NotABlob;
        };
        let link = self
            .v2
            .join("repositories")
            .join(repository)
            .join("_layers/sha256")
            .join(hex)
            .join("link");
        let data = self
            .v2
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data");
        let digest = format!("sha256:{hex}");
        let found = tokio::task::spawn_blocking(move || -> std::io::Result<Found> {
            // The link is the registry's record that the repository holds the blob.
            match std::fs::read(&link) {
                Ok(content) if content == digest.as_bytes() => {}
                // Being rewritten (Distribution 2.8 does it in place), or not ours to read.
                Ok(_) => return Ok(Found::Unsure),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Found::Absent),
                Err(e) => return Err(e),
            }
            let file = match std::fs::File::open(&data) {
                Ok(file) => file,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Found::Absent),
                Err(e) => return Err(e),
            };
            let size = file.metadata()?.len();
            Ok(Found::Stored(Stored { file, size, digest }))
        })
        .await;
        match found {
            Ok(Ok(Found::Stored(stored))) => Lookup::Served(answer(stored, head)),
            Ok(Ok(Found::Absent)) if !head => Lookup::Absent,
            Ok(Ok(_)) => Lookup::Unsure,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read a blob from the registry's storage; asking the registry");
                Lookup::Unsure
            }
            Err(_) => Lookup::Unsure,
        }
    }
}

/// What the store says about a request.
pub enum Lookup {
    /// Answered from the store.
    Served(Response<Body>),
    /// A GET of a blob the registry does not hold: neither its link nor its data is there.
    Absent,
    /// Not a plain GET or HEAD of a blob, for the registry to answer.
    NotABlob,
    /// For the registry to answer: a HEAD of a blob not there, a link being rewritten, a
    /// storage error.
    Unsure,
}

enum Found {
    Stored(Stored),
    Absent,
    Unsure,
}

/// `(repository, hex)` of `/v2/<repository>/blobs/sha256:<hex>`, both checked: a valid
/// repository name (no `..`, no empty component) and 64 lowercase hex digits.
pub fn blob_of(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/v2/")?;
    let (repository, digest) = rest.rsplit_once("/blobs/")?;
    let hex = digest.strip_prefix("sha256:")?;
    let valid_hex = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    (valid_hex && crate::oci::valid_repository(repository)).then_some((repository, hex))
}

fn answer(stored: Stored, head: bool) -> Response<Body> {
    let Stored { file, size, digest } = stored;
    let body: Body = if head || size == 0 {
        Empty::new().map_err(|never| match never {}).boxed()
    } else {
        StreamBody::new(chunks(Arc::new(file), size)).boxed()
    };
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    blob_headers(headers, &digest);
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    // Content addressed: never changes.
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("max-age=31536000"),
    );
    response
}

/// The registry's headers of a blob `digest`, besides its length: its type, digest and ETag.
pub fn blob_headers(headers: &mut http::HeaderMap, digest: &str) {
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(value) = HeaderValue::from_str(digest) {
        headers.insert("docker-content-digest", value);
    }
    if let Ok(value) = HeaderValue::from_str(&format!("\"{digest}\"")) {
        headers.insert(header::ETAG, value);
    }
}

type Chunk = Result<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>;

/// The file's `size` bytes, read off the runtime's threads a chunk at a time. A file that
/// ends early (it cannot: the registry never rewrites a blob) fails the body, so the client
/// sees a short read, never a wrong blob served whole.
fn chunks(file: Arc<std::fs::File>, size: u64) -> impl futures::Stream<Item = Chunk> {
    futures::stream::unfold(0u64, move |offset| {
        let file = file.clone();
        async move {
            if offset >= size {
                return None;
            }
            let want = (size - offset).min(CHUNK as u64) as usize;
            let read = tokio::task::spawn_blocking(move || {
                let mut buf = BytesMut::zeroed(want);
                let mut filled = 0;
                while filled < want {
                    match file.read_at(&mut buf[filled..], offset + filled as u64) {
                        Ok(0) => {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "the blob's file is shorter than when opened",
                            ));
                        }
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(buf.freeze())
            })
            .await;
            let item: Chunk = match read {
                Ok(Ok(bytes)) => Ok(Frame::data(bytes)),
                Ok(Err(e)) => Err(Box::new(e)),
                Err(e) => Err(Box::new(e)),
            };
            let next = if item.is_ok() {
                offset + want as u64
            } else {
                size
            };
            Some((item, next))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn only_blob_paths_of_valid_names_and_digests_are_taken() {
        let path = format!("/v2/library/alpine/blobs/sha256:{HEX}");
        assert_eq!(blob_of(&path), Some(("library/alpine", HEX)));
        for path in [
            format!("/v2/../etc/blobs/sha256:{HEX}"),
            format!("/v2/a/../b/blobs/sha256:{HEX}"),
            format!("/v2//blobs/sha256:{HEX}"),
            format!("/v2/Upper/blobs/sha256:{HEX}"),
            format!("/v2/a/blobs/sha512:{HEX}"),
            format!("/v2/a/blobs/sha256:{}", &HEX[..63]),
            format!("/v2/a/blobs/sha256:{}", HEX.to_uppercase()),
            format!("/v2/a/blobs/sha256:{HEX}/x"),
            format!("/v2/a/manifests/sha256:{HEX}"),
            "/v2/a/blobs/uploads/".to_string(),
        ] {
            assert_eq!(blob_of(&path), None, "{path}");
        }
    }
}
