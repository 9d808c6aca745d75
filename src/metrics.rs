//! Prometheus metrics of the hook server and the plain-HTTP server for `/metrics`,
//! `/healthz` and `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HookLabels {
    pub hook: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub hook: String,
}

/// Metrics of `serve`.
pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<HookLabels, Counter>,
    pub latency: Family<LatencyLabels, Histogram>,
    pub cert_reloads: Counter,
    pub cert_reload_errors: Counter,
    pub controller: Arc<crate::controller::metrics::ControllerMetrics>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("registry_addon");
        let requests = Family::<HookLabels, Counter>::default();
        registry.register(
            "hook_requests",
            "Hook requests answered, by hook and response status",
            requests.clone(),
        );
        let latency = Family::<LatencyLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ])
        });
        registry.register(
            "hook_request_duration_seconds",
            "Time to answer a hook request",
            latency.clone(),
        );
        let cert_reloads = Counter::default();
        registry.register(
            "certificate_reloads",
            "Serving certificate reloads from disk",
            cert_reloads.clone(),
        );
        let cert_reload_errors = Counter::default();
        registry.register(
            "certificate_reload_errors",
            "Serving certificate files that changed but could not be loaded",
            cert_reload_errors.clone(),
        );
        let controller = Arc::new(crate::controller::metrics::ControllerMetrics::register(
            &mut registry,
        ));
        Metrics {
            registry,
            requests,
            latency,
            cert_reloads,
            cert_reload_errors,
            controller,
        }
    }
}

impl Metrics {
    pub fn observe(&self, hook: &str, status: &str, seconds: f64) {
        self.requests
            .get_or_create(&HookLabels {
                hook: hook.to_string(),
                status: status.to_string(),
            })
            .inc();
        self.latency
            .get_or_create(&LatencyLabels {
                hook: hook.to_string(),
            })
            .observe(seconds);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` (ready once `ready` is set) on plain HTTP.
pub async fn serve_probes(
    listener: TcpListener,
    encode: Arc<dyn Fn() -> String + Send + Sync>,
    ready: Arc<AtomicBool>,
) {
    serve_http1(listener, "metrics", move |req: Request<Incoming>| {
        let response = probe_response(&req, &*encode, &ready);
        async move { response }
    })
    .await
}

/// Serves plain HTTP/1.1 on `listener`, each request answered by `handle`; `what` names the
/// listener in logs.
pub async fn serve_http1<H, F, B>(listener: TcpListener, what: &'static str, handle: H)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, listener = what, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let answer = handle(req);
                async move { Ok::<_, std::convert::Infallible>(answer.await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

fn probe_response(
    req: &Request<Incoming>,
    encode: &(dyn Fn() -> String + Send + Sync),
    ready: &AtomicBool,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            encode(),
        ),
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" if ready.load(Ordering::Acquire) => {
            reply(StatusCode::OK, "text/plain", "ok\n".into())
        }
        "/readyz" => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready\n".into(),
        ),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// Binds the probe server's address, naming it in the error.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for metrics: {e}"))
}
