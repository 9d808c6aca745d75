//! Forwarding an authorized request to the registry behind the front, streaming both bodies.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Bodies of the front's answers: the registry's or the remote's stream, or an error.
pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Headers that belong to one connection, not to the request (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The registry behind the front: a pooled HTTP/1.1 client to its base URL.
#[derive(Clone)]
pub struct Upstream {
    base: Uri,
    client: Client<HttpConnector, Body>,
    probe: Client<HttpConnector, Full<Bytes>>,
}

/// How long a read the registry failed with 500 waits before it is sent again, once.
const READ_RETRY_AFTER: std::time::Duration = std::time::Duration::from_millis(20);
/// A read is sent again only when the 500 came within this long.
const READ_RETRY_WITHIN: std::time::Duration = std::time::Duration::from_secs(1);

impl Upstream {
    /// `base` is `http://host:port`; the front only talks to its pod's registry over loopback.
    pub fn new(base: &str) -> anyhow::Result<Self> {
        let base: Uri = base
            .trim_end_matches('/')
            .parse()
            .map_err(|e| anyhow::anyhow!("--upstream {base:?}: {e}"))?;
        if base.scheme_str() != Some("http") || base.authority().is_none() {
            anyhow::bail!("--upstream {base}: expected http://host:port");
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        // Blobs stream in chunks of what one read returns: reading up to 64 KiB at a time
        // (instead of growing from 8 KiB) halves the reads and frames per blob.
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(64)
            .http1_read_buf_exact_size(64 * 1024)
            .build(connector.clone());
        let probe = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Upstream {
            base,
            client,
            probe,
        })
    }

    fn uri_for(&self, original: &Uri) -> Result<Uri, http::Error> {
        let path = original.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let mut parts = self.base.clone().into_parts();
        parts.path_and_query = Some(path.parse()?);
        Ok(Uri::from_parts(parts)?)
    }

    /// Whether the registry answers `/v2/` (any status below 500: it is up).
    pub async fn is_up(&self) -> bool {
        let Ok(uri) = self.uri_for(&Uri::from_static("/v2/")) else {
            return false;
        };
        let Ok(request) = Request::get(uri).body(Full::new(Bytes::new())) else {
            return false;
        };
        matches!(
            tokio::time::timeout(std::time::Duration::from_secs(3), self.probe.request(request)).await,
            Ok(Ok(response)) if response.status().as_u16() < 500
        )
    }

    /// Whether the registry holds manifest `reference` of `repository` (a HEAD of every
    /// manifest type; an error counts as not).
    pub async fn has_manifest(&self, repository: &str, reference: &str) -> bool {
        let path = format!("/v2/{repository}/manifests/{reference}");
        let Ok(path) = path.parse::<Uri>() else {
            return false;
        };
        let Ok(uri) = self.uri_for(&path) else {
            return false;
        };
        let Ok(request) = Request::head(uri)
            .header(http::header::ACCEPT, crate::oci::MANIFEST_ACCEPT)
            .body(Full::new(Bytes::new()))
        else {
            return false;
        };
        matches!(
            tokio::time::timeout(std::time::Duration::from_secs(5), self.probe.request(request)).await,
            Ok(Ok(response)) if response.status().is_success()
        )
    }

    /// A HEAD of `path` to the registry, waiting for its whole answer (a pull-through cache
    /// reads a cold blob through before it answers); its status, `None` when it did not answer.
    pub async fn head(&self, path: &str) -> Option<StatusCode> {
        let uri = self.uri_for(&path.parse::<Uri>().ok()?).ok()?;
        let request = Request::head(uri).body(Full::new(Bytes::new())).ok()?;
        let response = self.probe.request(request).await.ok()?;
        let status = response.status();
        // Read to its end, so that the registry has finished with the request.
        let _ = response.into_body().collect().await;
        Some(status)
    }

    /// Sends `request` on, without its credentials and hop-by-hop headers, and streams the
    /// answer back. `client_ip` goes in `X-Forwarded-For`.
    pub async fn forward(&self, request: Request<Incoming>, client_ip: &str) -> Response<Body> {
        let (mut parts, body) = request.into_parts();
        let uri = match self.uri_for(&parts.uri) {
            Ok(uri) => uri,
            Err(_) => return error(StatusCode::BAD_REQUEST, "UNSUPPORTED", "bad request path"),
        };
        // HTTP/2 carries the host in the URI only; keep it for the registry's logs.
        if !parts.headers.contains_key(header::HOST)
            && let Some(authority) = parts.uri.authority()
            && let Ok(host) = HeaderValue::from_str(authority.as_str())
        {
            parts.headers.insert(header::HOST, host);
        }
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::AUTHORIZATION);
        if let Ok(ip) = HeaderValue::from_str(client_ip) {
            parts
                .headers
                .insert(HeaderName::from_static("x-forwarded-for"), ip);
        }
        parts.headers.insert(
            HeaderName::from_static("x-forwarded-proto"),
            HeaderValue::from_static("https"),
        );
        parts.uri = uri;
        parts.version = http::Version::HTTP_11;
        // A read without a body that the registry fails with 500 at once is sent once more:
        // Distribution 2.8 answers 500 for a moment while it rewrites a file another request
        // reads (a proxied tag's link is rewritten on every pull of it, in place). Not after a
        // slow failure upstream, which a second try would only repeat.
        let read = (parts.method == Method::GET || parts.method == Method::HEAD)
            && hyper::body::Body::is_end_stream(&body);
        let again = read.then(|| parts.clone());
        let body = if read {
            empty()
        } else {
            body.map_err(Into::into).boxed()
        };
        let asked = std::time::Instant::now();
        let mut answer = self.client.request(Request::from_parts(parts, body)).await;
        if let (Some(parts), Ok(response)) = (again, &answer)
            && response.status() == StatusCode::INTERNAL_SERVER_ERROR
            && asked.elapsed() < READ_RETRY_WITHIN
        {
            tracing::warn!(
                path = parts.uri.path(),
                "the registry behind the front answered a read with 500; asking once more"
            );
            tokio::time::sleep(READ_RETRY_AFTER).await;
            answer = self
                .client
                .request(Request::from_parts(parts, empty()))
                .await;
        }
        match answer {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, body.map_err(Into::into).boxed())
            }
            Err(e) => {
                tracing::warn!(error = %e, "registry behind the front did not answer");
                error(
                    StatusCode::BAD_GATEWAY,
                    "UNAVAILABLE",
                    "the registry behind the front did not answer",
                )
            }
        }
    }
}

/// A body of `bytes`, whole.
pub fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

fn empty() -> Body {
    full(Bytes::new())
}

pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// An answer in the Distribution API's error format.
pub fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = error_body(code, message);
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header("docker-distribution-api-version", "registry/2.0")
        .body(full(body))
        .unwrap_or_default()
}

/// The body of an [`error`].
pub fn error_body(code: &str, message: &str) -> Bytes {
    Bytes::from(serde_json::json!({"errors": [{"code": code, "message": message}]}).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_with_those_connection_names() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-mine"),
        );
        headers.insert("x-mine", HeaderValue::from_static("1"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key(header::ACCEPT));
    }

    #[test]
    fn only_plain_http_upstreams_are_taken() {
        assert!(Upstream::new("http://127.0.0.1:5001").is_ok());
        assert!(Upstream::new("https://127.0.0.1:5001").is_err());
        assert!(Upstream::new("127.0.0.1:5001").is_err());
    }
}
