//! Digest verification of streamed content: the bytes are hashed as they pass, and a stream
//! whose digest or length does not match ends in an error *before* its last byte is handed
//! on, so an upload fed by it is never completed with wrong content.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use oci_spec::image::{Digest, DigestAlgorithm};
use sha2::Digest as _;

/// Incremental hash for the algorithms registries use.
pub enum Hasher {
    Sha256(sha2::Sha256),
    Sha384(sha2::Sha384),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub fn new(algorithm: &DigestAlgorithm) -> Option<Self> {
        match algorithm {
            DigestAlgorithm::Sha256 => Some(Hasher::Sha256(sha2::Sha256::new())),
            DigestAlgorithm::Sha384 => Some(Hasher::Sha384(sha2::Sha384::new())),
            DigestAlgorithm::Sha512 => Some(Hasher::Sha512(sha2::Sha512::new())),
            _ => None,
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha384(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    /// `algorithm:hex`, the form digests are written in.
    pub fn finish(self) -> String {
        match self {
            Hasher::Sha256(h) => format!("sha256:{}", hex::encode(h.finalize())),
            Hasher::Sha384(h) => format!("sha384:{}", hex::encode(h.finalize())),
            Hasher::Sha512(h) => format!("sha512:{}", hex::encode(h.finalize())),
        }
    }
}

/// Digest of `data` with the algorithm of `like`; `None` for an algorithm we cannot compute.
pub fn digest_like(like: &Digest, data: &[u8]) -> Option<String> {
    let mut h = Hasher::new(like.algorithm())?;
    h.update(data);
    Some(h.finish())
}

/// The sha256 digest of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

/// What went wrong with a verified stream, readable after the stream has been consumed by
/// someone else (an HTTP client sending it as a request body).
#[derive(Clone, Default)]
pub struct VerifyReport {
    mismatch: Arc<Mutex<Option<(String, String)>>>,
    bytes: Arc<AtomicU64>,
}

impl VerifyReport {
    /// `(expected, actual)` when the content did not match.
    pub fn mismatch(&self) -> Option<(String, String)> {
        self.mismatch.lock().ok().and_then(|m| m.clone())
    }

    /// Bytes that went through so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn fail(&self, expected: &str, actual: String) {
        if let Ok(mut m) = self.mismatch.lock() {
            *m = Some((expected.to_string(), actual));
        }
    }
}

type Inner = Pin<Box<dyn Stream<Item = Result<Bytes, io::Error>> + Send>>;

/// How long a download may deliver nothing before it is given up.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// A byte stream checked against a digest and, when known, a size, and given up when it
/// stalls for longer than [`IDLE_TIMEOUT`].
pub struct VerifiedStream {
    inner: Inner,
    idle: Pin<Box<tokio::time::Sleep>>,
    idle_timeout: Duration,
    /// The idle timer runs: we asked for data and got none yet. Time the consumer takes
    /// between two reads (a slow upload) does not count.
    waiting: bool,
    hasher: Option<Hasher>,
    expected: Digest,
    size: Option<u64>,
    seen: u64,
    done: bool,
    report: VerifyReport,
}

impl VerifiedStream {
    pub fn new(
        inner: impl Stream<Item = Result<Bytes, reqwest::Error>> + Send + 'static,
        expected: Digest,
        size: Option<u64>,
    ) -> (Self, VerifyReport) {
        use futures::TryStreamExt;
        Self::from_io(inner.map_err(io::Error::other), expected, size)
    }

    /// As [`VerifiedStream::new`], for content read from a file rather than a registry.
    pub fn from_io(
        inner: impl Stream<Item = Result<Bytes, io::Error>> + Send + 'static,
        expected: Digest,
        size: Option<u64>,
    ) -> (Self, VerifyReport) {
        let report = VerifyReport::default();
        let stream = VerifiedStream {
            inner: Box::pin(inner),
            idle: Box::pin(tokio::time::sleep(IDLE_TIMEOUT)),
            idle_timeout: IDLE_TIMEOUT,
            waiting: false,
            hasher: Hasher::new(expected.algorithm()),
            expected,
            size,
            seen: 0,
            done: false,
            report: report.clone(),
        };
        (stream, report)
    }

    /// Gives up after `timeout` without data instead of [`IDLE_TIMEOUT`].
    pub fn with_idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    fn finish(&mut self) -> Result<(), io::Error> {
        self.done = true;
        let Some(hasher) = self.hasher.take() else {
            // An algorithm we cannot compute: the receiving registry still checks it.
            return Ok(());
        };
        let actual = hasher.finish();
        if actual == self.expected.as_ref() {
            Ok(())
        } else {
            self.report.fail(self.expected.as_ref(), actual.clone());
            Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("digest mismatch: expected {}, got {actual}", self.expected),
            ))
        }
    }

    fn wrong_size(&mut self, what: &str) -> io::Error {
        self.done = true;
        let expected = format!("{} ({} bytes)", self.expected, self.size.unwrap_or(0));
        self.report
            .fail(&expected, format!("{what} ({} bytes)", self.seen));
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "size mismatch: expected {expected}, got {what} ({} bytes)",
                self.seen
            ),
        )
    }
}

impl Stream for VerifiedStream {
    type Item = Result<Bytes, io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if !this.waiting {
            this.waiting = true;
            let deadline = tokio::time::Instant::now() + this.idle_timeout;
            this.idle.as_mut().reset(deadline);
        }
        let polled = this.inner.as_mut().poll_next(cx);
        if !matches!(polled, Poll::Pending) {
            this.waiting = false;
        }
        match polled {
            Poll::Pending => {
                if !this.done && this.idle.as_mut().poll(cx).is_ready() {
                    this.done = true;
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no data for {} s", this.idle_timeout.as_secs()),
                    ))));
                }
                Poll::Pending
            }
            Poll::Ready(Some(Err(err))) => {
                this.done = true;
                Poll::Ready(Some(Err(err)))
            }
            Poll::Ready(Some(Ok(chunk))) => {
                if this.done {
                    if chunk.is_empty() {
                        return Poll::Ready(Some(Ok(chunk)));
                    }
                    this.seen += chunk.len() as u64;
                    return Poll::Ready(Some(Err(this.wrong_size("more"))));
                }
                this.seen += chunk.len() as u64;
                if let Some(size) = this.size {
                    if this.seen > size {
                        return Poll::Ready(Some(Err(this.wrong_size("more"))));
                    }
                }
                if let Some(h) = this.hasher.as_mut() {
                    h.update(&chunk);
                }
                // Check before handing on the last byte: the receiver must never see a
                // complete body with the wrong content.
                if this.size == Some(this.seen) {
                    if let Err(err) = this.finish() {
                        return Poll::Ready(Some(Err(err)));
                    }
                }
                this.report
                    .bytes
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(None) => {
                if this.done {
                    return Poll::Ready(None);
                }
                if this.size.is_some() {
                    return Poll::Ready(Some(Err(this.wrong_size("less"))));
                }
                match this.finish() {
                    Ok(()) => Poll::Ready(None),
                    Err(err) => Poll::Ready(Some(Err(err))),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn chunks(parts: &[&'static [u8]]) -> impl Stream<Item = Result<Bytes, reqwest::Error>> {
        futures::stream::iter(
            parts
                .iter()
                .map(|p| Ok(Bytes::from_static(p)))
                .collect::<Vec<_>>(),
        )
    }

    async fn drain(mut s: VerifiedStream) -> (Vec<u8>, Option<io::Error>) {
        let mut out = Vec::new();
        while let Some(item) = s.next().await {
            match item {
                Ok(b) => out.extend_from_slice(&b),
                Err(e) => return (out, Some(e)),
            }
        }
        (out, None)
    }

    #[tokio::test]
    async fn passes_matching_content() {
        let d: Digest = sha256_digest(b"hello world").parse().unwrap();
        let (s, report) = VerifiedStream::new(chunks(&[b"hello ", b"world"]), d, Some(11));
        let (out, err) = drain(s).await;
        assert!(err.is_none());
        assert_eq!(out, b"hello world");
        assert_eq!(report.bytes(), 11);
        assert!(report.mismatch().is_none());
    }

    #[tokio::test]
    async fn withholds_last_chunk_on_mismatch() {
        let d: Digest = sha256_digest(b"hello world").parse().unwrap();
        let (s, report) = VerifiedStream::new(chunks(&[b"hello ", b"WORLD"]), d, Some(11));
        let (out, err) = drain(s).await;
        assert!(err.is_some());
        assert_eq!(
            out, b"hello ",
            "the corrupt last chunk must not be passed on"
        );
        assert!(report.mismatch().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_on_a_stalled_download() {
        let d: Digest = sha256_digest(b"hello").parse().unwrap();
        let stalled = chunks(&[b"he"]).chain(futures::stream::pending());
        let (s, _) = VerifiedStream::new(stalled, d, Some(5));
        let s = s.with_idle_timeout(Duration::from_secs(3));
        let (out, err) = drain(s).await;
        assert_eq!(out, b"he");
        assert_eq!(err.map(|e| e.kind()), Some(io::ErrorKind::TimedOut));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_consumer_is_not_a_stalled_download() {
        let d: Digest = sha256_digest(b"hello").parse().unwrap();
        let (s, _) = VerifiedStream::new(chunks(&[b"he", b"llo"]), d, Some(5));
        let mut s = s.with_idle_timeout(Duration::from_secs(3));
        assert!(s.next().await.unwrap().is_ok());
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(s.next().await.unwrap().is_ok());
        assert!(s.next().await.is_none());
    }

    #[tokio::test]
    async fn refuses_short_and_long_content() {
        let d: Digest = sha256_digest(b"hello world").parse().unwrap();
        let (s, _) = VerifiedStream::new(chunks(&[b"hello"]), d.clone(), Some(11));
        assert!(drain(s).await.1.is_some());
        let (s, _) = VerifiedStream::new(chunks(&[b"hello world", b"!"]), d.clone(), Some(11));
        assert!(drain(s).await.1.is_some());
        let (s, _) = VerifiedStream::new(chunks(&[b"hello world!"]), d.clone(), Some(11));
        assert!(drain(s).await.1.is_some());
        // Without a size, the digest is checked at the end.
        let (s, _) = VerifiedStream::new(chunks(&[b"hello world"]), d.clone(), None);
        assert!(drain(s).await.1.is_none());
        let (s, _) = VerifiedStream::new(chunks(&[b"hello"]), d, None);
        assert!(drain(s).await.1.is_some());
    }
}
