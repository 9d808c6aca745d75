//! Proxy mode's way to the upstream (`--relay-listen`): the pull-through cache behind the front
//! has this relay, on the pod's loopback, as its `proxy.remoteurl`. The relay sends the cache's
//! requests on to the remote registry as Direct mode does (see [`super::remote`]: the path
//! prefix, Basic or token authentication with the mirror's credentials, the remote verified
//! with its CA, redirects followed), and downloads each blob once however many requests ask for
//! it at the same time.
//!
//! Why a relay, and not the registry talking to the upstream itself:
//! - Distribution 2.8 answers a cold blob from one download and fills its cache from a second,
//!   concurrent one of its own, so a cold pull moves every byte from the upstream twice. Both
//!   downloads reach the relay, which fetches the blob once and gives it to every request that
//!   asked for it meanwhile (or in the few seconds after: a small blob may be done before the
//!   second request arrives): a request keeping up with the download gets the bytes as they
//!   arrive, from memory; the blob is also spooled to a file, which requests that fall behind
//!   or come later read. The registry asks for a
//!   blob's size (HEAD) right before each download: the download starts at that HEAD, which
//!   is answered from its headers, saving a round trip to the upstream per blob.
//! - A client's cold blob is read by the front from the relay's download as it arrives
//!   ([`Relay::blob_for_client`]); the cache, told to store the blob once it is whole (see
//!   [`super::cache_fill`]), reads the same download from the spool.
//! - Distribution 2.8 sends its proxy credentials only to a token realm, never as Basic auth;
//!   the relay answers either.
//! - Distribution 2.8 reads the upstream's `/v2/` when it starts and exits when it cannot; the
//!   relay answers `/v2/` itself, so a replica restarted while the upstream is unreachable
//!   serves its cache.
//!
//! The relay listens on the pod's loopback only, like the registry: it adds the upstream
//! credentials and authenticates nobody, so nothing outside the pod may reach it.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::proxy::{self, Body, full};
use super::remote::{self, Remote};

/// Bytes read back from the spool per file operation (at most).
const CHUNK: usize = 256 * 1024;
/// Bytes spooled per write, about (a write starts too once [`PIECES`] pieces arrived, and at
/// the end): fewer, larger writes cost fewer wake-ups of the blocking pool per blob.
const BATCH: usize = 1024 * 1024;
/// The most pieces, as they arrived, kept in memory before they are spooled: every change
/// of what arrived hands readers a list of them.
const PIECES: usize = 128;
/// How long a finished download stays shared.
const GRACE: Duration = Duration::from_secs(10);
/// How long an answer other than the blob stays shared.
const WHOLE_GRACE: Duration = Duration::from_secs(2);
/// How long the upstream may keep a download waiting: for its answer, or for more bytes.
const IDLE: Duration = Duration::from_secs(60);
/// How long blobs are fetched unshared after the spool could not be written.
const SPOOL_BACKOFF: Duration = Duration::from_secs(30);
/// How long a download goes on while nobody reads it.
const UNREAD_LIMIT: Duration = Duration::from_secs(2);
/// The largest answer other than 200 that is kept to give every waiting request.
const WHOLE_LIMIT: usize = 1 << 20;
/// Spool files kept once their download is forgotten, for the next downloads to write over
/// (see [`Spools`]).
const IDLE_SPOOLS: usize = 4;
/// The most bytes the kept spool files hold together: a larger file is cut to what is left.
const IDLE_SPOOL_BYTES: u64 = 1 << 30;
/// How long a kept spool file waits for a download before it is closed.
const IDLE_SPOOL_KEEP: Duration = Duration::from_secs(300);
/// The smallest spool file kept, and the smallest blob spooled into a kept file: a smaller file
/// would keep a slot for few pages, and a smaller blob allocates few pages of its own and would
/// hold a kept file a large blob may need.
const IDLE_SPOOL_MIN: u64 = BATCH as u64;

/// Metrics of the relay, registered by the front.
#[derive(Clone, Default)]
pub struct RelayMetrics {
    /// Blob downloads from the remote started for the cache.
    pub downloads: Counter,
    /// Requests for a blob answered from a download another request started.
    pub shared: Counter,
    /// Downloads spooled into a kept spool file, written over, instead of a new one.
    pub spools_reused: Counter,
    /// Spool files kept for the next downloads.
    pub spools_idle: Gauge,
}

/// The relay of one front.
pub struct Relay {
    remote: Arc<Remote>,
    /// The blob downloads under way or recently finished, by the cache's request path.
    flights: Mutex<HashMap<String, Arc<Flight>>>,
    spools: Arc<Spools>,
    metrics: RelayMetrics,
}

/// A download, to learn when it has finished. While held it counts as a reader, so the
/// download is never given up as unread: it goes on to its end even if the client that asked
/// for it goes away, for the cache to store.
pub struct Finished {
    outcome: Outcome,
    _reading: watch::Receiver<State>,
}

impl Finished {
    /// Whether the download completed, the whole blob checked.
    pub async fn succeeded(mut self) -> bool {
        match self.outcome.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.unwrap_or(false),
            Err(_) => false,
        }
    }
}

/// A write of arrived pieces to the spool, carrying the digest computed so far.
type Spooling = tokio::task::JoinHandle<std::io::Result<Option<Sha256>>>;

/// How a download ended, once it did: whether it completed, the whole blob checked.
type Outcome = watch::Receiver<Option<bool>>;

/// One download of a blob, shared by the requests for it.
struct Flight {
    file: Arc<Spool>,
    state: watch::Sender<State>,
    /// Once it ended: whether it completed, the whole blob checked.
    outcome: watch::Sender<Option<bool>>,
}

impl Piece {
    /// The piece of `newest` and those before it that holds byte `offset`.
    fn holding(newest: &Option<Arc<Piece>>, offset: u64) -> Option<&Piece> {
        let mut piece = newest.as_deref();
        while let Some(p) = piece
            && p.at > offset
        {
            piece = p.before.as_deref();
        }
        piece.filter(|p| offset < p.at + p.bytes.len() as u64)
    }
}

/// The bytes that arrived after those in the spool, newest first: publishing one more is
/// constant work, and a reader keeping up finds its bytes at the head. At most [`PIECES`]
/// long: spooled before it grows longer.
struct Piece {
    /// Where its bytes are in the blob.
    at: u64,
    bytes: Bytes,
    before: Option<Arc<Piece>>,
}

/// The spool of one download: its file, given to it by its first write, once the blob's size
/// is known (a kept file that fits it, see [`Spools`], or a new one, unlinked when created).
/// When the download is forgotten (10 s after it finished) and its last reader is done, the
/// file is kept for a later download to write over, or closed, which frees its space.
struct Spool {
    file: std::sync::OnceLock<std::fs::File>,
    spools: Arc<Spools>,
    /// Cleared when a write to it failed: a full or failing volume gets its space back.
    keep: std::sync::atomic::AtomicBool,
}

impl Spool {
    fn new(spools: &Arc<Spools>) -> Self {
        Spool {
            file: std::sync::OnceLock::new(),
            spools: spools.clone(),
            keep: std::sync::atomic::AtomicBool::new(true),
        }
    }

    /// The file, for reading what was spooled.
    fn file(&self) -> std::io::Result<&std::fs::File> {
        // Set by the first write, before anything is spooled.
        self.file
            .get()
            .ok_or_else(|| std::io::Error::other("the spool has no file"))
    }

    /// The file, for writing: given by the first write, for a blob of `len` bytes (blocking).
    fn file_to_write(&self, len: Option<u64>) -> std::io::Result<&std::fs::File> {
        if let Some(file) = self.file.get() {
            return Ok(file);
        }
        // One write at a time: nothing else sets it.
        let file = self.spools.file_for(len)?;
        Ok(self.file.get_or_init(|| file))
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        // Closing the last handle of a large unlinked file frees its blocks, and keeping one
        // may cut it: not on the runtime's threads.
        if let (Some(file), Ok(runtime)) = (self.file.take(), tokio::runtime::Handle::try_current())
        {
            let spools = self.spools.clone();
            let keep = self.keep.load(Ordering::Relaxed);
            let handle = runtime.clone();
            runtime.spawn_blocking(move || {
                if keep {
                    spools.keep(file, &handle);
                }
            });
        }
    }
}

/// The relay's spool directory: new spool files, and those of forgotten downloads, kept for
/// the next downloads to write over.
///
/// A file's pages stay in the page cache while it is open: a download written into a kept
/// file copies its bytes into memory the kernel already holds, where a new file allocates a
/// page for every 4 KiB (and frees them all again when it is closed). That allocation costs
/// about as much as the rest of the relay's work per byte where the machine's free memory is
/// handed back to a hypervisor. At most [`IDLE_SPOOLS`] files of [`IDLE_SPOOL_BYTES`] in all
/// are kept, each for [`IDLE_SPOOL_KEEP`]; the kernel may write their pages to the volume
/// meanwhile, as it does for any file kept open that long. A download takes the smallest kept
/// file that holds its blob, or the largest when none does, and none for a blob under
/// [`IDLE_SPOOL_MIN`].
struct Spools {
    dir: PathBuf,
    /// Spool files created, for their names.
    created: AtomicU64,
    files: Mutex<Vec<IdleSpool>>,
    next: AtomicU64,
    /// Until when no file is kept, and blobs are fetched unshared: the spool could not be
    /// written (the volume full or failing).
    broken_until: Mutex<Option<Instant>>,
    gauge: Gauge,
    reused: Counter,
}

struct IdleSpool {
    id: u64,
    len: u64,
    file: std::fs::File,
}

impl Spools {
    fn new(dir: &Path, gauge: Gauge, reused: Counter) -> Self {
        Spools {
            dir: dir.to_path_buf(),
            created: AtomicU64::new(0),
            files: Mutex::new(Vec::new()),
            next: AtomicU64::new(0),
            broken_until: Mutex::new(None),
            gauge,
            reused,
        }
    }

    /// A spool file for a blob of `len` bytes (unknown: `None`), at its start: a kept one if
    /// one is for it, else a new one (blocking).
    fn file_for(&self, len: Option<u64>) -> std::io::Result<std::fs::File> {
        match self.take(len) {
            Some(file) => {
                self.reused.inc();
                Ok(file)
            }
            None => self.create(),
        }
    }

    /// A new spool file, unlinked at once.
    fn create(&self) -> std::io::Result<std::fs::File> {
        let n = self.created.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!(".relay-{}-{n}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        std::fs::remove_file(&path)?;
        Ok(file)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<IdleSpool>> {
        // Every change under this lock is a single push, pop or removal.
        self.files.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The kept file for a blob of `len` bytes (unknown: `None`), its position at the start:
    /// the smallest that holds it, else the largest, whose pages hold its start; none for a
    /// blob under [`IDLE_SPOOL_MIN`] (blocking).
    fn take(&self, len: Option<u64>) -> Option<std::fs::File> {
        use std::io::Seek;
        if len.is_some_and(|len| len < IDLE_SPOOL_MIN) {
            return None;
        }
        loop {
            let mut file = {
                let mut files = self.lock();
                let by_len = || files.iter().enumerate().map(|(at, f)| (f.len, at));
                let fitting = by_len()
                    .filter(|(held, _)| len.is_some_and(|len| *held >= len))
                    .min();
                let (_, at) = fitting.or_else(|| by_len().max())?;
                let taken = files.remove(at).file;
                self.gauge.set(files.len() as i64);
                taken
            };
            // A file that cannot be rewound is closed; the next is tried.
            if file.rewind().is_ok() {
                return Some(file);
            }
        }
    }

    /// Keeps `file` if there is room, cut to what is left of [`IDLE_SPOOL_BYTES`], and closes
    /// it after [`IDLE_SPOOL_KEEP`] unless a download took it (blocking).
    fn keep(self: &Arc<Self>, file: std::fs::File, runtime: &tokio::runtime::Handle) {
        if self.broken() {
            return;
        }
        let Ok(mut len) = file.metadata().map(|m| m.len()) else {
            return;
        };
        if len < IDLE_SPOOL_MIN {
            return;
        }
        // Cut outside the lock (that frees blocks); the room is checked again before keeping.
        let Some((_, room)) = Self::room(&self.lock(), len) else {
            return;
        };
        if len > room {
            if file.set_len(room).is_err() {
                return;
            }
            len = room;
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let evicted = {
            let mut files = self.lock();
            let Some((evict, _)) = Self::room(&files, len).filter(|(_, room)| len <= *room) else {
                return;
            };
            let evicted = evict.map(|at| files.remove(at));
            files.push(IdleSpool { id, len, file });
            self.gauge.set(files.len() as i64);
            evicted
        };
        // Closed once the lock is released: that frees its blocks.
        drop(evicted);
        let idle = self.clone();
        runtime.spawn(async move {
            tokio::time::sleep(IDLE_SPOOL_KEEP).await;
            let expired = {
                let mut files = idle.lock();
                let expired = files
                    .iter()
                    .position(|f| f.id == id)
                    .map(|at| files.remove(at));
                idle.gauge.set(files.len() as i64);
                expired
            };
            if let Some(expired) = expired {
                tokio::task::spawn_blocking(move || drop(expired));
            }
        });
    }

    /// The room a file of `len` bytes would have among `files`, and the kept file to close for
    /// it: when every slot is taken, a larger file replaces the smallest. `None` when it would
    /// not be kept.
    fn room(files: &[IdleSpool], len: u64) -> Option<(Option<usize>, u64)> {
        let mut held: u64 = files.iter().map(|f| f.len).sum();
        let mut evict = None;
        if files.len() >= IDLE_SPOOLS {
            let (at, smallest) = files.iter().enumerate().min_by_key(|(_, f)| f.len)?;
            if smallest.len >= len {
                return None;
            }
            held -= smallest.len;
            evict = Some(at);
        }
        let room = IDLE_SPOOL_BYTES.saturating_sub(held);
        (room >= IDLE_SPOOL_MIN).then_some((evict, room))
    }

    /// Whether the spool could not be written a moment ago.
    fn broken(&self) -> bool {
        self.broken_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|until| Instant::now() < until)
    }

    /// The spool is broken until `until`: keeps no file until then, and gives back every kept
    /// file, to be closed off the runtime's threads.
    #[must_use]
    fn release(&self, until: Instant) -> Vec<IdleSpool> {
        *self.broken_until.lock().unwrap_or_else(|e| e.into_inner()) = Some(until);
        let mut files = self.lock();
        self.gauge.set(0);
        std::mem::take(&mut *files)
    }
}

impl Flight {
    fn failed(&self) -> bool {
        matches!(
            &*self.state.borrow(),
            State::Streaming {
                end: Some(Err(_)),
                ..
            }
        )
    }
}

#[derive(Clone)]
enum State {
    /// Waiting for the remote's answer.
    Asking,
    /// 200: the answer's headers, what has arrived so far, and how the download ended.
    Streaming {
        head: Arc<HeaderMap>,
        /// The bytes a reader may give out: all that arrived but the last byte, until the
        /// whole blob is checked.
        readable: u64,
        /// The bytes written to the spool.
        spooled: u64,
        /// What arrived after those and is not yet being written to the spool, what is
        /// being written, before it, and the last batch written, before that: readers keeping
        /// up with the download, or a little behind, take their bytes from here.
        pending: Option<Arc<Piece>>,
        writing: Option<Arc<Piece>>,
        written: Option<Arc<Piece>>,
        end: Option<Result<(), Arc<str>>>,
    },
    /// Any other answer, whole: given to every request as it is.
    Whole(Arc<(StatusCode, HeaderMap, Bytes)>),
}

impl Relay {
    /// Checks that blobs can be spooled in `spool`.
    pub fn new(remote: Arc<Remote>, spool: &Path, metrics: RelayMetrics) -> anyhow::Result<Self> {
        let spools = Spools::new(
            spool,
            metrics.spools_idle.clone(),
            metrics.spools_reused.clone(),
        );
        spools
            .create()
            .map_err(|e| anyhow::anyhow!("--relay-spool {}: {e}", spool.display()))?;
        Ok(Relay {
            remote,
            flights: Mutex::new(HashMap::new()),
            spools: Arc::new(spools),
            metrics,
        })
    }

    /// Serves the relay on `listener` (plain HTTP/1.1).
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        crate::metrics::serve_http1(listener, "relay", move |req| self.clone().handle(req)).await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Flight>>> {
        // Every change under this lock is a single insert or remove.
        self.flights.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        let method = request.method().clone();
        if method != Method::GET && method != Method::HEAD {
            return remote::push_refused("this relay only pulls from the upstream");
        }
        let path = request.uri().path().to_string();
        if path == "/v2/" || path == "/v2" {
            // The registry's check that the upstream speaks the API, answered here: it must
            // start, and serve its cache, while the upstream is unreachable.
            let mut response = Response::new(full(Bytes::from_static(b"{}")));
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            headers.insert(
                "docker-distribution-api-version",
                HeaderValue::from_static("registry/2.0"),
            );
            return response;
        }
        let blob = path.rsplit('/').nth(1) == Some("blobs");
        if !blob || request.headers().contains_key(header::RANGE) {
            return self.remote.forward(request).await;
        }
        let head = method == Method::HEAD;
        let (parts, body) = request.into_parts();
        let Some((file, receiver, _)) = self.join_or_start(&path, &parts, head) else {
            return self.remote.forward(Request::from_parts(parts, body)).await;
        };
        if head {
            // The registry asks for a blob's size right before it fetches the blob: the
            // download starts here, and the HEAD is answered from its headers.
            return head_of(receiver).await;
        }
        reader(file, receiver).await
    }

    /// A client's GET of a blob the cache does not hold (Proxy mode, through the front): the
    /// blob as the relay downloads it, given out as it arrives, instead of through
    /// the cache, which asks the relay for the same download when told to store the blob.
    /// `None` when the cache is to answer: the request has a range, the blob cannot be
    /// spooled, or the upstream's answer is not the blob (the cache then gives its own).
    /// With the answer, when this request started the download, the download to tell the
    /// cache of once it has finished.
    pub async fn blob_for_client<B>(
        self: &Arc<Self>,
        request: &Request<B>,
    ) -> Option<(Response<Body>, Option<Finished>)> {
        if request.method() != Method::GET || request.headers().contains_key(header::RANGE) {
            return None;
        }
        let path = request.uri().path();
        let digest = path.rsplit_once("/blobs/")?.1.to_string();
        // The cache's own request for it: the path alone (no `ns`), its Accept and User-Agent.
        let mut flight_request = Request::get(path).body(()).ok()?;
        for name in [header::ACCEPT, header::USER_AGENT] {
            if let Some(value) = request.headers().get(&name) {
                flight_request.headers_mut().insert(name, value.clone());
            }
        }
        let (parts, ()) = flight_request.into_parts();
        let (file, mut receiver, outcome) = self.join_or_start(path, &parts, false)?;
        let tell = outcome.map(|outcome| Finished {
            outcome,
            _reading: receiver.clone(),
        });
        loop {
            match &*receiver.borrow_and_update() {
                State::Streaming { .. } => break,
                State::Whole(_) => return None,
                State::Asking => {}
            }
            if receiver.changed().await.is_err() {
                return None;
            }
        }
        let mut response = reader(file, receiver).await;
        if response.status() != StatusCode::OK {
            return None;
        }
        // The registry's headers for a blob, not the upstream's (or its object store's).
        let length = response.headers().get(header::CONTENT_LENGTH).cloned();
        let headers = response.headers_mut();
        headers.clear();
        if let Some(length) = length {
            headers.insert(header::CONTENT_LENGTH, length);
        }
        super::store::blob_headers(headers, &digest);
        Some((response, tell))
    }

    /// Joins the download of `path` under way, or starts it: the spool and its state to read
    /// the blob from, and, when this request started it, its outcome once it ended. `None`
    /// when it cannot be spooled, to be fetched unshared.
    fn join_or_start(
        self: &Arc<Self>,
        path: &str,
        request: &http::request::Parts,
        head: bool,
    ) -> Option<(Arc<Spool>, watch::Receiver<State>, Option<Outcome>)> {
        let mut flights = self.lock();
        if let Some((file, state)) = self.join_in(&flights, path, head) {
            return Some((file, state, None));
        }
        if self.spools.broken() {
            return None;
        }
        let spool = Arc::new(Spool::new(&self.spools));
        let (state, receiver) = watch::channel(State::Asking);
        let flight = Arc::new(Flight {
            file: spool.clone(),
            state,
            outcome: watch::Sender::new(None),
        });
        flights.insert(path.to_string(), flight.clone());
        drop(flights);
        self.metrics.downloads.inc();
        // Whatever started it, the download is an unconditional GET of the whole blob.
        let mut headers = HeaderMap::new();
        for name in [header::ACCEPT, header::USER_AGENT] {
            if let Some(value) = request.headers.get(&name) {
                headers.insert(name, value.clone());
            }
        }
        let outcome = flight.outcome.subscribe();
        tokio::spawn(
            self.clone()
                .download(path.to_string(), flight, request.uri.clone(), headers),
        );
        Some((spool, receiver, Some(outcome)))
    }

    /// The download of `path` under way (not failed), joined.
    fn join_in(
        &self,
        flights: &HashMap<String, Arc<Flight>>,
        path: &str,
        head: bool,
    ) -> Option<(Arc<Spool>, watch::Receiver<State>)> {
        // A download that failed is about to be forgotten: this request starts anew.
        let flight = flights.get(path).filter(|f| !f.failed())?;
        if !head {
            self.metrics.shared.inc();
        }
        Some((flight.file.clone(), flight.state.subscribe()))
    }

    /// Downloads the blob into the flight's spool, and forgets the flight when it failed or
    /// some time after it finished.
    async fn download(
        self: Arc<Self>,
        path: String,
        flight: Arc<Flight>,
        uri: http::Uri,
        headers: HeaderMap,
    ) {
        let ok = self.fill(&flight, &uri, &headers).await;
        flight.outcome.send_replace(Some(ok));
        if ok {
            tokio::time::sleep(GRACE).await;
        } else if matches!(&*flight.state.borrow(), State::Whole(_)) {
            // An answer other than the blob (404, a refusal) is given to the requests that
            // follow at once too: the cache asking after a client was refused it, say.
            tokio::time::sleep(WHOLE_GRACE).await;
        }
        let mut flights = self.lock();
        if flights.get(&path).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
            flights.remove(&path);
        }
    }

    /// Fetches the blob and spools it, publishing each step; whether it all arrived, whole and
    /// matching its digest.
    async fn fill(&self, flight: &Flight, uri: &http::Uri, headers: &HeaderMap) -> bool {
        let fetched = tokio::time::timeout(IDLE, self.remote.fetch(&Method::GET, uri, headers));
        let resp = match fetched.await {
            Ok(Ok(resp)) if resp.status() == StatusCode::OK => resp,
            Ok(Ok(resp)) => {
                let whole = whole(self.remote.streamed(resp)).await;
                flight.state.send_replace(State::Whole(Arc::new(whole)));
                return false;
            }
            Ok(Err(answer)) => {
                let whole = whole(answer).await;
                flight.state.send_replace(State::Whole(Arc::new(whole)));
                return false;
            }
            Err(_) => {
                let message = format!(
                    "remote registry {} did not answer within {}s",
                    self.remote.host(),
                    IDLE.as_secs()
                );
                tracing::warn!(remote = %self.remote.host(), error = %message, "relayed blob download failed");
                let whole = whole(proxy::error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "UNAVAILABLE",
                    &message,
                ))
                .await;
                flight.state.send_replace(State::Whole(Arc::new(whole)));
                return false;
            }
        };
        let expected = resp.content_length();
        // The last byte is given out only once the whole blob is checked: a reader of a blob
        // that fails its check never gets a complete answer.
        let held_back = |received: u64| match expected {
            Some(n) => received.min(n.saturating_sub(1)),
            None => received.saturating_sub(1),
        };
        let mut head = resp.headers().clone();
        proxy::strip_hop_by_hop(&mut head);
        let head = Arc::new(head);
        // What readers are handed: `pending` (arrived, not yet being spooled), `writing`
        // (being spooled) and `written` (the batch spooled last), each newest first.
        let publish = |readable: u64,
                       spooled: u64,
                       [pending, writing, written]: [&Option<Arc<Piece>>; 3],
                       end: Option<Result<(), Arc<str>>>| {
            flight.state.send_replace(State::Streaming {
                head: head.clone(),
                readable,
                spooled,
                pending: pending.clone(),
                writing: writing.clone(),
                written: written.clone(),
                end,
            });
        };
        publish(0, 0, [&None; 3], None);
        // The path ends in the blob's digest: checked as the bytes are spooled.
        let digest = uri.path().rsplit('/').next().unwrap_or_default();
        let mut hasher = digest.strip_prefix("sha256:").map(|_| Sha256::new());
        let mut stream = resp.bytes_stream();
        // Arrived, not yet being spooled: the next write, and as given to readers meanwhile.
        let mut arrived: Vec<Bytes> = Vec::new();
        let mut arrived_len = 0usize;
        let mut pending: Option<Arc<Piece>> = None;
        // The write under way while the next pieces arrive: its task and length (its pieces
        // are `writing`).
        let mut write: Option<(Spooling, u64)> = None;
        let mut writing: Option<Arc<Piece>> = None;
        let mut written: Option<Arc<Piece>> = None;
        let mut received = 0u64;
        let mut spooled = 0u64;
        let mut ended = false;
        let mut unread_since: Option<Instant> = None;
        // What arrived so far, as readers are to see it.
        macro_rules! progress {
            ($end:expr) => {
                publish(
                    held_back(received),
                    spooled,
                    [&pending, &writing, &written],
                    $end,
                )
            };
        }
        let failure: Option<String> = loop {
            let batch =
                arrived_len >= BATCH || arrived.len() >= PIECES || (ended && arrived_len > 0);
            // One write at a time, in order (it carries the digest along): the next waits for
            // the one under way, and so does the end.
            if (batch || ended)
                && let Some((task, len)) = write.take()
            {
                match task.await {
                    Ok(Ok(digesting)) => hasher = digesting,
                    Ok(Err(e)) => {
                        // Full or failing: fetch unshared for a while, and give the volume
                        // the kept files' space back.
                        flight.file.keep.store(false, Ordering::Relaxed);
                        let kept = self.spools.release(Instant::now() + SPOOL_BACKOFF);
                        tokio::task::spawn_blocking(move || drop(kept));
                        break Some(format!("cannot spool the blob: {e}"));
                    }
                    Err(e) => break Some(format!("cannot spool the blob: {e}")),
                }
                spooled += len;
                written = writing.take();
                progress!(None);
                // Nobody reading it for a while (the HEAD that started it was not followed by
                // a GET, or every reader went away): stop, deciding under the lock new
                // readers join under, so none joins a download that is giving up.
                if flight.state.receiver_count() > 0 {
                    unread_since = None;
                } else if unread_since.get_or_insert_with(Instant::now).elapsed() >= UNREAD_LIMIT {
                    let abandoned = {
                        let _flights = self.lock();
                        let unread = flight.state.receiver_count() == 0;
                        if unread {
                            progress!(Some(Err(Arc::from("nobody read it"))));
                        }
                        unread
                    };
                    if abandoned {
                        return false;
                    }
                    unread_since = None;
                }
            }
            if batch {
                let pieces = std::mem::take(&mut arrived);
                let len = std::mem::take(&mut arrived_len);
                let spool = flight.file.clone();
                let mut digesting = hasher.take();
                let task = tokio::task::spawn_blocking(move || {
                    if let Some(hasher) = &mut digesting {
                        for piece in &pieces {
                            hasher.update(piece);
                        }
                    }
                    // Written in order at the file's position: only this download's writes,
                    // one at a time, move it (readers read at an offset).
                    write_all_vectored(spool.file_to_write(expected)?, &pieces)?;
                    Ok::<_, std::io::Error>(digesting)
                });
                write = Some((task, len as u64));
                writing = pending.take();
                progress!(None);
                continue;
            }
            if ended {
                // The write under way was waited for above.
                debug_assert!(write.is_none());
                if let Some(n) = expected.filter(|n| *n != spooled) {
                    break Some(format!("the upstream sent {spooled} of {n} bytes"));
                }
                if let Some(hasher) = hasher.take() {
                    let got = format!("sha256:{}", hex::encode(hasher.finalize()));
                    if got != digest {
                        break Some(format!(
                            "the upstream's content hashes to {got}, not {digest}"
                        ));
                    }
                }
                break None;
            }
            match tokio::time::timeout(IDLE, stream.next()).await {
                Ok(Some(Ok(bytes))) => {
                    if !bytes.is_empty() {
                        pending = Some(Arc::new(Piece {
                            at: received,
                            bytes: bytes.clone(),
                            before: pending.take(),
                        }));
                        received += bytes.len() as u64;
                        arrived_len += bytes.len();
                        arrived.push(bytes);
                        progress!(None);
                    }
                }
                Ok(Some(Err(e))) => {
                    break Some(format!(
                        "the upstream's answer broke off: {}",
                        e.without_url()
                    ));
                }
                Ok(None) => ended = true,
                Err(_) => {
                    break Some(format!("the upstream sent nothing for {}s", IDLE.as_secs()));
                }
            }
        };
        match failure {
            None => {
                publish(spooled, spooled, [&None; 3], Some(Ok(())));
                true
            }
            Some(message) => {
                tracing::warn!(remote = %self.remote.host(), error = %message, "relayed blob download failed");
                let _flights = self.lock();
                progress!(Some(Err(Arc::<str>::from(message))));
                false
            }
        }
    }
}

/// The answer to one request for a blob: the remote's answer once known, the body given out as
/// the download goes: from memory while it keeps up, from the spool when it is behind.
async fn reader(file: Arc<Spool>, mut state: watch::Receiver<State>) -> Response<Body> {
    let head = loop {
        let current = state.borrow_and_update().clone();
        match current {
            State::Streaming { head, .. } => break head,
            State::Whole(whole) => return answer(whole.0, &whole.1, full(whole.2.clone())),
            State::Asking => {
                if state.changed().await.is_err() {
                    return stopped();
                }
            }
        }
    };
    let body = futures::stream::unfold(Some((file, state, 0u64)), |progress| async move {
        let (file, mut state, offset) = progress?;
        loop {
            let (readable, spooled, memory, end) = match &*state.borrow_and_update() {
                State::Streaming {
                    readable,
                    spooled,
                    pending,
                    writing,
                    written,
                    end,
                    ..
                } => {
                    // The piece in memory that holds `offset`, if any.
                    let piece = (offset < *readable)
                        .then(|| {
                            [pending, writing, written]
                                .into_iter()
                                .find_map(|list| Piece::holding(list, offset))
                                .map(|p| (p.at, p.bytes.clone()))
                        })
                        .flatten();
                    (*readable, *spooled, piece, end.clone())
                }
                _ => (
                    0,
                    0,
                    None,
                    Some(Err(Arc::from("the download was replaced"))),
                ),
            };
            if let Some((at, bytes)) = memory {
                // Keeping up, or a little behind: the bytes from memory, a piece at a time.
                let from = (offset - at) as usize;
                let to = bytes.len().min((readable - at) as usize);
                return Some((
                    Ok(Frame::data(bytes.slice(from..to))),
                    Some((file, state, at + to as u64)),
                ));
            }
            if offset < readable && offset >= spooled {
                // `pending` and `writing` hold every byte from `spooled` up to `readable`.
                return Some((Err("the relayed download lost its bytes".into()), None));
            }
            if offset < readable {
                // Behind: from the spool.
                let len = (readable.min(spooled) - offset).min(CHUNK as u64) as usize;
                let spool = file.clone();
                let read = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0; len];
                    spool.file()?.read_exact_at(&mut buf, offset).map(|()| buf)
                })
                .await;
                return Some(match read {
                    Ok(Ok(buf)) => (
                        Ok(Frame::data(Bytes::from(buf))),
                        Some((file, state, offset + len as u64)),
                    ),
                    Ok(Err(e)) => (
                        Err(format!("cannot read the spooled blob: {e}").into()),
                        None,
                    ),
                    Err(e) => (
                        Err(format!("cannot read the spooled blob: {e}").into()),
                        None,
                    ),
                });
            }
            match end {
                Some(Ok(())) => return None,
                Some(Err(message)) => return Some((Err(message.to_string().into()), None)),
                None => {
                    if state.changed().await.is_err() {
                        return Some((Err("the relayed download stopped".into()), None));
                    }
                }
            }
        }
    });
    answer(StatusCode::OK, &head, BodyExt::boxed(StreamBody::new(body)))
}

/// The answer to a HEAD of a blob: the download's headers (or its whole answer's), no body.
async fn head_of(mut state: watch::Receiver<State>) -> Response<Body> {
    loop {
        let current = state.borrow_and_update().clone();
        match current {
            State::Streaming { head, .. } => {
                return answer(StatusCode::OK, &head, full(Bytes::new()));
            }
            State::Whole(whole) => return answer(whole.0, &whole.1, full(Bytes::new())),
            State::Asking => {
                if state.changed().await.is_err() {
                    return stopped();
                }
            }
        }
    }
}

fn stopped() -> Response<Body> {
    proxy::error(
        StatusCode::BAD_GATEWAY,
        "UNAVAILABLE",
        "the relayed download stopped",
    )
}

fn answer(status: StatusCode, headers: &HeaderMap, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers.clone();
    response
}

/// An answer read whole, to give again to every request waiting for it; one too large to keep
/// becomes a 502.
async fn whole(response: Response<Body>) -> (StatusCode, HeaderMap, Bytes) {
    let (parts, mut body) = response.into_parts();
    let mut bytes = BytesMut::new();
    let failure = loop {
        match body.frame().await {
            None => break None,
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    bytes.extend_from_slice(&data);
                }
                if bytes.len() > WHOLE_LIMIT {
                    break Some(format!("larger than {WHOLE_LIMIT} bytes"));
                }
            }
            Some(Err(e)) => break Some(e.to_string()),
        }
    };
    let Some(failure) = failure else {
        return (parts.status, parts.headers, bytes.freeze());
    };
    let message = format!(
        "the upstream's answer ({}) could not be read: {failure}",
        parts.status
    );
    let body = proxy::error_body("UNAVAILABLE", &message);
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    (StatusCode::BAD_GATEWAY, headers, body)
}

/// Writes every piece at the file's position, in order, with as few calls as the kernel allows.
fn write_all_vectored(mut file: &std::fs::File, pieces: &[Bytes]) -> std::io::Result<()> {
    use std::io::{IoSlice, Write};
    let mut slices: Vec<IoSlice<'_>> = pieces.iter().map(|p| IoSlice::new(p)).collect();
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        match file.write_vectored(slices) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sparse(dir: &Path, name: &str, len: u64) -> std::fs::File {
        let file = std::fs::File::create(dir.join(name)).unwrap();
        file.set_len(len).unwrap();
        file
    }

    fn spools(dir: &Path, gauge: &Gauge) -> Arc<Spools> {
        Arc::new(Spools::new(dir, gauge.clone(), Counter::default()))
    }

    /// At most [`IDLE_SPOOLS`] files of [`IDLE_SPOOL_BYTES`] in all are kept, a larger one cut
    /// to what is left.
    #[tokio::test]
    async fn kept_spool_files_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let gauge = Gauge::default();
        let idle = spools(dir.path(), &gauge);
        let runtime = tokio::runtime::Handle::current();
        let mib = 1u64 << 20;
        idle.keep(sparse(dir.path(), "a", 900 * mib), &runtime);
        idle.keep(sparse(dir.path(), "b", 900 * mib), &runtime);
        // Nothing left for a third.
        idle.keep(sparse(dir.path(), "c", 10 * mib), &runtime);
        assert_eq!(gauge.get(), 2);
        assert_eq!(
            idle.take(None).unwrap().metadata().unwrap().len(),
            900 * mib
        );
        assert_eq!(
            idle.take(None).unwrap().metadata().unwrap().len(),
            124 * mib,
            "not cut to the room left"
        );
        assert!(idle.take(None).is_none());
        assert_eq!(gauge.get(), 0);
        // Too small to be worth a slot.
        idle.keep(sparse(dir.path(), "tiny", 4096), &runtime);
        assert_eq!(gauge.get(), 0);
        for n in 0..IDLE_SPOOLS as u64 {
            idle.keep(
                sparse(dir.path(), &format!("n-{n}"), (3 + n) * mib),
                &runtime,
            );
        }
        assert_eq!(gauge.get(), IDLE_SPOOLS as i64);
        // Not larger than the smallest: not kept. Larger: it replaces the smallest.
        idle.keep(sparse(dir.path(), "equal", 3 * mib), &runtime);
        idle.keep(sparse(dir.path(), "larger", 10 * mib), &runtime);
        assert_eq!(gauge.get(), IDLE_SPOOLS as i64);
        let mut lens: Vec<u64> = std::iter::from_fn(|| idle.take(None))
            .map(|f| f.metadata().unwrap().len() / mib)
            .collect();
        lens.sort();
        assert_eq!(lens, [4, 5, 6, 10]);
        assert_eq!(gauge.get(), 0);
        // Released: none kept until the time given.
        idle.keep(sparse(dir.path(), "before", 2 * mib), &runtime);
        drop(idle.release(Instant::now() + Duration::from_secs(60)));
        assert_eq!(gauge.get(), 0);
        idle.keep(sparse(dir.path(), "after", 2 * mib), &runtime);
        assert_eq!(gauge.get(), 0);
        assert!(idle.take(None).is_none());
    }

    /// A download takes the smallest kept file that holds its blob, else the largest; a small
    /// blob takes none, leaving them to large ones, and gets a new file.
    #[tokio::test]
    async fn a_download_takes_the_kept_file_that_fits_its_blob() {
        let dir = tempfile::tempdir().unwrap();
        let gauge = Gauge::default();
        let reused = Counter::default();
        let idle = Arc::new(Spools::new(dir.path(), gauge.clone(), reused.clone()));
        let runtime = tokio::runtime::Handle::current();
        let mib = 1u64 << 20;
        for (name, len) in [("a", 8 * mib), ("b", 2 * mib), ("c", 32 * mib)] {
            idle.keep(sparse(dir.path(), name, len), &runtime);
        }
        let taken = |len: u64| idle.file_for(Some(len)).unwrap().metadata().unwrap().len() / mib;
        // Small: a new, empty file; the kept ones stay.
        assert_eq!(taken(100 * 1024), 0);
        assert_eq!((gauge.get(), reused.get()), (3, 0));
        assert_eq!(taken(5 * mib), 8);
        assert_eq!(taken(64 * mib), 32, "none holds it: the largest");
        assert_eq!(taken(mib), 2);
        assert_eq!((gauge.get(), reused.get()), (0, 3));
        assert_eq!(taken(5 * mib), 0, "none kept: a new file");
        // The new files were unlinked at once.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with(".relay-"))
            .collect();
        assert!(names.is_empty(), "{names:?}");
    }

    /// A kept file nobody took is closed after [`IDLE_SPOOL_KEEP`].
    #[tokio::test(start_paused = true)]
    async fn a_kept_spool_file_expires() {
        let dir = tempfile::tempdir().unwrap();
        let gauge = Gauge::default();
        let idle = spools(dir.path(), &gauge);
        let runtime = tokio::runtime::Handle::current();
        idle.keep(sparse(dir.path(), "a", 2 << 20), &runtime);
        tokio::time::sleep(IDLE_SPOOL_KEEP - Duration::from_secs(1)).await;
        assert_eq!(gauge.get(), 1);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(gauge.get(), 0);
        assert!(idle.take(None).is_none());
    }

    /// A kept file is given back at its start, to be written over from there.
    #[tokio::test]
    async fn a_kept_spool_file_is_taken_rewound() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let idle = spools(dir.path(), &Gauge::default());
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("spool"))
            .unwrap();
        file.write_all(&[1u8; 3 << 20]).unwrap();
        idle.keep(file, &tokio::runtime::Handle::current());
        let file = idle.take(Some(3 << 20)).unwrap();
        write_all_vectored(
            &file,
            &[Bytes::from_static(b"new"), Bytes::from_static(b"er")],
        )
        .unwrap();
        let mut start = [0u8; 6];
        file.read_exact_at(&mut start, 0).unwrap();
        assert_eq!(&start, b"newer\x01");
    }
}
