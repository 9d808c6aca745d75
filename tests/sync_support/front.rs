//! A front for a plain `docker-registry` that forwards every request and can add what the
//! registry cannot: Bearer token authentication (a `401` challenge, tokens issued for Basic
//! credentials at `/token`, each request's token checked against the repository and action
//! it needs), corrupted blob downloads, and refusal of monolithic uploads.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use futures::TryStreamExt;

/// What the front adds to the registry behind it.
#[derive(Default, Clone)]
pub struct FrontOptions {
    /// Bearer tokens for this user and password.
    pub bearer: Option<(String, String)>,
    /// Flip a byte in every blob download.
    pub corrupt_blobs: bool,
    /// Answer 405 to an upload PUT that carries the blob (a registry that needs PATCH).
    pub refuse_monolithic: bool,
}

struct Shared {
    upstream: String,
    me: String,
    options: FrontOptions,
    /// token → granted scopes
    tokens: Mutex<HashMap<String, Vec<String>>>,
    issued: AtomicU64,
    refused_uploads: AtomicU64,
    http: reqwest::Client,
}

/// A running front; `url` is what clients use.
pub struct Front {
    pub url: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Front {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Front {
    pub async fn start(upstream: &str, options: FrontOptions) -> Front {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let me = format!("127.0.0.1:{}", listener.local_addr().unwrap().port());
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_string(),
            me: me.clone(),
            options,
            tokens: Mutex::new(HashMap::new()),
            issued: AtomicU64::new(0),
            refused_uploads: AtomicU64::new(0),
            http: registry_addon::oci::build_http_client(None).unwrap(),
        });
        let app = axum::Router::new()
            .route("/token", axum::routing::get(token))
            .fallback(forward)
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Front {
            url: format!("http://{me}"),
            shared,
            task,
        }
    }

    pub fn tokens_issued(&self) -> u64 {
        self.shared.issued.load(Ordering::Relaxed)
    }

    pub fn refused_uploads(&self) -> u64 {
        self.shared.refused_uploads.load(Ordering::Relaxed)
    }
}

async fn token(State(s): State<Arc<Shared>>, req: Request) -> Response {
    let Some((user, password)) = &s.options.bearer else {
        return (StatusCode::NOT_FOUND, "no token service").into_response();
    };
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    );
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if given != Some(expected.as_str()) {
        return (StatusCode::UNAUTHORIZED, "bad credentials").into_response();
    }
    let query = req.uri().query().unwrap_or_default();
    let mut scopes = Vec::new();
    let mut service_ok = false;
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        match k {
            "scope" => scopes.push(v),
            "service" => service_ok = v == "test-registry",
            _ => {}
        }
    }
    if !service_ok {
        return (StatusCode::BAD_REQUEST, "wrong service").into_response();
    }
    let n = s.issued.fetch_add(1, Ordering::Relaxed);
    let tok = format!("token-{n}");
    s.tokens.lock().unwrap().insert(tok.clone(), scopes);
    axum::Json(serde_json::json!({"token": tok, "expires_in": 300})).into_response()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

/// The scopes a request needs: `registry:catalog:*`, or `repository:<repo>:<action>`, plus
/// pull on the source repository of a mount.
fn needed_scopes(method: &str, path: &str, query: &str) -> Vec<(String, &'static str)> {
    if path == "/v2/" || path == "/v2" {
        return Vec::new();
    }
    if path.starts_with("/v2/_catalog") {
        return vec![("registry:catalog".into(), "*")];
    }
    let rest = path.trim_start_matches("/v2/");
    let repo_end = ["/manifests/", "/blobs/", "/tags/"]
        .iter()
        .filter_map(|m| rest.find(m))
        .min()
        .unwrap_or(rest.len());
    let repo = &rest[..repo_end];
    let action = if method == "GET" || method == "HEAD" {
        "pull"
    } else {
        "push"
    };
    let mut needed = vec![(format!("repository:{repo}"), action)];
    if let Some(from) = query.split('&').find_map(|p| p.strip_prefix("from=")) {
        needed.push((format!("repository:{}", percent_decode(from)), "pull"));
    }
    needed
}

fn granted(scopes: &[String], resource: &str, action: &str) -> bool {
    scopes.iter().any(|s| {
        s.rsplit_once(':').is_some_and(|(res, actions)| {
            res == resource && actions.split(',').any(|a| a == action || a == "*")
        })
    })
}

async fn forward(State(s): State<Arc<Shared>>, req: Request) -> Response {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let needed = needed_scopes(&method, &path, &query);
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let scopes = token
        .as_ref()
        .and_then(|t| s.tokens.lock().unwrap().get(t).cloned());
    let allowed = s.options.bearer.is_none()
        || match &scopes {
            Some(scopes) => needed
                .iter()
                .all(|(res, action)| granted(scopes, res, action)),
            None => false,
        };
    if !allowed {
        let scope = needed
            .first()
            .map(|(res, action)| {
                let actions = if *action == "push" {
                    "pull,push"
                } else {
                    action
                };
                format!(",scope=\"{res}:{actions}\"")
            })
            .unwrap_or_default();
        let challenge = format!(
            "Bearer realm=\"http://{}/token\",service=\"test-registry\"{scope}",
            s.me
        );
        let mut resp = (StatusCode::UNAUTHORIZED, "").into_response();
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_str(&challenge).unwrap(),
        );
        return resp;
    }
    let body_length = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if s.options.refuse_monolithic
        && method == "PUT"
        && path.contains("/blobs/uploads/")
        && body_length != Some(0)
    {
        s.refused_uploads.fetch_add(1, Ordering::Relaxed);
        // Read the body first, as a registry would, so the client sees the answer.
        let _ = axum::body::to_bytes(req.into_body(), usize::MAX).await;
        return (StatusCode::METHOD_NOT_ALLOWED, "use PATCH").into_response();
    }
    let corrupt = s.options.corrupt_blobs && method == "GET" && path.contains("/blobs/sha256:");
    let url = format!(
        "{}{}{}",
        s.upstream,
        path,
        if query.is_empty() {
            String::new()
        } else {
            format!("?{query}")
        }
    );
    let mut headers = HeaderMap::new();
    for (k, v) in req.headers() {
        // Repeated headers (a client's several Accept lines) all go on.
        if k != header::HOST && k != header::AUTHORIZATION {
            headers.append(k.clone(), v.clone());
        }
    }
    // Upload Locations must point back at this front.
    headers.insert("x-forwarded-host", HeaderValue::from_str(&s.me).unwrap());
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    let body = reqwest::Body::wrap_stream(req.into_body().into_data_stream());
    let upstream = s
        .http
        .request(method.parse().unwrap(), url)
        .headers(headers)
        .body(body)
        .send()
        .await;
    let upstream = match upstream {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    let mut resp = Response::builder().status(upstream.status().as_u16());
    for (k, v) in upstream.headers() {
        if k != header::TRANSFER_ENCODING && k != header::CONNECTION {
            resp = resp.header(k, v);
        }
    }
    let mut first = corrupt;
    let stream = upstream
        .bytes_stream()
        .map_err(std::io::Error::other)
        .map_ok(move |chunk| {
            if first && !chunk.is_empty() {
                first = false;
                let mut bytes = chunk.to_vec();
                bytes[0] ^= 0xff;
                return bytes::Bytes::from(bytes);
            }
            chunk
        });
    resp.body(Body::from_stream(stream)).unwrap()
}

#[test]
fn scopes_of_requests() {
    assert_eq!(
        needed_scopes("HEAD", "/v2/a/b/manifests/v1", ""),
        vec![("repository:a/b".to_string(), "pull")]
    );
    assert_eq!(
        needed_scopes("POST", "/v2/x/blobs/uploads/", "mount=sha256:1&from=y%2Fz"),
        vec![
            ("repository:x".to_string(), "push"),
            ("repository:y/z".to_string(), "pull")
        ]
    );
    assert!(granted(
        &["repository:x:pull,push".into()],
        "repository:x",
        "push"
    ));
    assert!(!granted(
        &["repository:x:pull".into()],
        "repository:x",
        "push"
    ));
}
