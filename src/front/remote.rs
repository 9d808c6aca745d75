//! Direct mode: the front forwards pulls to a remote registry (`--remote`), adding the
//! mirror's own credentials for it, and stores nothing.
//!
//! Path mapping: `--remote https://host[:port]/some/prefix` makes mirror repository `foo/bar`
//! the remote's `some/prefix/foo/bar`, so `/v2/foo/bar/manifests/v1` is sent as
//! `/v2/some/prefix/foo/bar/manifests/v1`; without a path the names are kept. containerd's
//! `?ns=` query names the registry the node asked for and is dropped; other query parameters
//! (`tags/list?n=…`) go on.
//!
//! Authentication to the remote: Basic when it asks for it, or Docker/OCI token
//! authentication (a Bearer challenge names a token service; tokens are fetched there with
//! the credentials, kept per scope until shortly before they expire, and one fetch per scope
//! serves every request waiting for it). Blob redirects (object storage) are followed here, so
//! nodes need only reach the mirror; credentials never go to another host.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use reqwest::Url;
use sha2::{Digest, Sha256};

use super::proxy::{self, Body};
use crate::oci::HttpClients;
use crate::oci::auth::{AuthState, Credentials, parse_challenges, request_token};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RemoteErrorLabels {
    /// `connect`, `tls`, `timeout`, `credentials_refused`, `no_credentials`,
    /// `token_service`, `bad_challenge`, `server_error` or `other`.
    pub reason: &'static str,
}

/// Metrics of the remote side, registered by the front.
#[derive(Clone, Default)]
pub struct RemoteMetrics {
    pub errors: Family<RemoteErrorLabels, Counter>,
    pub token_fetches: Counter,
}

/// The remote registry of Direct mode.
pub struct Remote {
    /// `https://host[:port]`, no path.
    base: Url,
    /// The remote's repository prefix, without slashes at either end; may be empty.
    prefix: String,
    /// `host[:port]`, for messages.
    host: String,
    http: HttpClients,
    credentials: CredentialsDir,
    auth: Mutex<AuthState>,
    /// One lock per token scope, so concurrent requests share one token fetch.
    fetching: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    metrics: RemoteMetrics,
}

/// A failure on the remote side, answered to the client as 502.
#[derive(Debug)]
struct Failure {
    reason: &'static str,
    code: &'static str,
    message: String,
}

/// Where one client request goes.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    path_and_query: String,
    /// Token scope, e.g. `repository:prefix/foo:pull`; empty for `/v2/`.
    scope: String,
    blob: bool,
}

impl Remote {
    /// Validates `url` (`--remote`), reads the CA bundle and the credentials.
    pub fn new(
        url: &str,
        ca_file: Option<&Path>,
        credentials_dir: Option<PathBuf>,
        metrics: RemoteMetrics,
    ) -> anyhow::Result<Self> {
        let (base, prefix) =
            parse_remote(url).map_err(|e| anyhow::anyhow!("--remote {url:?}: {e}"))?;
        let ca = match ca_file {
            Some(file) => Some(std::fs::read(file).map_err(|e| {
                anyhow::anyhow!("--remote-ca {}: cannot read: {e}", file.display())
            })?),
            None => None,
        };
        let http =
            crate::oci::build_remote_http_clients(ca.as_deref()).map_err(|e| match ca_file {
                Some(file) => anyhow::anyhow!("--remote-ca {}: {e}", file.display()),
                None => anyhow::anyhow!("HTTP client for --remote: {e}"),
            })?;
        let credentials = CredentialsDir::load(credentials_dir)?;
        let host = match base.port() {
            Some(port) => format!("{}:{port}", base.host_str().unwrap_or_default()),
            None => base.host_str().unwrap_or_default().to_string(),
        };
        Ok(Remote {
            base,
            prefix,
            host,
            http,
            credentials,
            auth: Mutex::new(AuthState::default()),
            fetching: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    /// `host[:port]` of the remote.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Polls the credentials directory every `interval`; new credentials drop every token.
    pub async fn watch_credentials(self: Arc<Self>, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            match self.credentials.reload() {
                Ok(true) => {
                    let mut auth = self.lock_auth();
                    let mut fresh = AuthState::default();
                    fresh.basic = auth.basic;
                    fresh.bearer = auth.bearer.take();
                    *auth = fresh;
                    tracing::info!(remote = %self.host, "remote credentials reloaded");
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reload the remote credentials; keeping the previous ones")
                }
            }
        }
    }

    /// Whether the remote answers `GET /v2/` with 200 or 401 (it is up and speaks the API).
    pub async fn is_up(&self) -> bool {
        let Ok(url) = self.base.join("/v2/") else {
            return false;
        };
        let sent = self
            .http
            .metadata
            .get(url)
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        match sent {
            Ok(resp) if matches!(resp.status().as_u16(), 200 | 401) => true,
            Ok(resp) => {
                self.count(if resp.status().is_server_error() {
                    "server_error"
                } else {
                    "other"
                });
                false
            }
            Err(e) => {
                let reason = transport_reason(&e);
                self.count(reason);
                tracing::debug!(remote = %self.host, reason, error = %error_chain(&e), "remote check failed");
                false
            }
        }
    }

    fn count(&self, reason: &'static str) {
        self.metrics
            .errors
            .get_or_create(&RemoteErrorLabels { reason })
            .inc();
    }

    fn lock_auth(&self) -> std::sync::MutexGuard<'_, AuthState> {
        // A panic while holding this lock cannot leave the state inconsistent.
        self.auth.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends an authorized GET or HEAD on to the remote and streams the answer back.
    pub async fn forward(&self, request: Request<Incoming>) -> Response<Body> {
        let (parts, _body) = request.into_parts();
        match self.fetch(&parts.method, &parts.uri, &parts.headers).await {
            Ok(resp) => self.streamed(resp),
            Err(answer) => answer,
        }
    }

    /// Sends a GET or HEAD for the client's `uri` on to the remote, authenticated: the
    /// remote's answer, or the error to answer the client with instead (404 for a path
    /// outside the pull API, 502 naming what failed on the remote side).
    pub(super) async fn fetch(
        &self,
        method: &Method,
        uri: &http::Uri,
        headers: &HeaderMap,
    ) -> Result<reqwest::Response, Response<Body>> {
        let target = target_for(&self.prefix, uri.path(), uri.query().unwrap_or_default())
            .map_err(|message| proxy::error(StatusCode::NOT_FOUND, "NAME_INVALID", &message))?;
        self.send(method, headers, &target)
            .await
            .map_err(|failure| {
                self.count(failure.reason);
                tracing::warn!(
                    remote = %self.host,
                    reason = failure.reason,
                    error = %failure.message,
                    "remote registry request failed"
                );
                proxy::error(StatusCode::BAD_GATEWAY, failure.code, &failure.message)
            })
    }

    /// The remote's answer as the client's, its body streamed.
    pub(super) fn streamed(&self, resp: reqwest::Response) -> Response<Body> {
        if resp.status().is_server_error() {
            self.count("server_error");
        }
        let resp: Response<reqwest::Body> = resp.into();
        let (mut parts, body) = resp.into_parts();
        proxy::strip_hop_by_hop(&mut parts.headers);
        let body = body.map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) });
        Response::from_parts(parts, body.boxed())
    }

    async fn send(
        &self,
        method: &Method,
        client_headers: &HeaderMap,
        target: &Target,
    ) -> Result<reqwest::Response, Failure> {
        let url = self
            .base
            .join(&target.path_and_query)
            .map_err(|e| Failure {
                reason: "other",
                code: "NAME_INVALID",
                message: format!("bad path for {}: {e}", self.host),
            })?;
        let client = if target.blob {
            &self.http.blobs
        } else {
            &self.http.metadata
        };
        let mut headers = client_headers.clone();
        proxy::strip_hop_by_hop(&mut headers);
        for name in [header::HOST, header::AUTHORIZATION, header::COOKIE] {
            headers.remove(name);
        }
        let mut challenged = false;
        loop {
            let authorization = self.authorization(&target.scope).await?;
            let mut request = client
                .request(method.clone(), url.clone())
                .headers(headers.clone());
            if let Some(value) = &authorization {
                request = request.header(header::AUTHORIZATION, value.as_str());
            }
            let resp = request.send().await.map_err(|e| {
                let reason = transport_reason(&e);
                // The URL may be a redirect's, signed: a credential of its own.
                let e = e.without_url();
                Failure {
                    reason,
                    code: "UNAVAILABLE",
                    message: format!("remote registry {}: {}", self.host, error_chain(&e)),
                }
            })?;
            if resp.status() != StatusCode::UNAUTHORIZED {
                return Ok(resp);
            }
            if challenged {
                return Err(Failure {
                    reason: "credentials_refused",
                    code: "DENIED",
                    message: format!(
                        "remote registry {} refused the mirror's credentials (HTTP 401)",
                        self.host
                    ),
                });
            }
            challenged = true;
            self.answer_challenge(&target.scope, resp.headers(), authorization.as_deref())
                .await?;
        }
    }

    /// The `Authorization` to send for `scope`, from what the remote asked for so far.
    async fn authorization(&self, scope: &str) -> Result<Option<String>, Failure> {
        let (token, basic, bearer) = {
            let auth = self.lock_auth();
            (auth.token(scope), auth.basic, auth.bearer.is_some())
        };
        if let Some(token) = token {
            return Ok(Some(format!("Bearer {token}")));
        }
        if bearer {
            let token = self.token(scope, None, None).await?;
            return Ok(Some(format!("Bearer {token}")));
        }
        if basic && let Some(creds) = self.credentials.get() {
            return Ok(Some(creds.basic_header()));
        }
        Ok(None)
    }

    async fn answer_challenge(
        &self,
        scope: &str,
        headers: &reqwest::header::HeaderMap,
        sent: Option<&str>,
    ) -> Result<(), Failure> {
        let challenges: Vec<_> = headers
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(parse_challenges)
            .collect();
        let failure = |reason: &'static str, message: String| Failure {
            reason,
            code: "DENIED",
            message: format!("remote registry {}: {message}", self.host),
        };
        if let Some(bearer) = challenges.iter().find(|c| c.scheme == "bearer") {
            let Some(realm) = bearer.param("realm") else {
                return Err(failure(
                    "bad_challenge",
                    "Bearer challenge without realm".into(),
                ));
            };
            let service = bearer.param("service").map(str::to_string);
            self.lock_auth().bearer = Some((realm.to_string(), service));
            // A token we sent was refused (expired early, or short of scope): fetch anew,
            // unless another request already did.
            let stale = sent.and_then(|s| s.strip_prefix("Bearer "));
            self.token(scope, bearer.param("scope"), stale).await?;
            return Ok(());
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            if self.credentials.get().is_none() {
                return Err(failure(
                    "no_credentials",
                    "asks for credentials and none are configured (--remote-credentials)".into(),
                ));
            }
            if sent.is_some_and(|s| s.starts_with("Basic ")) {
                return Err(failure(
                    "credentials_refused",
                    "refused the mirror's credentials (HTTP 401)".into(),
                ));
            }
            self.lock_auth().basic = true;
            return Ok(());
        }
        Err(failure(
            "bad_challenge",
            "HTTP 401 without a Basic or Bearer challenge".into(),
        ))
    }

    /// A token for `scope`: cached, or fetched once however many requests wait for it.
    /// `wanted` is the scope the remote's challenge named; `stale` a token it refused.
    async fn token(
        &self,
        scope: &str,
        wanted: Option<&str>,
        stale: Option<&str>,
    ) -> Result<String, Failure> {
        let gate = self
            .fetching
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(scope.to_string())
            .or_default()
            .clone();
        let _held = gate.lock().await;
        let (cached, bearer) = {
            let auth = self.lock_auth();
            (auth.token(scope), auth.bearer.clone())
        };
        if let Some(token) = cached
            && Some(token.as_str()) != stale
        {
            return Ok(token);
        }
        let Some((realm, service)) = bearer else {
            return Err(Failure {
                reason: "bad_challenge",
                code: "DENIED",
                message: format!("remote registry {}: no token service known", self.host),
            });
        };
        let realm_url = Url::parse(&realm)
            .or_else(|_| self.base.join(&realm))
            .map_err(|e| Failure {
                reason: "bad_challenge",
                code: "DENIED",
                message: format!("remote registry {}: token realm {realm:?}: {e}", self.host),
            })?;
        // Ask for what the remote says it wants as well as what the request needs.
        let mut scopes: Vec<&str> = scope.split(' ').filter(|s| !s.is_empty()).collect();
        for s in wanted.unwrap_or_default().split(' ') {
            if !s.is_empty() && !scopes.contains(&s) {
                scopes.push(s);
            }
        }
        self.metrics.token_fetches.inc();
        let credentials = self.credentials.get();
        let (token, expires_in) = request_token(
            &self.http.metadata,
            realm_url,
            service.as_deref(),
            &scopes.join(" "),
            credentials.as_ref(),
        )
        .await
        .map_err(|e| Failure {
            reason: match e.status {
                Some(401 | 403) => "credentials_refused",
                _ => "token_service",
            },
            code: "DENIED",
            message: format!("remote registry {}: {}", self.host, e.message),
        })?;
        self.lock_auth()
            .store_token(scope, token.clone(), expires_in);
        Ok(token)
    }
}

/// Splits `https://host[:port][/path]` into its base and repository prefix.
fn parse_remote(url: &str) -> Result<(Url, String), String> {
    let parsed = Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
    if parsed.scheme() != "https" {
        return Err("must be https://host[:port][/path]".into());
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("no host".into());
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("credentials do not belong in the URL; use --remote-credentials".into());
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err("no query or fragment allowed".into());
    }
    let prefix = parsed.path().trim_matches('/').to_string();
    if !prefix.is_empty() && !prefix.split('/').all(valid_name_component) {
        return Err(format!(
            "path {prefix:?} is not a repository prefix (lower-case letters, digits and . _ -)"
        ));
    }
    let mut base = parsed;
    base.set_path("/");
    Ok((base, prefix))
}

/// A repository name component as the distribution spec allows it:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`; never `.` or `..`.
fn valid_name_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    !bytes.is_empty()
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b"._-".contains(b))
        && !component.contains("..")
}

/// A tag or digest: `[A-Za-z0-9_.:+-]`, not starting with a dot.
fn valid_reference(reference: &str) -> bool {
    !reference.is_empty()
        && !reference.starts_with('.')
        && reference
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:+-".contains(&b))
}

/// Whether images of `registry` (as containerd names it in `ns`) are those of the registry at
/// `host`: the host itself, or Docker Hub's name for its API hosts.
pub fn serves_registry(host: &str, registry: &str) -> bool {
    registry == host || crate::hooks::patches::containerd::hosts_directory(host) == registry
}

/// The `ns` query parameter containerd adds for a mirror: the image's own registry.
pub fn ns_of(query: &str) -> Option<String> {
    let value = query.split('&').find_map(|p| p.strip_prefix("ns="))?;
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, ..) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok().filter(|ns| !ns.is_empty())
}

/// Maps a client's path and query to the remote's (see the module comment). Only the pull
/// API is served: `/v2/`, manifests, blobs, tags and referrers.
fn target_for(prefix: &str, path: &str, query: &str) -> Result<Target, String> {
    let query: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty() && *p != "ns" && !p.starts_with("ns="))
        .collect();
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{}", query.join("&"))
    };
    if path == "/v2/" || path == "/v2" {
        return Ok(Target {
            path_and_query: "/v2/".into(),
            scope: String::new(),
            blob: false,
        });
    }
    let rest = path
        .strip_prefix("/v2/")
        .ok_or_else(|| format!("{path}: not a registry API path"))?;
    let segments: Vec<&str> = rest.split('/').collect();
    let n = segments.len();
    let unsupported = || format!("{path}: not part of the pull API this mirror forwards");
    if n < 3 {
        return Err(unsupported());
    }
    let (kind, last) = (segments[n - 2], segments[n - 1]);
    let ok = match kind {
        "manifests" | "blobs" | "referrers" => valid_reference(last),
        "tags" => last == "list",
        _ => false,
    };
    let name = &segments[..n - 2];
    if !ok || !name.iter().all(|c| valid_name_component(c)) {
        return Err(unsupported());
    }
    let name = name.join("/");
    let remote_name = if prefix.is_empty() {
        name
    } else {
        format!("{prefix}/{name}")
    };
    Ok(Target {
        path_and_query: format!("/v2/{remote_name}/{kind}/{last}{query}"),
        scope: format!("repository:{remote_name}:pull"),
        blob: kind == "blobs",
    })
}

/// Why a request to the remote failed, for the metrics.
fn transport_reason(e: &reqwest::Error) -> &'static str {
    let chain = error_chain(e);
    if chain.contains("certificate") || chain.contains("tls") || chain.contains("TLS") {
        "tls"
    } else if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else {
        "other"
    }
}

/// An error and its sources on one line: reqwest's own message alone hides the cause
/// ("error sending request").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// A mounted `kubernetes.io/basic-auth` Secret: files `username` and `password`.
struct CredentialsDir {
    dir: Option<PathBuf>,
    current: RwLock<(Option<Credentials>, [u8; 32])>,
}

impl CredentialsDir {
    fn load(dir: Option<PathBuf>) -> anyhow::Result<Self> {
        let current = match &dir {
            Some(dir) => read_credentials(dir)?,
            None => (None, [0; 32]),
        };
        Ok(CredentialsDir {
            dir,
            current: RwLock::new(current),
        })
    }

    fn get(&self) -> Option<Credentials> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    /// Rereads the files; `true` when they changed.
    fn reload(&self) -> anyhow::Result<bool> {
        let Some(dir) = &self.dir else {
            return Ok(false);
        };
        let fresh = read_credentials(dir)?;
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if current.1 == fresh.1 {
            return Ok(false);
        }
        *current = fresh;
        Ok(true)
    }
}

fn read_credentials(dir: &Path) -> anyhow::Result<(Option<Credentials>, [u8; 32])> {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name)).map_err(|e| {
            anyhow::anyhow!(
                "--remote-credentials {}: cannot read {name}: {e}",
                dir.display()
            )
        })
    };
    let username = read("username")?;
    let password = read("password")?;
    // Secret values often end in a newline when written by hand.
    let username = username.trim_end_matches(['\r', '\n']).to_string();
    let password = password.trim_end_matches(['\r', '\n']).to_string();
    if username.is_empty() {
        anyhow::bail!("--remote-credentials {}: username is empty", dir.display());
    }
    let mut hash = Sha256::new();
    hash.update(username.as_bytes());
    hash.update([0]);
    hash.update(password.as_bytes());
    Ok((
        Some(Credentials { username, password }),
        hash.finalize().into(),
    ))
}

/// The 405 answer of a mirror that only pulls.
pub fn push_refused(message: &str) -> Response<Body> {
    let mut response = proxy::error(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", message);
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ns_names_the_image_registry_percent_decoded() {
        assert_eq!(
            ns_of("ns=127.0.0.1%3A5000").as_deref(),
            Some("127.0.0.1:5000")
        );
        assert_eq!(ns_of("n=1&ns=docker.io").as_deref(), Some("docker.io"));
        assert_eq!(ns_of("n=1"), None);
        assert_eq!(ns_of("ns="), None);
    }

    #[test]
    fn remote_urls() {
        let (base, prefix) = parse_remote("https://registry.example.com").unwrap();
        assert_eq!(base.as_str(), "https://registry.example.com/");
        assert_eq!(prefix, "");
        let (base, prefix) = parse_remote("https://r.example:8443/mirror/team/").unwrap();
        assert_eq!(base.as_str(), "https://r.example:8443/");
        assert_eq!(prefix, "mirror/team");
        for bad in [
            "http://r.example",
            "r.example",
            "https://u:p@r.example",
            "https://r.example/a?x=1",
            "https://r.example/UPPER",
            "https://r.example/a_/b",
        ] {
            assert!(parse_remote(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn paths_map_under_the_prefix_and_drop_ns() {
        let t = target_for(
            "mirror",
            "/v2/library/pause/manifests/3.10",
            "ns=registry.k8s.io",
        )
        .unwrap();
        assert_eq!(t.path_and_query, "/v2/mirror/library/pause/manifests/3.10");
        assert_eq!(t.scope, "repository:mirror/library/pause:pull");
        assert!(!t.blob);
        let t = target_for("", "/v2/a/blobs/sha256:abc", "").unwrap();
        assert_eq!(t.path_and_query, "/v2/a/blobs/sha256:abc");
        assert!(t.blob);
        let t = target_for("p", "/v2/a/b/tags/list", "n=10&ns=x&last=b").unwrap();
        assert_eq!(t.path_and_query, "/v2/p/a/b/tags/list?n=10&last=b");
        assert_eq!(target_for("p", "/v2/", "").unwrap().scope, "");
        for bad in [
            "/v2/_catalog",
            "/v2/a/blobs/uploads/",
            "/v2/../x/manifests/v1",
            "/v2/a/%2e%2e/manifests/v1",
            "/v2/a/manifests/..",
            "/v2/A/manifests/v1",
            "/other",
        ] {
            assert!(target_for("p", bad, "").is_err(), "{bad}");
        }
    }

    #[test]
    fn credentials_dir_needs_both_files() {
        let dir = tempfile::tempdir().unwrap();
        assert!(CredentialsDir::load(Some(dir.path().into())).is_err());
        std::fs::write(dir.path().join("username"), "u\n").unwrap();
        std::fs::write(dir.path().join("password"), "secret-pw").unwrap();
        let creds = CredentialsDir::load(Some(dir.path().into())).unwrap();
        assert_eq!(creds.get().unwrap().username, "u");
        assert!(!creds.reload().unwrap());
        std::fs::write(dir.path().join("password"), "other").unwrap();
        assert!(creds.reload().unwrap());
        assert_eq!(creds.get().unwrap().password, "other");
    }
}
