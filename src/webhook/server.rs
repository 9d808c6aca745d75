//! Listening, TLS, HTTP/1.1 and HTTP/2, request limits and routing.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::addon::reconcile::AddonReconciler;
use crate::cli::ServeArgs;
use crate::controller::{self, ControllerConfig};
use crate::duration::parse_go_duration;
use crate::hooks::{self, HookConfig, HookContext, Management, Prepared};
use crate::metrics::{self, Metrics};
use crate::names::{HOOKS_PATH_PREFIX, MAX_REQUEST_BYTES};
use crate::webhook::handlers::{self, HandlerSpec};
use crate::webhook::tls::{self, CertFiles, ReloadingResolver};
use crate::wire::runtime::{Hook, Response as HookResponse, Status};

/// CAPI's default hook timeout, used when a request carries no `?timeout=`.
const DEFAULT_BUDGET: Duration = Duration::from_secs(10);
/// CAPI allows at most 30 s per handler.
const MAX_BUDGET: Duration = Duration::from_secs(30);
/// How often the certificate files are checked for changes.
const CERT_POLL: Duration = Duration::from_secs(1);
/// Time for a TLS handshake, and for an HTTP/1.1 client to send its headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What answers requests: the advertised handlers and the hooks' context.
pub struct App {
    pub handlers: Vec<HandlerSpec>,
    /// The DiscoveryResponse, encoded once: the handler table never changes while serving.
    discovery_body: Bytes,
    pub ctx: Arc<HookContext>,
    pub metrics: Arc<Metrics>,
}

/// A started server.
pub struct Running {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// Where the self-signed CA was written, when no certificate files were given.
    pub ca_file: Option<PathBuf>,
    pub metrics: Arc<Metrics>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
    controller: Option<JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, lets open requests finish (up to 10 s), then returns.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
        if let Some(controller) = self.controller {
            let _ = controller.await;
        }
    }
}

/// `registry-addon serve`: runs until SIGTERM or Ctrl-C.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let running = start(args).await?;
    wait_for_signal().await;
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}

pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Connects to the management cluster as `KUBECONFIG` or the in-cluster config says.
pub async fn management_from_env() -> Management {
    match kube::Config::infer().await {
        Ok(config) => match kube::Client::try_from(config) {
            Ok(client) => Management::Client(client),
            Err(e) => Management::Unavailable(format!("cannot build a Kubernetes client: {e}")),
        },
        Err(e) => Management::Unavailable(format!("no Kubernetes configuration found: {e}")),
    }
}

/// Binds both listeners and starts serving; the management cluster comes from the environment.
pub async fn start(args: ServeArgs) -> anyhow::Result<Running> {
    let management = management_from_env().await;
    if let Management::Unavailable(reason) = &management {
        tracing::warn!(%reason, "management cluster unreachable; hooks will answer Failure until it is");
    }
    start_with(args, management).await
}

/// Like [`start`], with the management cluster given.
pub async fn start_with(args: ServeArgs, management: Management) -> anyhow::Result<Running> {
    let metrics = Arc::new(Metrics::default());

    let (resolver, ca_file) = match (&args.tls_cert_file, &args.tls_key_file) {
        (Some(cert), Some(key)) => {
            let files = CertFiles {
                cert: cert.clone(),
                key: key.clone(),
            };
            let (hash, key) = files.initial()?;
            let resolver = Arc::new(ReloadingResolver::new(key));
            let counters = tls::ReloadCounters {
                reloads: metrics.cert_reloads.clone(),
                errors: metrics.cert_reload_errors.clone(),
            };
            tokio::spawn(files.watch(hash, resolver.clone(), counters, CERT_POLL));
            (resolver, None)
        }
        _ => {
            let extra = match args.listen.ip() {
                ip if ip.is_unspecified() || ip.is_loopback() => Vec::new(),
                ip => vec![ip.to_string()],
            };
            let pair = tls::self_signed(&extra)?;
            let ca_file = args
                .self_signed_ca_file
                .clone()
                .unwrap_or_else(|| std::env::temp_dir().join("registry-addon-serving-ca.crt"));
            std::fs::write(&ca_file, &pair.ca_pem).map_err(|e| {
                anyhow::anyhow!(
                    "cannot write the self-signed CA to {}: {e}",
                    ca_file.display()
                )
            })?;
            tracing::info!(ca_file = %ca_file.display(), "no --tls-cert-file given: serving a self-signed certificate; its CA is in the file named here");
            let key =
                tls::certified_key_from_pem(pair.cert_pem.as_bytes(), pair.key_pem.as_bytes())?;
            (Arc::new(ReloadingResolver::new(key)), Some(ca_file))
        }
    };
    let acceptor = TlsAcceptor::from(Arc::new(tls::server_config(resolver)?));

    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr()?;
    let probe_listener = metrics::bind(args.metrics_listen).await?;
    let metrics_addr = probe_listener.local_addr()?;

    let handlers = handlers::advertised(&args.hooks);
    let config = HookConfig {
        namespace: args.namespace.clone(),
        addon: args.addon.clone(),
    };
    let controller_client = match (&management, args.controller) {
        (Management::Client(client), true) => Some(client.clone()),
        (Management::Unavailable(_), true) => {
            tracing::warn!("no management cluster: the controller does not run");
            None
        }
        (_, false) => None,
    };
    let discovery_body = Bytes::from(
        serde_json::to_vec(&HookResponse::discovery(handlers::discovery(&handlers)))
            .map_err(|e| anyhow::anyhow!("cannot encode the discovery response: {e}"))?,
    );
    // The hooks and the controller share one context: per-cluster locks, workload clients.
    let ctx = Arc::new(HookContext::new(config, management));
    let app = Arc::new(App {
        handlers,
        discovery_body,
        ctx: ctx.clone(),
        metrics: metrics.clone(),
    });

    let ready = Arc::new(AtomicBool::new(false));
    let encode_metrics = metrics.clone();
    tokio::spawn(metrics::serve_probes(
        probe_listener,
        Arc::new(move || encode_metrics.encode()),
        ready.clone(),
    ));

    let (shutdown, shutdown_rx) = watch::channel(false);
    let controller = controller_client.map(|client| {
        let config =
            ControllerConfig::new(&args.namespace, args.watch_namespaces.clone(), args.resync);
        let reconciler = Arc::new(AddonReconciler::new(
            ctx.clone(),
            Arc::new(controller::clock::SystemClock),
        ));
        tokio::spawn(controller::run_until(
            client,
            config,
            reconciler,
            metrics.controller.clone(),
            shutdown_rx.clone(),
        ))
    });
    let task = tokio::spawn(accept_loop(listener, acceptor, app, shutdown_rx));
    ready.store(true, Ordering::Release);
    tracing::info!(%addr, %metrics_addr, "serving Runtime SDK hooks");
    Ok(Running {
        addr,
        metrics_addr,
        ca_file,
        metrics,
        shutdown,
        task,
        controller,
    })
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    app: Arc<App>,
    shutdown: watch::Receiver<bool>,
) {
    serve_tls(listener, acceptor, shutdown, move |_peer| {
        let app = app.clone();
        hyper::service::service_fn(move |req| handle(app.clone(), req))
    })
    .await
}

/// Accepts TLS connections until `shutdown` turns true, serving each over HTTP/1.1 or HTTP/2
/// (ALPN) with the service `make` builds for its peer, then lets open requests finish (up to
/// 10 s). Shared by the hook server and the registry front.
pub async fn serve_tls<F, S, B>(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    mut shutdown: watch::Receiver<bool>,
    make: F,
) where
    F: Fn(SocketAddr) -> S,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let service = make(peer);
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HANDSHAKE_TIMEOUT);
            // Adaptive flow-control windows: large blobs stream at full speed over HTTP/2.
            builder
                .http2()
                .timer(TokioTimer::new())
                .adaptive_window(true)
                .max_concurrent_streams(256);
            let conn = builder.serve_connection(TokioIo::new(tls), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, error = %e, "connection closed with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("open connections did not finish within 10s");
    }
}

type HttpResponse = Response<Full<Bytes>>;

fn plain(status: StatusCode, text: &str) -> HttpResponse {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(format!("{text}\n"))))
        .unwrap_or_default()
}

fn json(response: &HookResponse) -> HttpResponse {
    let body = serde_json::to_vec(response).unwrap_or_default();
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

/// Answers one HTTP request. Everything CAPI can send gets a 200 with a Runtime SDK body;
/// what CAPI never sends (other methods, unknown paths, oversized bodies) gets a plain 4xx.
pub async fn handle(app: Arc<App>, req: Request<Incoming>) -> Result<HttpResponse, Infallible> {
    let started = Instant::now();
    let path = req.uri().path().to_string();
    let Some(rest) = path.strip_prefix(HOOKS_PATH_PREFIX) else {
        return Ok(plain(StatusCode::NOT_FOUND, "not found"));
    };
    let target = if rest == "discovery" {
        None
    } else {
        match handlers::route(&app.handlers, rest) {
            Some(spec) => Some(*spec),
            None => return Ok(plain(StatusCode::NOT_FOUND, "no such hook handler")),
        }
    };
    if req.method() != Method::POST {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "use POST");
        response
            .headers_mut()
            .insert(header::ALLOW, http::HeaderValue::from_static("POST"));
        return Ok(response);
    }
    let budget = budget_from_query(req.uri().query());
    let declared_too_large = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|len| len > MAX_REQUEST_BYTES as u64);
    if declared_too_large {
        return Ok(too_large());
    }
    let body = match Limited::new(req.into_body(), MAX_REQUEST_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return Ok(too_large());
        }
        Err(e) => {
            tracing::debug!(error = %e, "request body could not be read");
            return Ok(plain(
                StatusCode::BAD_REQUEST,
                "request body could not be read",
            ));
        }
    };

    let Some(spec) = target else {
        let (status, response) = discovery(&app, &body);
        app.metrics
            .observe("Discovery", status, started.elapsed().as_secs_f64());
        return Ok(response);
    };
    let response = run_hook(&app, spec.hook, body, budget).await;
    let status = match response.status {
        Status::Success => "Success",
        Status::Failure => "Failure",
    };
    app.metrics
        .observe(spec.hook.name(), status, started.elapsed().as_secs_f64());
    Ok(json(&response))
}

fn too_large() -> HttpResponse {
    plain(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("request body exceeds {} bytes", MAX_REQUEST_BYTES),
    )
}

/// Discovery takes an (empty) DiscoveryRequest; only a body that is not JSON is refused.
fn discovery(app: &App, body: &[u8]) -> (&'static str, HttpResponse) {
    if !body.iter().all(u8::is_ascii_whitespace)
        && serde_json::from_slice::<serde::de::IgnoredAny>(body).is_err()
    {
        let failure = HookResponse::discovery_failure("request body is not valid JSON");
        return ("Failure", json(&failure));
    }
    let response = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(app.discovery_body.clone()))
        .unwrap_or_default();
    ("Success", response)
}

/// Decodes the request on the connection's task and answers at once what needs no I/O (bad
/// requests, clusters with the addon off). Real work runs in its own task so that it finishes
/// its writes even if the caller goes away, and a bug cannot take the connection down; the
/// answer comes before the caller's deadline.
async fn run_hook(app: &Arc<App>, hook: Hook, body: Bytes, budget: Duration) -> HookResponse {
    let prepared = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        hooks::prepare(&app.ctx, hook, &body)
    }));
    let work = match prepared {
        Ok(Prepared::Answer(response)) => return response,
        Ok(work) => work,
        Err(_) => {
            tracing::error!(%hook, "decoding a hook request failed unexpectedly");
            return internal_error(hook);
        }
    };
    drop(body);
    let deadline = budget.saturating_sub((budget / 10).max(Duration::from_millis(200)));
    let deadline = deadline.max(Duration::from_millis(100));
    let ctx = app.ctx.clone();
    let task = tokio::spawn(async move { hooks::run(&ctx, work, deadline).await });
    match tokio::time::timeout(deadline, task).await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => {
            tracing::error!(%hook, error = %e, "hook handler failed unexpectedly");
            internal_error(hook)
        }
        Err(_) if hook.is_blocking() => HookResponse::retry(
            hook,
            10,
            format!(
                "{hook}: work did not finish within {}s; it goes on and the next call picks it up",
                budget.as_secs()
            ),
        ),
        Err(_) => HookResponse::failure(
            hook,
            format!("{hook}: did not finish within {}s", budget.as_secs()),
        ),
    }
}

fn internal_error(hook: Hook) -> HookResponse {
    HookResponse::failure(
        hook,
        format!("{hook}: internal error; see the extension's log"),
    )
}

/// The caller's deadline from `?timeout=<Go duration>`; CAPI's default when absent or unusable.
pub fn budget_from_query(query: Option<&str>) -> Duration {
    query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter_map(|pair| pair.strip_prefix("timeout="))
        .find_map(|value| parse_go_duration(value).ok())
        .filter(|d| !d.is_zero())
        .map(|d| d.min(MAX_BUDGET))
        .unwrap_or(DEFAULT_BUDGET)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_follows_timeout_query() {
        assert_eq!(budget_from_query(None), DEFAULT_BUDGET);
        assert_eq!(
            budget_from_query(Some("timeout=10s")),
            Duration::from_secs(10)
        );
        assert_eq!(budget_from_query(Some("a=b&timeout=1m30s")), MAX_BUDGET);
        assert_eq!(
            budget_from_query(Some("timeout=500ms")),
            Duration::from_millis(500)
        );
        assert_eq!(budget_from_query(Some("timeout=bogus")), DEFAULT_BUDGET);
        assert_eq!(budget_from_query(Some("timeout=0s")), DEFAULT_BUDGET);
    }
}
