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
//!   downloads reach the relay, which fetches the blob once, spools it to a file and streams
//!   it from there to every request that asked for it meanwhile (or in the few seconds after:
//!   a small blob may be done before the second request arrives). The registry asks for a
//!   blob's size (HEAD) right before each download: the download starts at that HEAD, which
//!   is answered from its headers, saving a round trip to the upstream per blob.
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
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::proxy::{self, Body};
use super::remote::{self, Remote};

/// Bytes spooled, and read back, per file operation.
const CHUNK: usize = 256 * 1024;
/// How long a finished download stays shared.
const GRACE: Duration = Duration::from_secs(10);
/// How long a download goes on while nobody reads it.
const UNREAD_LIMIT: Duration = Duration::from_secs(2);
/// The largest answer other than 200 that is kept to give every waiting request.
const WHOLE_LIMIT: usize = 1 << 20;

/// Metrics of the relay, registered by the front.
#[derive(Clone, Default)]
pub struct RelayMetrics {
    /// Blob downloads from the remote started for the cache.
    pub downloads: Counter,
    /// Requests for a blob answered from a download another request started.
    pub shared: Counter,
}

/// The relay of one front.
pub struct Relay {
    remote: Arc<Remote>,
    spool: PathBuf,
    /// The blob downloads under way or recently finished, by the cache's request path.
    flights: Mutex<HashMap<String, Arc<Flight>>>,
    files: AtomicU64,
    metrics: RelayMetrics,
}

/// One download of a blob, shared by the requests for it.
struct Flight {
    /// The spool: an unlinked file, gone with the last reader.
    file: Arc<std::fs::File>,
    state: watch::Sender<State>,
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
    /// 200: the answer's headers, the bytes spooled so far, and how the download ended.
    Streaming {
        head: Arc<HeaderMap>,
        written: u64,
        end: Option<Result<(), Arc<str>>>,
    },
    /// Any other answer, whole: given to every request as it is.
    Whole(Arc<(StatusCode, HeaderMap, Bytes)>),
}

impl Relay {
    /// Checks that blobs can be spooled in `spool`.
    pub fn new(remote: Arc<Remote>, spool: &Path, metrics: RelayMetrics) -> anyhow::Result<Self> {
        let relay = Relay {
            remote,
            spool: spool.to_path_buf(),
            flights: Mutex::new(HashMap::new()),
            files: AtomicU64::new(0),
            metrics,
        };
        relay
            .spool_file()
            .map_err(|e| anyhow::anyhow!("--relay-spool {}: {e}", spool.display()))?;
        Ok(relay)
    }

    /// Serves the relay on `listener` (plain HTTP/1.1).
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "relay listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let relay = self.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let relay = relay.clone();
                    async move { Ok::<_, std::convert::Infallible>(relay.handle(req).await) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
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
        let Some((file, receiver)) = self.join_or_start(&path, &parts, head) else {
            return self.remote.forward(Request::from_parts(parts, body)).await;
        };
        if head {
            // The registry asks for a blob's size right before it fetches the blob: the
            // download starts here, and the HEAD is answered from its headers.
            return head_of(receiver).await;
        }
        reader(file, receiver).await
    }

    /// Joins the download of `path` under way, or starts it: the spool and its state to read
    /// the blob from. `None` when it cannot be spooled, to be fetched unshared.
    fn join_or_start(
        self: &Arc<Self>,
        path: &str,
        request: &http::request::Parts,
        head: bool,
    ) -> Option<(Arc<std::fs::File>, watch::Receiver<State>)> {
        let mut flights = self.lock();
        // A download that failed is about to be forgotten: this request starts anew.
        if let Some(flight) = flights.get(path).filter(|f| !f.failed()) {
            if !head {
                self.metrics.shared.inc();
            }
            return Some((flight.file.clone(), flight.state.subscribe()));
        }
        let file = match self.spool_file() {
            Ok(file) => Arc::new(file),
            Err(e) => {
                tracing::warn!(spool = %self.spool.display(), error = %e, "cannot spool a blob; fetching it unshared");
                return None;
            }
        };
        let (state, receiver) = watch::channel(State::Asking);
        let flight = Arc::new(Flight {
            file: file.clone(),
            state,
        });
        flights.insert(path.to_string(), flight.clone());
        self.metrics.downloads.inc();
        let mut headers = request.headers.clone();
        // Whatever started it, the download is a GET of the whole blob.
        headers.remove(header::CONTENT_LENGTH);
        tokio::spawn(
            self.clone()
                .download(path.to_string(), flight, request.uri.clone(), headers),
        );
        Some((file, receiver))
    }

    /// A new spool file, unlinked at once: it lives while someone holds it open.
    fn spool_file(&self) -> std::io::Result<std::fs::File> {
        let n = self.files.fetch_add(1, Ordering::Relaxed);
        let path = self
            .spool
            .join(format!(".relay-{}-{n}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        std::fs::remove_file(&path)?;
        Ok(file)
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
        if ok {
            tokio::time::sleep(GRACE).await;
        }
        let mut flights = self.lock();
        if flights.get(&path).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
            flights.remove(&path);
        }
    }

    /// Fetches the blob and spools it, publishing each step; whether it all arrived.
    async fn fill(&self, flight: &Flight, uri: &http::Uri, headers: &HeaderMap) -> bool {
        let resp = match self.remote.fetch(&Method::GET, uri, headers).await {
            Ok(resp) if resp.status() == StatusCode::OK => resp,
            Ok(resp) => {
                let whole = whole(self.remote.streamed(resp)).await;
                flight.state.send_replace(State::Whole(Arc::new(whole)));
                return false;
            }
            Err(answer) => {
                let whole = whole(answer).await;
                flight.state.send_replace(State::Whole(Arc::new(whole)));
                return false;
            }
        };
        let expected = resp.content_length();
        let mut head = resp.headers().clone();
        proxy::strip_hop_by_hop(&mut head);
        let head = Arc::new(head);
        flight.state.send_replace(State::Streaming {
            head: head.clone(),
            written: 0,
            end: None,
        });
        let publish = |written: u64, end: Option<Result<(), Arc<str>>>| {
            flight.state.send_replace(State::Streaming {
                head: head.clone(),
                written,
                end,
            });
        };
        let mut stream = resp.bytes_stream();
        let mut buffer = BytesMut::with_capacity(CHUNK);
        let mut written = 0u64;
        let mut ended = false;
        let mut unread_since: Option<Instant> = None;
        let failure: Option<String> = loop {
            if !ended {
                match stream.next().await {
                    Some(Ok(bytes)) => buffer.extend_from_slice(&bytes),
                    Some(Err(e)) => break Some(format!("the upstream's answer broke off: {e}")),
                    None => ended = true,
                }
            }
            if buffer.len() >= CHUNK || (ended && !buffer.is_empty()) {
                let chunk = buffer.split().freeze();
                let len = chunk.len() as u64;
                let file = flight.file.clone();
                let offset = written;
                let stored =
                    tokio::task::spawn_blocking(move || file.write_all_at(&chunk, offset)).await;
                match stored {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break Some(format!("cannot spool the blob: {e}")),
                    Err(e) => break Some(format!("cannot spool the blob: {e}")),
                }
                written += len;
                publish(written, None);
                // Nobody reading it for a while (the HEAD that started it was not followed by
                // a GET, or every reader went away): stop.
                if flight.state.receiver_count() > 0 {
                    unread_since = None;
                } else if unread_since.get_or_insert_with(Instant::now).elapsed() >= UNREAD_LIMIT {
                    break Some("nobody read it".into());
                }
            }
            if ended && buffer.is_empty() {
                break match expected {
                    Some(n) if n != written => {
                        Some(format!("the upstream sent {written} of {n} bytes"))
                    }
                    _ => None,
                };
            }
        };
        match failure {
            None => {
                publish(written, Some(Ok(())));
                true
            }
            Some(message) => {
                tracing::warn!(remote = %self.remote.host(), error = %message, "relayed blob download failed");
                publish(written, Some(Err(Arc::<str>::from(message))));
                false
            }
        }
    }
}

/// The answer to one request for a blob: the remote's answer once known, the body read from
/// the spool as the download fills it.
async fn reader(file: Arc<std::fs::File>, mut state: watch::Receiver<State>) -> Response<Body> {
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
            let (written, end) = match &*state.borrow_and_update() {
                State::Streaming { written, end, .. } => (*written, end.clone()),
                _ => (0, Some(Err(Arc::from("the download was replaced")))),
            };
            if offset < written {
                let len = (written - offset).min(CHUNK as u64) as usize;
                let spool = file.clone();
                let read = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0; len];
                    spool.read_exact_at(&mut buf, offset).map(|()| buf)
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

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
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
