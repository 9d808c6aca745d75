//! `registry-addon front`: the authorizing, streaming front of a registry replica (SPEC §9.1).
//!
//! It terminates TLS with the replica's certificate, checks every request's Basic credentials
//! against the users of `registry-auth` (pull-only users may GET and HEAD; push users may do
//! everything), and streams authorized requests to the registry on the pod's loopback.
//! Anonymous requests get 401 with a Basic challenge, so clients (containerd, skopeo, docker)
//! retry with credentials.
//!
//! Modes (SPEC §9.5): in Local mode everything is forwarded to the registry on the loopback;
//! with `--pull-only` (Proxy mode, a pull-through cache behind) every request other than GET
//! and HEAD gets 405; with `--remote` (Direct mode) the front alone is the mirror and
//! forwards pulls to the remote registry, see [`remote`]. With `--remote` and
//! `--relay-listen` (Proxy mode as the StatefulSet runs it) clients are served from the cache
//! behind, and the cache reaches the remote through the front's relay, see [`relay`].

pub mod auth;
pub mod cache_fill;
pub mod proxy;
pub mod relay;
pub mod remote;
pub mod required;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Args;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::webhook::tls::{self, CertFiles, ReloadCounters, ReloadingResolver};
use auth::{Refusal, Role, Users};
use proxy::{Body, Upstream};

/// Command line of `registry-addon front`.
#[derive(Debug, Clone, Args)]
pub struct FrontArgs {
    /// HTTPS address clients reach.
    #[arg(long, default_value = "0.0.0.0:5000")]
    pub listen: SocketAddr,
    /// Serving certificate (PEM); reloaded when rewritten.
    #[arg(long)]
    pub tls_cert_file: PathBuf,
    /// Serving private key (PEM).
    #[arg(long)]
    pub tls_key_file: PathBuf,
    /// The registry behind the front, plain HTTP on the loopback (not used with --remote).
    #[arg(long, default_value = "http://127.0.0.1:5001")]
    pub upstream: String,
    /// Refuse every request but GET and HEAD with 405: the registry behind is a pull-through
    /// cache (Proxy mode).
    #[arg(long)]
    pub pull_only: bool,
    /// The remote registry, `https://host[:port][/path]`. Direct mode: pulls are forwarded to
    /// it instead of --upstream, and pushes are refused. With --relay-listen (Proxy mode):
    /// clients are served by --upstream, a pull-through cache whose `proxy.remoteurl` is the
    /// relay, and the relay forwards to this registry. With a path, mirror repository
    /// `foo/bar` is the remote's `<path>/foo/bar`. containerd's `?ns=` query is dropped.
    #[arg(long)]
    pub remote: Option<String>,
    /// Proxy mode: serve, on this loopback address, the relay to --remote that the cache
    /// behind (--upstream) uses as its upstream. It adds the credentials and downloads a blob
    /// once for every concurrent request of the cache. Implies --pull-only.
    #[arg(long, requires = "remote")]
    pub relay_listen: Option<SocketAddr>,
    /// Writable directory where the relay spools a blob while it is downloaded (files are
    /// unlinked at once; their space is freed 10 s after the download, once the last request
    /// reading one ends).
    #[arg(long, default_value = "/tmp", requires = "relay_listen")]
    pub relay_spool: PathBuf,
    /// Directory of a mounted `kubernetes.io/basic-auth` Secret (files `username`,
    /// `password`): the credentials for --remote; reread on change. Without it, anonymous.
    #[arg(long, requires = "remote")]
    pub remote_credentials: Option<PathBuf>,
    /// PEM CA bundle that --remote's certificate must verify against (default: the system's
    /// roots).
    #[arg(long, requires = "remote")]
    pub remote_ca: Option<PathBuf>,
    /// htpasswd file (bcrypt) of the users that may pull.
    #[arg(long)]
    pub pull_users: Option<PathBuf>,
    /// htpasswd file (bcrypt) of the users that may pull and push.
    #[arg(long)]
    pub push_users: Option<PathBuf>,
    /// Plain-HTTP address of /metrics, /healthz and /readyz (ready while the registry, or in
    /// Direct mode the remote, answers).
    #[arg(long, default_value = "127.0.0.1:9442")]
    pub metrics_listen: SocketAddr,
    /// How often the certificate and user files are checked for changes (Go duration).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub reload_interval: Duration,
    /// File of images (`repository:tag` or `repository@digest`, one per line) the registry
    /// behind must hold before the front reports ready; reread on change. A missing or empty
    /// file requires nothing. Set by Local's StatefulSet: during a switch to Local, the
    /// controller lists the images in use there. Not with Direct mode's --remote alone.
    #[arg(long)]
    pub require_images: Option<PathBuf>,
    /// Serve only this registry's images (`host[:port]`): a request whose `ns` (containerd's
    /// name for the image's registry) names another gets 404, never the image of the same
    /// name here. With --remote, the remote's host is used.
    #[arg(long, conflicts_with = "remote")]
    pub registry_host: Option<String>,
    /// The storage root of the registry behind (its `storage.filesystem.rootdirectory`),
    /// mounted read-only: blobs its repositories hold are read from there instead of
    /// through the registry. Anything else, and a blob not there, goes to the registry.
    #[arg(long)]
    pub blob_store: Option<PathBuf>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::duration::parse_go_duration(s)
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// `pull` (GET, HEAD) or `push` (anything else).
    access: &'static str,
    code: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    reason: &'static str,
}

/// The front's Prometheus metrics.
pub struct FrontMetrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    refused: Family<RefusalLabels, Counter>,
    reloads: ReloadCounters,
    remote: remote::RemoteMetrics,
    relay: relay::RelayMetrics,
    blobs_from_store: Counter,
    blobs_from_relay: Counter,
}

impl Default for FrontMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("registry_addon_front");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by access and HTTP status",
            requests.clone(),
        );
        let refused = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "refused",
            "Requests refused by the front: unauthenticated (401) or forbidden (403)",
            refused.clone(),
        );
        let reloads = ReloadCounters::default();
        registry.register(
            "certificate_reloads",
            "Serving certificate reloads",
            reloads.reloads.clone(),
        );
        registry.register(
            "certificate_reload_errors",
            "Serving certificate changes that could not be loaded",
            reloads.errors.clone(),
        );
        let remote = remote::RemoteMetrics::default();
        registry.register(
            "remote_errors",
            "Direct mode: failed requests to the remote registry, by reason",
            remote.errors.clone(),
        );
        registry.register(
            "remote_token_fetches",
            "Direct mode: tokens fetched from the remote's token service",
            remote.token_fetches.clone(),
        );
        let relay = relay::RelayMetrics::default();
        registry.register(
            "relay_blob_downloads",
            "Proxy mode: blob downloads from the remote the relay started for the cache",
            relay.downloads.clone(),
        );
        registry.register(
            "relay_blob_shared",
            "Proxy mode: requests of the cache for a blob served from a download another started",
            relay.shared.clone(),
        );
        registry.register(
            "relay_spools_reused",
            "Proxy mode: blob downloads spooled into a kept spool file instead of a new one",
            relay.spools_reused.clone(),
        );
        registry.register(
            "relay_spools_idle",
            "Proxy mode: spool files kept for the next blob downloads",
            relay.spools_idle.clone(),
        );
        let blobs_from_store = Counter::default();
        registry.register(
            "blobs_from_store",
            "Blob requests answered from the registry's storage (--blob-store), not through the registry",
            blobs_from_store.clone(),
        );
        let blobs_from_relay = Counter::default();
        registry.register(
            "blobs_from_relay",
            "Proxy mode: blob requests for a blob not in the cache, answered from the relay's download of it while the cache stores it",
            blobs_from_relay.clone(),
        );
        FrontMetrics {
            registry,
            requests,
            refused,
            reloads,
            remote,
            relay,
            blobs_from_store,
            blobs_from_relay,
        }
    }
}

impl FrontMetrics {
    fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Where authorized requests go.
#[derive(Clone)]
enum Backend {
    /// The registry on the pod's loopback (Local and Proxy modes).
    Local(Box<Upstream>),
    /// Direct mode's remote registry.
    Remote(Arc<remote::Remote>),
}

impl Backend {
    async fn is_up(&self) -> bool {
        match self {
            Backend::Local(upstream) => upstream.is_up().await,
            Backend::Remote(remote) => remote.is_up().await,
        }
    }
}

struct Front {
    users: Arc<Users>,
    backend: Backend,
    /// The one registry whose images are served (`ns`), when not every registry's.
    only_registry: Option<String>,
    /// Set when only GET and HEAD are served: the 405 message for the rest.
    pushes_refused: Option<String>,
    /// The registry's storage, read for blobs.
    store: Option<store::BlobStore>,
    /// Proxy mode's relay: with the store, a client's cold blob is read from its download.
    relay: Option<Arc<relay::Relay>>,
    /// With the relay and the store: when the cache is told to store such a blob.
    cache_fill: Option<Arc<cache_fill::CacheFill>>,
    metrics: Arc<FrontMetrics>,
}

/// A started front.
pub struct Running {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// The relay's address, with --relay-listen.
    pub relay_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
}

impl Running {
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
        for task in self.background {
            task.abort();
        }
    }
}

/// `registry-addon front`: runs until SIGTERM or Ctrl-C.
pub async fn run(args: FrontArgs) -> anyhow::Result<()> {
    keep_freed_memory();
    let running = start(args).await?;
    crate::webhook::wait_for_signal().await;
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}

/// Has the allocator keep memory the front freed for its next allocations, instead of handing
/// it back to the kernel at once and faulting it in again.
///
/// A blob streamed from the remote arrives in the HTTP client's read buffers, a few hundred
/// KiB each, which the relay holds until they are spooled: each download goes through a new
/// buffer every few hundred KiB. By default glibc maps every allocation over 128 KiB on its
/// own and returns a heap's free top once it passes 256 KiB, so each such buffer was fresh
/// pages from the kernel: 35–75 MiB of page faults per 256 MiB blob, which cost most where
/// the machine's free memory is handed back to a hypervisor. Here allocations up to 4 MiB come
/// from the heap and up to 64 MiB of free heap is kept: the front's memory stays at what its
/// busiest moment used.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; a value it refuses is ignored (it
    // returns 0), leaving the defaults.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

/// Loads certificate and users, binds both listeners and starts serving.
pub async fn start(args: FrontArgs) -> anyhow::Result<Running> {
    let metrics = Arc::new(FrontMetrics::default());
    let files = CertFiles {
        cert: args.tls_cert_file.clone(),
        key: args.tls_key_file.clone(),
    };
    let (hash, key) = files.initial()?;
    let resolver = Arc::new(ReloadingResolver::new(key));
    let users = Arc::new(Users::load(
        args.pull_users.clone(),
        args.push_users.clone(),
    )?);
    let remote = match &args.remote {
        Some(url) => Some(Arc::new(remote::Remote::new(
            url,
            args.remote_ca.as_deref(),
            args.remote_credentials.clone(),
            metrics.remote.clone(),
        )?)),
        None => None,
    };
    let direct = remote.as_ref().filter(|_| args.relay_listen.is_none());
    if direct.is_some() && args.require_images.is_some() {
        anyhow::bail!(
            "--require-images needs the registry behind the front, not Direct mode's --remote (without --relay-listen)"
        );
    }
    if direct.is_some() && args.blob_store.is_some() {
        anyhow::bail!(
            "--blob-store needs the registry behind the front, not Direct mode's --remote (without --relay-listen)"
        );
    }
    let relay = match (&remote, args.relay_listen) {
        (Some(remote), Some(addr)) => {
            if !addr.ip().is_loopback() {
                anyhow::bail!(
                    "--relay-listen {addr}: must be a loopback address; the relay adds the upstream's credentials and authenticates nobody"
                );
            }
            let relay =
                relay::Relay::new(remote.clone(), &args.relay_spool, metrics.relay.clone())?;
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for the relay: {e}"))?;
            Some((Arc::new(relay), listener))
        }
        _ => None,
    };
    let (backend, pushes_refused, target) = match direct {
        Some(remote) => {
            let message = format!(
                "this mirror forwards to {}; pushes are refused",
                remote.host()
            );
            (
                Backend::Remote(remote.clone()),
                Some(message),
                remote.host().to_string(),
            )
        }
        None => (
            Backend::Local(Box::new(Upstream::new(&args.upstream)?)),
            (args.pull_only || relay.is_some())
                .then(|| "this mirror is a pull-through cache; pushes are refused".to_string()),
            args.upstream.clone(),
        ),
    };
    let acceptor = TlsAcceptor::from(Arc::new(tls::server_config(resolver.clone())?));
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr()?;
    let probe_listener = crate::metrics::bind(args.metrics_listen).await?;
    let metrics_addr = probe_listener.local_addr()?;

    let ready = Arc::new(AtomicBool::new(false));
    let mut background = vec![
        tokio::spawn(files.watch(
            hash,
            resolver,
            metrics.reloads.clone(),
            args.reload_interval,
        )),
        tokio::spawn(users.clone().watch(args.reload_interval)),
        tokio::spawn(watch_backend(
            backend.clone(),
            args.require_images.clone().map(required::Required::new),
            ready.clone(),
            args.reload_interval,
        )),
    ];
    if let Some(remote) = &remote {
        background.push(tokio::spawn(
            remote.clone().watch_credentials(args.reload_interval),
        ));
    }
    let relay_for_clients = relay.as_ref().map(|(relay, _)| relay.clone());
    let relay_addr = match relay {
        Some((relay, listener)) => {
            let addr = listener.local_addr()?;
            background.push(tokio::spawn(relay.serve(listener)));
            Some(addr)
        }
        None => None,
    };
    let encode = metrics.clone();
    background.push(tokio::spawn(crate::metrics::serve_probes(
        probe_listener,
        Arc::new(move || encode.encode()),
        ready,
    )));

    let only_registry = match (&remote, &args.registry_host) {
        (Some(remote), _) => Some(remote.host().to_string()),
        (None, host) => host.clone(),
    };
    let store = args
        .blob_store
        .as_deref()
        .map(store::BlobStore::new)
        .transpose()?;
    let cache_fill = match (&backend, &relay_for_clients, &store) {
        (Backend::Local(upstream), Some(_), Some(_)) => {
            let fill = Arc::new(cache_fill::CacheFill::default());
            let upstream = Upstream::clone(upstream);
            let running = fill.clone();
            // Two blobs stored at a time: each costs the cache two reads of it and a write.
            let slots = Arc::new(tokio::sync::Semaphore::new(2));
            background.push(tokio::spawn(async move {
                running
                    .run(|path| {
                        let (upstream, slots) = (upstream.clone(), slots.clone());
                        tokio::spawn(async move {
                            let _slot = slots.acquire_owned().await;
                            tell_cache(upstream, path).await
                        });
                    })
                    .await
            }));
            Some(fill)
        }
        _ => None,
    };
    let front = Arc::new(Front {
        users,
        backend,
        only_registry,
        pushes_refused,
        store,
        relay: relay_for_clients,
        cache_fill,
        metrics,
    });
    let front_pull_only = front.pushes_refused.is_some();
    let (shutdown, shutdown_rx) = watch::channel(false);
    let task = tokio::spawn(accept_loop(listener, acceptor, front, shutdown_rx));
    tracing::info!(%addr, %metrics_addr, upstream = %target, pull_only = front_pull_only, relay = ?relay_addr, "registry front serving");
    Ok(Running {
        addr,
        metrics_addr,
        relay_addr,
        shutdown,
        task,
        background,
    })
}

/// Tells the cache to store the blob at `path`, which the relay holds: a HEAD, which makes
/// Distribution fetch the blob (from the relay) and store it.
async fn tell_cache(upstream: Upstream, path: String) {
    match upstream.head(&path).await {
        Some(status) if status.is_success() => {}
        status => tracing::warn!(
            path,
            status = ?status.map(|s| s.as_u16()),
            "the cache did not take the blob a client pulled through the relay; it is not cached"
        ),
    }
}

/// Ready while the registry behind (or the remote) answers, and holds what `required` lists;
/// checked every `interval`.
async fn watch_backend(
    backend: Backend,
    mut required: Option<required::Required>,
    ready: Arc<AtomicBool>,
    interval: Duration,
) {
    loop {
        let mut up = backend.is_up().await;
        if let (true, Some(required), Backend::Local(upstream)) = (up, &mut required, &backend) {
            up = required.holds_all(upstream).await;
        }
        if ready.swap(up, Ordering::AcqRel) != up {
            tracing::info!(ready = up, "registry behind the front changed state");
        }
        tokio::time::sleep(if up {
            interval
        } else {
            interval.min(Duration::from_millis(500))
        })
        .await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    front: Arc<Front>,
    shutdown: watch::Receiver<bool>,
) {
    crate::webhook::server::serve_tls(listener, acceptor, shutdown, move |peer| {
        let front = front.clone();
        let client_ip = peer.ip().to_string();
        hyper::service::service_fn(move |req| {
            let front = front.clone();
            let client_ip = client_ip.clone();
            async move { Ok::<_, std::convert::Infallible>(front.handle(req, &client_ip).await) }
        })
    })
    .await
}

impl Front {
    /// The registry a request's `ns` names when this front serves only another's: a node still
    /// on Local's `_default` route during a switch asks for every registry's images, and
    /// must never get the upstream's image of the same name (containerd falls back to the
    /// image's registry on the 404).
    fn other_registry(&self, request: &Request<Incoming>) -> Option<String> {
        let only = self.only_registry.as_deref()?;
        let ns = remote::ns_of(request.uri().query().unwrap_or_default())?;
        (!remote::serves_registry(only, &ns)).then_some(ns)
    }

    /// The answer of the registry behind: a blob it holds read from its storage; in Proxy
    /// mode a blob it does not hold yet read from the relay's download, the cache told to
    /// store it from that same download once it is whole and the clients are quiet; anything
    /// else forwarded.
    async fn answer_from_registry(
        &self,
        request: Request<Incoming>,
        upstream: &Upstream,
        client_ip: &str,
    ) -> Response<Body> {
        let Some(store) = &self.store else {
            return upstream.forward(request, client_ip).await;
        };
        match store.serve(&request).await {
            store::Lookup::Served(response) => {
                self.metrics.blobs_from_store.inc();
                return response;
            }
            // Only a blob certainly not in the store is the relay's: never one the cache holds.
            store::Lookup::Absent => {
                if let Some(relay) = &self.relay
                    && let Some((response, download)) = relay.blob_for_client(&request).await
                {
                    self.metrics.blobs_from_relay.inc();
                    if let (Some(download), Some(fill)) = (download, &self.cache_fill) {
                        // The cache stores the blob from the same download once it is whole,
                        // when the clients let it (see `cache_fill`).
                        let fill = fill.clone();
                        let path = request.uri().path().to_string();
                        tokio::spawn(async move {
                            if download.succeeded().await {
                                fill.store_later(path);
                            }
                        });
                    }
                    return response;
                }
            }
            store::Lookup::NotABlob | store::Lookup::Unsure => {}
        }
        upstream.forward(request, client_ip).await
    }

    async fn handle(&self, request: Request<Incoming>, client_ip: &str) -> Response<Body> {
        // Until its answer is sent, body and all, the cache waits to store what clients pulled.
        let answering = self
            .cache_fill
            .as_ref()
            .map(cache_fill::CacheFill::answering);
        let reading = request.method() == Method::GET || request.method() == Method::HEAD;
        // A mirror that only pulls answers every authenticated write with 405, whoever asks.
        let needed = if reading || self.pushes_refused.is_some() {
            Role::Pull
        } else {
            Role::Push
        };
        let access = if reading { "pull" } else { "push" };
        let authorization = request
            .headers()
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        let response = match self.users.authorize(authorization, needed).await {
            Ok(_user) => {
                let other = self.other_registry(&request);
                match (&self.pushes_refused, &self.backend, other) {
                    (Some(message), ..) if !reading => remote::push_refused(message),
                    (_, _, Some(ns)) => proxy::error(
                        StatusCode::NOT_FOUND,
                        "NAME_UNKNOWN",
                        &format!(
                            "this mirror serves only {}'s images, not {ns}'s",
                            self.only_registry.as_deref().unwrap_or_default()
                        ),
                    ),
                    (_, Backend::Remote(remote), None) => remote.forward(request).await,
                    (_, Backend::Local(upstream), None) => {
                        self.answer_from_registry(request, upstream, client_ip)
                            .await
                    }
                }
            }
            Err(Refusal::Unauthenticated) => {
                self.metrics
                    .refused
                    .get_or_create(&RefusalLabels {
                        reason: "unauthenticated",
                    })
                    .inc();
                let mut response = proxy::error(
                    StatusCode::UNAUTHORIZED,
                    "UNAUTHORIZED",
                    "authentication required",
                );
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"registry-addon\""),
                );
                response
            }
            Err(Refusal::Forbidden) => {
                self.metrics
                    .refused
                    .get_or_create(&RefusalLabels {
                        reason: "forbidden",
                    })
                    .inc();
                proxy::error(
                    StatusCode::FORBIDDEN,
                    "DENIED",
                    "this user may only pull (GET and HEAD)",
                )
            }
        };
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                access,
                code: response.status().as_u16(),
            })
            .inc();
        match answering {
            Some(answering) => response.map(|body| {
                body.map_frame(move |frame| {
                    let _ = &answering;
                    frame
                })
                .boxed()
            }),
            None => response,
        }
    }
}
