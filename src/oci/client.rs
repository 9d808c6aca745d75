//! A client for one registry speaking the OCI Distribution API.
//!
//! Requests to one registry are bounded by two permit pools: one for small metadata requests
//! (listings, manifests, HEADs, upload sessions) and one for blob transfers, so that a few
//! large layers never hold up the many small requests a round consists of.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use oci_spec::distribution::RepositoryList;
use oci_spec::image::Digest;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::auth::{AuthState, Credentials, parse_challenges};
use super::error::OciError;
use super::link::next_link;
use super::verify::{digest_like, sha256_digest};
use super::{MANIFEST_ACCEPT, MAX_MANIFEST_BYTES, media_type_from_body};

/// How a registry client behaves; shared by every registry of a syncer.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Concurrent metadata requests, and separately concurrent blob transfers, per registry.
    pub concurrency: usize,
    pub credentials: Option<Credentials>,
    /// Tries per request when the failure is transient (network, 5xx, 429).
    pub attempts: u32,
    /// Delay before the first retry; doubled for each further one.
    pub backoff: Duration,
    /// Upload blobs in PATCH chunks from the start instead of one monolithic PUT.
    pub chunked_uploads: bool,
    /// Size of one PATCH chunk.
    pub chunk_size: u64,
    /// Entries asked for per page of `_catalog` and `tags/list`.
    pub page_size: u32,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            concurrency: 8,
            credentials: None,
            attempts: 4,
            backoff: Duration::from_millis(500),
            chunked_uploads: false,
            chunk_size: 16 * 1024 * 1024,
            page_size: 1000,
        }
    }
}

/// Requests sent to a registry, by kind; lets a round (and its tests) see what it cost.
#[derive(Debug, Default)]
pub struct RequestStats {
    pub catalog: AtomicU64,
    pub tag_lists: AtomicU64,
    pub manifest_heads: AtomicU64,
    pub manifest_gets: AtomicU64,
    pub manifest_puts: AtomicU64,
    pub blob_heads: AtomicU64,
    pub blob_gets: AtomicU64,
    pub blob_uploads: AtomicU64,
    pub blob_mounts: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The HTTP clients of a syncer. Metadata goes over HTTP/2 when the registry offers it:
/// many small requests multiplexed on one connection. Blob transfers go over HTTP/1.1, one
/// connection each: a large blob then never shares a connection's flow-control window with
/// small requests, and bulk streams run faster without HTTP/2 framing and window updates.
#[derive(Clone)]
pub struct HttpClients {
    pub metadata: reqwest::Client,
    pub blobs: reqwest::Client,
}

/// Builds the HTTP clients: rustls with ring. With a CA bundle, only that bundle is
/// trusted; without one, the platform's roots.
pub fn build_http_clients(ca_bundle_pem: Option<&[u8]>) -> Result<HttpClients, String> {
    build_http_clients_with_agent(ca_bundle_pem, DEFAULT_USER_AGENT)
}

/// The HTTP clients for a remote registry (Proxy's and Direct's upstream): a CA bundle is
/// trusted in addition to the system's roots, as containerd and Docker trust a registry's
/// `ca`. A private registry often redirects its blobs to object storage with a publicly
/// trusted certificate.
pub fn build_remote_http_clients(ca_bundle_pem: Option<&[u8]>) -> Result<HttpClients, String> {
    http_clients(ca_bundle_pem, DEFAULT_USER_AGENT, true)
}
/// The `User-Agent` of [`build_http_clients`].
pub const DEFAULT_USER_AGENT: &str = concat!("registry-addon/", env!("CARGO_PKG_VERSION"));

/// [`build_http_clients`] with another `User-Agent`: lets a registry's push notifications
/// tell one tool's pushes from another's.
pub fn build_http_clients_with_agent(
    ca_bundle_pem: Option<&[u8]>,
    user_agent: &str,
) -> Result<HttpClients, String> {
    http_clients(ca_bundle_pem, user_agent, false)
}

fn http_clients(
    ca_bundle_pem: Option<&[u8]>,
    user_agent: &str,
    system_roots: bool,
) -> Result<HttpClients, String> {
    let build = |http1_only| {
        client_builder_trusting(ca_bundle_pem, http1_only, system_roots)?
            .user_agent(user_agent)
            .build()
            .map_err(|e| format!("HTTP client: {e}"))
    };
    Ok(HttpClients {
        metadata: build(false)?,
        blobs: build(true)?,
    })
}

/// One HTTP client, HTTP/2 when the server offers it (see [`build_http_clients`]).
pub fn build_http_client(ca_bundle_pem: Option<&[u8]>) -> Result<reqwest::Client, String> {
    client_builder(ca_bundle_pem, false)?
        .build()
        .map_err(|e| format!("HTTP client: {e}"))
}

fn client_builder(
    ca_bundle_pem: Option<&[u8]>,
    http1_only: bool,
) -> Result<reqwest::ClientBuilder, String> {
    client_builder_trusting(ca_bundle_pem, http1_only, false)
}

/// With `system_roots`, a CA bundle is trusted besides the system's roots (those that can
/// be read: `SSL_CERT_FILE`, `SSL_CERT_DIR` or the distribution's bundle), not instead.
fn client_builder_trusting(
    ca_bundle_pem: Option<&[u8]>,
    http1_only: bool,
    system_roots: bool,
) -> Result<reqwest::ClientBuilder, String> {
    // Idempotent: the first provider installed stays.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder()
        .user_agent(DEFAULT_USER_AGENT)
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_keepalive(Duration::from_secs(30))
        .tcp_nodelay(true)
        .no_proxy()
        // Blob redirects to object storage are allowed; reqwest drops credentials on a
        // cross-origin hop.
        .redirect(reqwest::redirect::Policy::limited(5));
    if http1_only {
        // No read timeout here: reqwest counts it from the start of the request until the
        // answer, which for a large upload is the whole transfer. Stalled downloads are
        // caught by the idle timeout of the verified stream instead.
        builder = builder.http1_only();
    } else {
        builder = builder.read_timeout(Duration::from_secs(120));
        // Small windows keep memory bounded however many streams are in flight.
        builder = builder
            .http2_initial_stream_window_size(512 * 1024)
            .http2_initial_connection_window_size(2 * 1024 * 1024);
    }
    if let Some(pem) = ca_bundle_pem {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| format!("CA bundle: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("CA bundle: certificate refused: {e}"))?;
        }
        if roots.is_empty() {
            return Err("CA bundle: no certificate found".into());
        }
        if system_roots {
            roots.add_parsable_certificates(system_root_certs().iter().cloned());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS set-up: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = if http1_only {
            vec![b"http/1.1".to_vec()]
        } else {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        };
        builder = builder.tls_backend_preconfigured(tls);
    }
    Ok(builder)
}

/// The system's root certificates, read once per process (the controller builds clients for
/// every check of an upstream). An image without a CA store has none: a bundle alone is
/// trusted then.
fn system_root_certs() -> &'static [rustls_pki_types::CertificateDer<'static>] {
    static ROOTS: std::sync::OnceLock<Vec<rustls_pki_types::CertificateDer<'static>>> =
        std::sync::OnceLock::new();
    ROOTS.get_or_init(|| rustls_native_certs::load_native_certs().certs)
}

/// A manifest's identity as answered by a HEAD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestHead {
    /// `Docker-Content-Digest`; some registries omit it.
    pub digest: Option<Digest>,
    pub media_type: Option<String>,
    pub size: Option<u64>,
}

/// A manifest exactly as a registry served it.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub media_type: String,
    pub digest: Digest,
    pub bytes: Bytes,
}

/// Outcome of opening a blob upload.
#[derive(Debug)]
pub enum UploadStart {
    /// The registry mounted the blob from the other repository: nothing to upload.
    Mounted,
    /// An upload session to send the blob to.
    Session(Url),
}

/// A blob download in progress; the caller holds the registry's blob permit while reading.
pub struct BlobDownload {
    pub size: Option<u64>,
    pub stream: Box<dyn Stream<Item = Result<Bytes, reqwest::Error>> + Send + Unpin>,
}

/// One registry, reached at one base URL.
pub struct Registry {
    base: Url,
    name: String,
    http: reqwest::Client,
    blob_http: reqwest::Client,
    credentials: Option<Credentials>,
    auth: Mutex<AuthState>,
    meta_permits: Arc<Semaphore>,
    blob_permits: Arc<Semaphore>,
    attempts: u32,
    backoff: Duration,
    chunked: AtomicBool,
    chunk_size: u64,
    page_size: u32,
    pub stats: RequestStats,
}

/// Token scope to read a repository.
pub fn pull_scope(repo: &str) -> String {
    format!("repository:{repo}:pull")
}

/// Token scope to write a repository.
pub fn push_scope(repo: &str) -> String {
    format!("repository:{repo}:pull,push")
}

const CATALOG_SCOPE: &str = "registry:catalog:*";

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("url", &self.name).finish()
    }
}

impl Registry {
    /// `url` is the registry root, e.g. `https://registry-0.registry-headless.ns.svc:5000`.
    pub fn new(url: &str, clients: HttpClients, options: &ClientOptions) -> Result<Self, String> {
        let mut base = Url::parse(url).map_err(|e| format!("registry URL {url:?}: {e}"))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(format!(
                "registry URL {url:?}: scheme must be http or https"
            ));
        }
        if base.host_str().is_none() {
            return Err(format!("registry URL {url:?}: no host"));
        }
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let name = url.trim_end_matches('/').to_string();
        let concurrency = options.concurrency.max(1);
        Ok(Registry {
            base,
            name,
            http: clients.metadata,
            blob_http: clients.blobs,
            credentials: options.credentials.clone(),
            auth: Mutex::new(AuthState::default()),
            meta_permits: Arc::new(Semaphore::new(concurrency)),
            blob_permits: Arc::new(Semaphore::new(concurrency)),
            attempts: options.attempts.max(1),
            backoff: options.backoff,
            chunked: AtomicBool::new(options.chunked_uploads),
            chunk_size: options.chunk_size.max(1),
            page_size: options.page_size.max(1),
            stats: RequestStats::default(),
        })
    }

    /// The registry as written on the command line, for messages and metric labels.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `host[:port]` of the registry.
    pub fn host(&self) -> String {
        let host = self.base.host_str().unwrap_or_default();
        match self.base.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        }
    }

    /// A permit for one blob transfer on this registry; hold it while the bytes flow.
    pub async fn blob_permit(&self) -> OwnedSemaphorePermit {
        // The semaphore is never closed.
        match self.blob_permits.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => unreachable!("blob semaphore closed"),
        }
    }

    async fn meta_permit(&self) -> OwnedSemaphorePermit {
        match self.meta_permits.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => unreachable!("metadata semaphore closed"),
        }
    }

    fn url(&self, path: &str) -> Result<Url, OciError> {
        self.base.join(path).map_err(|e| OciError::Invalid {
            registry: self.name.clone(),
            what: path.to_string(),
            reason: format!("bad URL: {e}"),
        })
    }

    fn transport(&self, what: &str, source: reqwest::Error) -> OciError {
        OciError::Transport {
            registry: self.name.clone(),
            what: what.to_string(),
            source,
        }
    }

    async fn read_body(&self, what: &str, resp: Response, limit: usize) -> Result<Bytes, OciError> {
        read_limited(resp, limit).await.map_err(|e| match e {
            BodyError::Transport(source) => self.transport(what, source),
            e @ BodyError::TooLarge(_) => self.invalid(what, e.to_string()),
        })
    }

    fn invalid(&self, what: &str, reason: impl Into<String>) -> OciError {
        OciError::Invalid {
            registry: self.name.clone(),
            what: what.to_string(),
            reason: reason.into(),
        }
    }

    /// Turns a non-success answer into an error carrying the registry's own error message.
    async fn status_error(&self, what: &str, resp: Response) -> OciError {
        let status = resp.status().as_u16();
        if status == 401 {
            return OciError::Auth {
                registry: self.name.clone(),
                what: what.to_string(),
                reason: format!("HTTP {status}"),
            };
        }
        let detail = match read_limited(resp, 4096).await {
            Ok(body) => error_detail(&body),
            Err(_) => String::new(),
        };
        if status == 403 {
            return OciError::Denied {
                registry: self.name.clone(),
                what: what.to_string(),
                detail,
            };
        }
        OciError::Status {
            registry: self.name.clone(),
            what: what.to_string(),
            status,
            detail,
        }
    }

    fn retry_delay(&self, attempt: u32) -> Duration {
        self.backoff
            .saturating_mul(1u32 << (attempt.saturating_sub(1)).min(10))
    }

    /// Sends a request that can be rebuilt, answering auth challenges and retrying transient
    /// failures with exponential backoff. Holds a metadata permit until the caller drops the
    /// returned one, after reading the body.
    async fn send(
        &self,
        what: &str,
        scope: &str,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<(Response, OwnedSemaphorePermit), OciError> {
        let permit = self.meta_permit().await;
        let resp = self.send_held(what, scope, build).await?;
        Ok((resp, permit))
    }

    /// As [`Registry::send`], for a caller that already holds a permit.
    async fn send_held(
        &self,
        what: &str,
        scope: &str,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<Response, OciError> {
        let mut attempt = 0;
        let mut challenged = false;
        loop {
            attempt += 1;
            let mut request = build();
            let mut sent_basic = false;
            if let Some(value) = self.auth_header(what, scope).await? {
                sent_basic = value.starts_with("Basic ");
                request = request.header(header::AUTHORIZATION, value);
            }
            match request.send().await {
                Err(err) => {
                    if attempt < self.attempts {
                        tracing::debug!(registry = %self.name, what, attempt, error = %err, "request failed, retrying");
                        tokio::time::sleep(self.retry_delay(attempt)).await;
                        continue;
                    }
                    return Err(self.transport(what, err));
                }
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED && sent_basic => {
                    // Our user name and password were sent and refused: say so, not just 401.
                    return Err(OciError::Auth {
                        registry: self.name.clone(),
                        what: what.to_string(),
                        reason: "credentials refused (HTTP 401)".into(),
                    });
                }
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED && !challenged => {
                    challenged = true;
                    attempt -= 1;
                    self.answer_challenge(what, scope, resp.headers(), sent_basic)
                        .await?;
                }
                Ok(resp) if is_transient_status(resp.status()) && attempt < self.attempts => {
                    tracing::debug!(registry = %self.name, what, attempt, status = resp.status().as_u16(), "registry busy or failing, retrying");
                    tokio::time::sleep(self.retry_delay(attempt)).await;
                }
                Ok(resp) => return Ok(resp),
            }
        }
    }

    /// Sends a request whose body is a one-shot stream: no retry. Authentication must
    /// already be settled for `scope` (an earlier request of the same scope did that).
    async fn send_once(
        &self,
        what: &str,
        scope: &str,
        mut request: RequestBuilder,
    ) -> Result<Response, OciError> {
        if let Some(value) = self.auth_header(what, scope).await? {
            request = request.header(header::AUTHORIZATION, value);
        }
        request.send().await.map_err(|e| self.transport(what, e))
    }

    async fn auth_header(&self, what: &str, scope: &str) -> Result<Option<String>, OciError> {
        let (token, basic, bearer) = {
            let state = self.lock_auth();
            (state.token(scope), state.basic, state.bearer.clone())
        };
        if let Some(token) = token {
            return Ok(Some(format!("Bearer {token}")));
        }
        if let Some((realm, service)) = bearer {
            let (token, expires_in) = self
                .fetch_token(what, &realm, service.as_deref(), scope)
                .await?;
            self.lock_auth()
                .store_token(scope, token.clone(), expires_in);
            return Ok(Some(format!("Bearer {token}")));
        }
        if basic {
            if let Some(creds) = &self.credentials {
                return Ok(Some(creds.basic_header()));
            }
        }
        Ok(None)
    }

    fn lock_auth(&self) -> std::sync::MutexGuard<'_, AuthState> {
        // A panic while holding this lock cannot leave the state inconsistent.
        self.auth
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn answer_challenge(
        &self,
        what: &str,
        scope: &str,
        headers: &HeaderMap,
        sent_basic: bool,
    ) -> Result<(), OciError> {
        let challenges: Vec<_> = headers
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(parse_challenges)
            .collect();
        let auth_error = |reason: &str| OciError::Auth {
            registry: self.name.clone(),
            what: what.to_string(),
            reason: reason.to_string(),
        };
        if let Some(bearer) = challenges.iter().find(|c| c.scheme == "bearer") {
            let realm = bearer
                .param("realm")
                .ok_or_else(|| auth_error("Bearer challenge without realm"))?
                .to_string();
            let service = bearer.param("service").map(str::to_string);
            // Ask for what the registry says it wants as well as what we want to do.
            let mut scopes: Vec<&str> = scope.split(' ').collect();
            if let Some(wanted) = bearer.param("scope") {
                for s in wanted.split(' ') {
                    if !scopes.contains(&s) {
                        scopes.push(s);
                    }
                }
            }
            self.lock_auth().bearer = Some((realm.clone(), service.clone()));
            let (token, expires_in) = self
                .fetch_token(what, &realm, service.as_deref(), &scopes.join(" "))
                .await?;
            self.lock_auth().store_token(scope, token, expires_in);
            return Ok(());
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            if self.credentials.is_none() {
                return Err(auth_error(
                    "the registry asks for credentials and none are configured",
                ));
            }
            if sent_basic {
                return Err(auth_error("credentials refused"));
            }
            // Another request may have learnt this meanwhile; either way, retry with them.
            self.lock_auth().basic = true;
            return Ok(());
        }
        Err(auth_error("HTTP 401 without a Basic or Bearer challenge"))
    }

    async fn fetch_token(
        &self,
        what: &str,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<(String, Option<u64>), OciError> {
        let auth_error = |reason: String| OciError::Auth {
            registry: self.name.clone(),
            what: what.to_string(),
            reason,
        };
        let url = Url::parse(realm)
            .or_else(|_| self.base.join(realm))
            .map_err(|e| auth_error(format!("token realm {realm:?}: {e}")))?;
        super::auth::request_token(&self.http, url, service, scope, self.credentials.as_ref())
            .await
            .map_err(|e| auth_error(e.message))
    }

    /// Checks that the registry answers the API (`GET /v2/`), settling authentication.
    pub async fn ping(&self) -> Result<(), OciError> {
        let what = "API check";
        let url = self.url("v2/")?;
        let (resp, _permit) = self
            .send(what, CATALOG_SCOPE, || self.http.get(url.clone()))
            .await?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(self.status_error(what, resp).await)
        }
    }

    /// Every repository, following `Link` pagination.
    pub async fn catalog(&self) -> Result<Vec<String>, OciError> {
        let what = "list repositories";
        let mut url = self.url(&format!("v2/_catalog?n={}", self.page_size))?;
        let mut repos = Vec::new();
        for _page in 0..100_000 {
            bump(&self.stats.catalog);
            let (resp, _permit) = self
                .send(what, CATALOG_SCOPE, || self.http.get(url.clone()))
                .await?;
            if !resp.status().is_success() {
                return Err(self.status_error(what, resp).await);
            }
            let next = self.next_page(resp.headers(), &url);
            let body = self.read_body(what, resp, 16 * 1024 * 1024).await?;
            let list: RepositoryList = serde_json::from_slice(&body)
                .map_err(|e| self.invalid(what, format!("bad catalog: {e}")))?;
            let page_empty = list.repositories().is_empty();
            repos.extend(list.repositories().iter().cloned());
            match next {
                Some(next) if !page_empty && next != url => url = next,
                _ => break,
            }
        }
        repos.sort();
        repos.dedup();
        Ok(repos)
    }

    fn next_page(&self, headers: &HeaderMap, current: &Url) -> Option<Url> {
        let link = headers.get(header::LINK)?.to_str().ok()?;
        let target = next_link(link)?;
        current.join(&target).ok()
    }

    /// Every tag of a repository, following `Link` pagination; empty when the repository
    /// is gone.
    pub async fn tags(&self, repo: &str) -> Result<Vec<String>, OciError> {
        let what = format!("list tags of {repo}");
        let scope = pull_scope(repo);
        let mut url = self.url(&format!("v2/{repo}/tags/list?n={}", self.page_size))?;
        let mut tags = Vec::new();
        for _page in 0..100_000 {
            bump(&self.stats.tag_lists);
            let (resp, _permit) = self
                .send(&what, &scope, || self.http.get(url.clone()))
                .await?;
            if resp.status() == StatusCode::NOT_FOUND {
                return Ok(Vec::new());
            }
            if !resp.status().is_success() {
                return Err(self.status_error(&what, resp).await);
            }
            let next = self.next_page(resp.headers(), &url);
            let body = self.read_body(&what, resp, 16 * 1024 * 1024).await?;
            // Not oci-spec's TagList: distribution answers `"tags": null` for a repository
            // whose tags were all deleted.
            #[derive(serde::Deserialize)]
            struct TagPage {
                #[serde(default)]
                tags: Option<Vec<String>>,
            }
            let page: TagPage = serde_json::from_slice(&body)
                .map_err(|e| self.invalid(&what, format!("bad tag list: {e}")))?;
            let page = page.tags.unwrap_or_default();
            let page_empty = page.is_empty();
            tags.extend(page);
            match next {
                Some(next) if !page_empty && next != url => url = next,
                _ => break,
            }
        }
        tags.sort();
        tags.dedup();
        Ok(tags)
    }

    /// HEAD of a manifest by tag or digest; `None` when the registry does not have it.
    pub async fn head_manifest(
        &self,
        repo: &str,
        reference: &str,
    ) -> Result<Option<ManifestHead>, OciError> {
        let what = format!("manifest {repo}:{reference}");
        let url = self.url(&format!("v2/{repo}/manifests/{reference}"))?;
        bump(&self.stats.manifest_heads);
        let (resp, _permit) = self
            .send(&what, &pull_scope(repo), || {
                self.http
                    .head(url.clone())
                    .header(header::ACCEPT, MANIFEST_ACCEPT)
            })
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !resp.status().is_success() {
            return Err(self.status_error(&what, resp).await);
        }
        let headers = resp.headers();
        let digest = header_str(headers, "docker-content-digest").and_then(|d| d.parse().ok());
        Ok(Some(ManifestHead {
            digest,
            media_type: header_str(headers, "content-type").map(strip_params),
            size: header_str(headers, "content-length").and_then(|l| l.parse().ok()),
        }))
    }

    /// GET of a manifest, with its bytes untouched and their digest checked against the
    /// reference (when a digest) and the registry's `Docker-Content-Digest`.
    pub async fn get_manifest(&self, repo: &str, reference: &str) -> Result<Manifest, OciError> {
        let what = format!("manifest {repo}:{reference}");
        let url = self.url(&format!("v2/{repo}/manifests/{reference}"))?;
        bump(&self.stats.manifest_gets);
        let (resp, _permit) = self
            .send(&what, &pull_scope(repo), || {
                self.http
                    .get(url.clone())
                    .header(header::ACCEPT, MANIFEST_ACCEPT)
            })
            .await?;
        if !resp.status().is_success() {
            return Err(self.status_error(&what, resp).await);
        }
        let headers = resp.headers().clone();
        let bytes = self.read_body(&what, resp, MAX_MANIFEST_BYTES).await?;
        let header_digest: Option<Digest> =
            header_str(&headers, "docker-content-digest").and_then(|d| d.parse().ok());
        let reference_digest: Option<Digest> = reference.parse().ok();
        let digest = match reference_digest.or(header_digest) {
            Some(expected) => {
                let actual = digest_like(&expected, &bytes).ok_or_else(|| {
                    self.invalid(
                        &what,
                        format!("digest algorithm {} not supported", expected.algorithm()),
                    )
                })?;
                if actual != expected.as_ref() {
                    return Err(OciError::DigestMismatch {
                        registry: self.name.clone(),
                        what,
                        expected: expected.to_string(),
                        actual,
                    });
                }
                expected
            }
            None => sha256_digest(&bytes)
                .parse()
                .map_err(|e| self.invalid(&what, format!("digest: {e}")))?,
        };
        let content_type = header_str(&headers, "content-type").map(strip_params);
        let media_type = match content_type {
            Some(ct) if ct != "application/json" && ct != "text/plain" && !ct.is_empty() => ct,
            _ => media_type_from_body(&bytes)
                .ok_or_else(|| self.invalid(&what, "manifest without a media type"))?,
        };
        Ok(Manifest {
            media_type,
            digest,
            bytes,
        })
    }

    /// PUT of a manifest's exact bytes under a tag or its digest.
    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        manifest: &Manifest,
    ) -> Result<(), OciError> {
        let what = format!("push manifest {repo}:{reference}");
        let url = self.url(&format!("v2/{repo}/manifests/{reference}"))?;
        bump(&self.stats.manifest_puts);
        let (resp, _permit) = self
            .send(&what, &push_scope(repo), || {
                self.http
                    .put(url.clone())
                    .header(header::CONTENT_TYPE, manifest.media_type.as_str())
                    .body(manifest.bytes.clone())
            })
            .await?;
        if !resp.status().is_success() {
            return Err(self.status_error(&what, resp).await);
        }
        let stored: Option<Digest> =
            header_str(resp.headers(), "docker-content-digest").and_then(|d| d.parse().ok());
        if let Some(stored) = stored {
            // A registry reports the digest in its own algorithm; compare like with like.
            if stored.algorithm() == manifest.digest.algorithm() && stored != manifest.digest {
                return Err(OciError::DigestMismatch {
                    registry: self.name.clone(),
                    what,
                    expected: manifest.digest.to_string(),
                    actual: stored.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Whether the repository holds the blob.
    pub async fn blob_exists(&self, repo: &str, digest: &Digest) -> Result<bool, OciError> {
        let what = format!("blob {repo}@{digest}");
        let url = self.url(&format!("v2/{repo}/blobs/{digest}"))?;
        bump(&self.stats.blob_heads);
        let (resp, _permit) = self
            .send(&what, &pull_scope(repo), || self.http.head(url.clone()))
            .await?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.status_error(&what, resp).await),
        }
    }

    /// Starts a blob download. The caller holds this registry's blob permit for as long as
    /// it reads the stream.
    pub async fn get_blob(&self, repo: &str, digest: &Digest) -> Result<BlobDownload, OciError> {
        let what = format!("blob {repo}@{digest}");
        let url = self.url(&format!("v2/{repo}/blobs/{digest}"))?;
        bump(&self.stats.blob_gets);
        let resp = self
            .send_held(&what, &pull_scope(repo), || self.blob_http.get(url.clone()))
            .await?;
        if !resp.status().is_success() {
            return Err(self.status_error(&what, resp).await);
        }
        Ok(BlobDownload {
            size: resp.content_length(),
            stream: Box::new(resp.bytes_stream()),
        })
    }

    /// Opens an upload session in `repo`, or mounts the blob from another repository of
    /// this registry when `mount` names one and the registry agrees.
    pub async fn start_upload(
        &self,
        repo: &str,
        mount: Option<(&Digest, &str)>,
    ) -> Result<UploadStart, OciError> {
        let (what, path, scope) = match mount {
            Some((digest, from)) => (
                format!("mount blob {digest} from {from} into {repo}"),
                format!("v2/{repo}/blobs/uploads/?mount={digest}&from={from}"),
                format!("{} {}", push_scope(repo), pull_scope(from)),
            ),
            None => (
                format!("start blob upload to {repo}"),
                format!("v2/{repo}/blobs/uploads/"),
                push_scope(repo),
            ),
        };
        let url = self.url(&path)?;
        if mount.is_some() {
            bump(&self.stats.blob_mounts);
        }
        let (resp, _permit) = self
            .send(&what, &scope, || {
                self.http
                    .post(url.clone())
                    .header(header::CONTENT_LENGTH, HeaderValue::from_static("0"))
            })
            .await?;
        match resp.status() {
            StatusCode::CREATED if mount.is_some() => Ok(UploadStart::Mounted),
            StatusCode::ACCEPTED => {
                let location = self.location(&what, resp.headers(), &url)?;
                Ok(UploadStart::Session(location))
            }
            _ => Err(self.status_error(&what, resp).await),
        }
    }

    fn location(&self, what: &str, headers: &HeaderMap, current: &Url) -> Result<Url, OciError> {
        let location = header_str(headers, "location")
            .ok_or_else(|| self.invalid(what, "upload answer without Location"))?;
        current
            .join(location)
            .map_err(|e| self.invalid(what, format!("bad Location {location:?}: {e}")))
    }

    /// Whether uploads to this registry go in PATCH chunks.
    pub fn chunked_uploads(&self) -> bool {
        self.chunked.load(Ordering::Relaxed)
    }

    /// Sends a whole blob in one PUT. The body should be a verified stream: an error from
    /// it aborts the request, and the session is left uncommitted.
    pub async fn upload_monolithic(
        &self,
        repo: &str,
        session: Url,
        digest: &Digest,
        size: Option<u64>,
        body: reqwest::Body,
    ) -> Result<(), OciError> {
        let what = format!("upload blob {repo}@{digest}");
        bump(&self.stats.blob_uploads);
        let mut url = session;
        url.query_pairs_mut().append_pair("digest", digest.as_ref());
        let mut request = self
            .blob_http
            .put(url)
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .body(body);
        if let Some(size) = size {
            request = request.header(header::CONTENT_LENGTH, size);
        }
        let resp = self.send_once(&what, &push_scope(repo), request).await?;
        match resp.status() {
            s if s.is_success() => Ok(()),
            StatusCode::NOT_FOUND
            | StatusCode::METHOD_NOT_ALLOWED
            | StatusCode::NOT_IMPLEMENTED
            | StatusCode::RANGE_NOT_SATISFIABLE
            | StatusCode::LENGTH_REQUIRED => {
                // Registries that only take chunked uploads: switch for good.
                self.chunked.store(true, Ordering::Relaxed);
                Err(OciError::MonolithicRefused {
                    registry: self.name.clone(),
                    what,
                    status: resp.status().as_u16(),
                })
            }
            _ => Err(self.upload_error(&what, digest, resp).await),
        }
    }

    async fn upload_error(&self, what: &str, digest: &Digest, resp: Response) -> OciError {
        let err = self.status_error(what, resp).await;
        if let OciError::Status { detail, .. } = &err {
            if detail.contains("DIGEST_INVALID") {
                return OciError::DigestMismatch {
                    registry: self.name.clone(),
                    what: what.to_string(),
                    expected: digest.to_string(),
                    actual: "other content".into(),
                };
            }
        }
        err
    }

    /// Sends a blob as PATCH chunks of at most the configured chunk size, each a window of
    /// the stream (never buffered whole), then commits it with a PUT.
    pub async fn upload_chunked(
        &self,
        repo: &str,
        session: Url,
        digest: &Digest,
        size: Option<u64>,
        source: impl Stream<Item = Result<Bytes, std::io::Error>> + Send + Unpin + 'static,
    ) -> Result<(), OciError> {
        let what = format!("upload blob {repo}@{digest} in chunks");
        let scope = push_scope(repo);
        bump(&self.stats.blob_uploads);
        let mut location = session;
        let mut offset: u64 = 0;
        let mut pump = ChunkPump::new(source);
        loop {
            let chunk_len = match size {
                Some(total) => (total - offset).min(self.chunk_size),
                // Unknown size: one streamed PATCH without a range.
                None => u64::MAX,
            };
            if chunk_len == 0 {
                break;
            }
            let (tx, rx) = futures::channel::mpsc::channel::<Result<Bytes, std::io::Error>>(2);
            let mut request = self
                .blob_http
                .patch(location.clone())
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .body(reqwest::Body::wrap_stream(rx));
            if size.is_some() {
                request = request.header(header::CONTENT_LENGTH, chunk_len).header(
                    header::CONTENT_RANGE,
                    format!("{}-{}", offset, offset + chunk_len - 1),
                );
            }
            let send = self.send_once(&what, &scope, request);
            let feed = pump.feed(tx, chunk_len);
            let (resp, fed) = tokio::join!(send, feed);
            let resp = resp?;
            let fed = fed.map_err(|e| self.invalid(&what, format!("source: {e}")))?;
            if !resp.status().is_success() {
                return Err(self.upload_error(&what, digest, resp).await);
            }
            location = self.location(&what, resp.headers(), &location)?;
            offset += fed;
            if size.is_none() || fed < chunk_len {
                break;
            }
        }
        if let Some(total) = size {
            if offset != total {
                return Err(self.invalid(&what, format!("sent {offset} of {total} bytes")));
            }
        }
        let mut url = location;
        url.query_pairs_mut().append_pair("digest", digest.as_ref());
        let request = self
            .blob_http
            .put(url)
            .header(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        let resp = self.send_once(&what, &scope, request).await?;
        if !resp.status().is_success() {
            return Err(self.upload_error(&what, digest, resp).await);
        }
        Ok(())
    }

    /// Abandons an upload session; failures are of no consequence (the registry purges
    /// stale sessions).
    pub async fn cancel_upload(&self, repo: &str, session: Url) {
        let what = format!("cancel upload to {repo}");
        let request = self.http.request(Method::DELETE, session);
        if let Err(err) = self.send_once(&what, &push_scope(repo), request).await {
            tracing::debug!(registry = %self.name, repo, error = %err, "cancelling an upload failed");
        }
    }
}

/// Feeds windows of a stream into per-chunk channels, splitting buffers at window ends.
struct ChunkPump<S> {
    source: S,
    leftover: Option<Bytes>,
}

impl<S> ChunkPump<S>
where
    S: Stream<Item = Result<Bytes, std::io::Error>> + Unpin,
{
    fn new(source: S) -> Self {
        ChunkPump {
            source,
            leftover: None,
        }
    }

    /// Sends up to `limit` bytes, then closes the channel. Returns how many were sent; an
    /// error from the source is passed into the channel (aborting that request) and back.
    async fn feed(
        &mut self,
        mut tx: futures::channel::mpsc::Sender<Result<Bytes, std::io::Error>>,
        limit: u64,
    ) -> Result<u64, std::io::Error> {
        use futures::SinkExt;
        let mut sent: u64 = 0;
        while sent < limit {
            let mut buf = match self.leftover.take() {
                Some(b) => b,
                None => match self.source.next().await {
                    Some(Ok(b)) => b,
                    Some(Err(err)) => {
                        let msg = err.to_string();
                        let _ = tx.send(Err(err)).await;
                        return Err(std::io::Error::other(msg));
                    }
                    None => break,
                },
            };
            let room = limit - sent;
            if buf.len() as u64 > room {
                self.leftover = Some(buf.split_off(room as usize));
            }
            sent += buf.len() as u64;
            if tx.send(Ok(buf)).await.is_err() {
                return Err(std::io::Error::other("the upload request ended early"));
            }
        }
        Ok(sent)
    }
}

fn is_transient_status(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn strip_params(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Why a response body could not be read.
#[derive(Debug)]
enum BodyError {
    Transport(reqwest::Error),
    TooLarge(usize),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Transport(e) => write!(f, "{e}"),
            BodyError::TooLarge(limit) => write!(f, "answer larger than {limit} bytes"),
        }
    }
}

/// Reads a response body, refusing one longer than `limit`.
async fn read_limited(resp: Response, limit: usize) -> Result<Bytes, BodyError> {
    if resp.content_length().is_some_and(|l| l > limit as u64) {
        return Err(BodyError::TooLarge(limit));
    }
    let mut stream = resp.bytes_stream();
    let mut out = bytes::BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(BodyError::Transport)?;
        if out.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge(limit));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.freeze())
}

/// The first `code: message` of a distribution error body, shortened.
fn error_detail(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Errors {
        #[serde(default)]
        errors: Vec<ErrorItem>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorItem {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    let text = match serde_json::from_slice::<Errors>(body) {
        Ok(errors) if !errors.errors.is_empty() => errors
            .errors
            .iter()
            .map(|e| format!("{} {}", e.code, e.message).trim().to_string())
            .collect::<Vec<_>>()
            .join("; "),
        _ => String::from_utf8_lossy(body).trim().to_string(),
    };
    text.chars().take(300).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_detail_reads_distribution_errors() {
        let body = br#"{"errors":[{"code":"MANIFEST_BLOB_UNKNOWN","message":"blob unknown to registry","detail":"sha256:abc"}]}"#;
        assert_eq!(
            error_detail(body),
            "MANIFEST_BLOB_UNKNOWN blob unknown to registry"
        );
        assert_eq!(error_detail(b"plain failure\n"), "plain failure");
    }

    #[test]
    fn registry_urls() {
        let http = build_http_clients(None).unwrap();
        let r = Registry::new(
            "https://reg.example:5000",
            http.clone(),
            &ClientOptions::default(),
        )
        .unwrap();
        assert_eq!(r.host(), "reg.example:5000");
        assert_eq!(
            r.url("v2/a/b/manifests/sha256:0123").unwrap().as_str(),
            "https://reg.example:5000/v2/a/b/manifests/sha256:0123"
        );
        assert!(Registry::new("ftp://x", http.clone(), &ClientOptions::default()).is_err());
        assert!(Registry::new("not a url", http, &ClientOptions::default()).is_err());
    }

    #[test]
    fn content_type_parameters_are_dropped() {
        assert_eq!(
            strip_params("application/vnd.oci.image.index.v1+json; charset=utf-8"),
            "application/vnd.oci.image.index.v1+json"
        );
    }

    #[tokio::test]
    async fn chunk_pump_splits_at_window_ends() {
        let source = futures::stream::iter(vec![
            Ok(Bytes::from_static(b"abcde")),
            Ok(Bytes::from_static(b"fgh")),
        ]);
        let mut pump = ChunkPump::new(source);
        let mut out = Vec::new();
        loop {
            let (tx, rx) = futures::channel::mpsc::channel(2);
            let (n, got) = tokio::join!(pump.feed(tx, 3), rx.collect::<Vec<_>>());
            let n = n.unwrap();
            let bytes: Vec<u8> = got
                .into_iter()
                .flat_map(|b: Result<Bytes, std::io::Error>| b.unwrap().to_vec())
                .collect();
            assert_eq!(bytes.len() as u64, n);
            if n == 0 {
                break;
            }
            out.push(String::from_utf8(bytes).unwrap());
        }
        assert_eq!(out, vec!["abc", "def", "gh"]);
    }
}
