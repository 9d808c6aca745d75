//! `registry-addon front`: the authorizing, streaming front of a registry replica (SPEC §9.1).
//!
//! It terminates TLS with the replica's certificate, checks every request's Basic credentials
//! against the users of `registry-auth` (pull-only users may GET and HEAD; push users may do
//! everything), and streams authorized requests to the registry on the pod's loopback.
//! Anonymous requests get 401 with a Basic challenge, so clients (containerd, skopeo, docker)
//! retry with credentials.

pub mod auth;
pub mod proxy;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Args;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
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
    /// The registry behind the front, plain HTTP on the loopback.
    #[arg(long, default_value = "http://127.0.0.1:5001")]
    pub upstream: String,
    /// htpasswd file (bcrypt) of the users that may pull.
    #[arg(long)]
    pub pull_users: Option<PathBuf>,
    /// htpasswd file (bcrypt) of the users that may pull and push.
    #[arg(long)]
    pub push_users: Option<PathBuf>,
    /// Plain-HTTP address of /metrics, /healthz and /readyz (ready while the registry answers).
    #[arg(long, default_value = "127.0.0.1:9442")]
    pub metrics_listen: SocketAddr,
    /// How often the certificate and user files are checked for changes (Go duration).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub reload_interval: Duration,
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
        FrontMetrics {
            registry,
            requests,
            refused,
            reloads,
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

struct Front {
    users: Arc<Users>,
    upstream: Upstream,
    metrics: Arc<FrontMetrics>,
}

/// A started front.
pub struct Running {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
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
    let running = start(args).await?;
    crate::webhook::wait_for_signal().await;
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
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
    let upstream = Upstream::new(&args.upstream)?;
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
        tokio::spawn(watch_upstream(
            upstream.clone(),
            ready.clone(),
            args.reload_interval,
        )),
    ];
    let encode = metrics.clone();
    background.push(tokio::spawn(crate::metrics::serve_probes(
        probe_listener,
        Arc::new(move || encode.encode()),
        ready,
    )));

    let front = Arc::new(Front {
        users,
        upstream,
        metrics,
    });
    let (shutdown, shutdown_rx) = watch::channel(false);
    let task = tokio::spawn(accept_loop(listener, acceptor, front, shutdown_rx));
    tracing::info!(%addr, %metrics_addr, upstream = %args.upstream, "registry front serving");
    Ok(Running {
        addr,
        metrics_addr,
        shutdown,
        task,
        background,
    })
}

/// Ready while the registry behind answers; checked every `interval`.
async fn watch_upstream(upstream: Upstream, ready: Arc<AtomicBool>, interval: Duration) {
    loop {
        let up = upstream.is_up().await;
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
    async fn handle(&self, request: Request<Incoming>, client_ip: &str) -> Response<Body> {
        let needed = if request.method() == Method::GET || request.method() == Method::HEAD {
            Role::Pull
        } else {
            Role::Push
        };
        let access = match needed {
            Role::Pull => "pull",
            Role::Push => "push",
        };
        let authorization = request
            .headers()
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        let response = match self.users.authorize(authorization, needed).await {
            Ok(_user) => self.upstream.forward(request, client_ip).await,
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
        response
    }
}
