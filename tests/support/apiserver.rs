//! An in-memory stand-in for a Kubernetes API server, served over loopback HTTP so that a real
//! `kube::Client` (built from a URL or a kubeconfig) talks to it.
//!
//! Models: generic `/api/v1` and `/apis/<group>/<version>` paths, namespaced and
//! cluster-scoped; get; list with label selectors (sorted); create; PUT with resourceVersion
//! conflicts; merge patch; server-side apply keeping each manager's last applied
//! configuration, so fields a manager stops applying are removed unless another manager
//! applies them; the status subresource; delete with finalizers; resourceVersion bumped only
//! on a real change and generation on a change outside metadata and status; `Status` error
//! bodies; a request log; error injection. Not modelled: field-ownership conflicts,
//! keyed-list merging, defaulting, validation, garbage collection.
//!
//! Watch (`?watch=true&resourceVersion=…`): newline-delimited `{"type", "object"}` events
//! (ADDED, MODIFIED, DELETED; BOOKMARK on `allowWatchBookmarks=true` when a batch of
//! changes matched nothing), from a bounded history of changes. A watch from a
//! resourceVersion older than the history answers, as kube-apiserver does, a 200 stream whose
//! only event is an `ERROR` carrying a 410 `Expired` Status, so that a client relists; a
//! consumer too slow to keep up with the history gets the same. `resourceVersion` empty or
//! `0` starts with an ADDED event per existing object. `timeoutSeconds` ends the stream.
//! Lists carry the store's resourceVersion. An `Accept` of
//! `application/json;as=PartialObjectMetadata[List];g=meta.k8s.io;v=v1` (kube's metadata
//! API) gets `PartialObjectMetadata` objects: metadata only.
//!
//! `metadata.managedFields`, returned on GET and list as kube-apiserver does: one `Apply`
//! entry per server-side-apply manager (`time` fixed), whose `fieldsV1` is the field set of
//! that manager's last applied configuration, shaped like the real server's: `f:<name>` for
//! map keys, list elements as `k:{…}` keyed by `containerPort`+`protocol` (protocol defaulted
//! to TCP) or `port`+`protocol` (ports), `mountPath` (volume mounts), `uid` (owner references)
//! or else `name`, and `i:<n>` for any other element; `.` for a list element with children;
//! empty lists unrecorded; no apiVersion, kind, status, metadata.name or metadata.namespace.
//! The stand-in knows no schema, so lists the real server treats as atomic (`args`,
//! `tolerations`) or as sets (`finalizers`) are recorded element by element, and a label
//! selector's `matchLabels` field by field. Not modelled: `Update` entries (create, PUT and
//! merge patch keep the entries as they are), status-subresource entries, ownership moving
//! between managers.

use std::collections::BTreeMap;
use std::future::IntoFuture;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use std::collections::VecDeque;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Logged {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub content_type: String,
}

impl Logged {
    pub fn is_write(&self) -> bool {
        self.method != Method::GET
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    group_version: String,
    plural: String,
    namespace: String,
    name: String,
}

#[derive(Debug, Clone)]
struct Stored {
    object: Value,
    /// Last applied configuration of each server-side-apply field manager.
    applied: BTreeMap<String, Value>,
}

struct Fault {
    method: Option<Method>,
    path: String,
    remaining: usize,
    status: u16,
}

/// One change, as a watch reports it.
struct Change {
    resource_version: u64,
    key: Key,
    kind: &'static str,
    object: Value,
}

/// Changes kept for watches; older ones are compacted away, as etcd does.
const DEFAULT_HISTORY: usize = 10_000;

struct Store {
    objects: BTreeMap<Key, Stored>,
    resource_version: u64,
    uid: u64,
    log: Vec<Logged>,
    faults: Vec<Fault>,
    history: VecDeque<Change>,
    history_limit: usize,
    /// A watch from a resourceVersion below this one has lost changes: 410.
    compacted: u64,
    /// Bumped to end every open watch stream.
    watch_epoch: u64,
    /// Wakes watch streams: the latest resourceVersion and watch epoch.
    changed: tokio::sync::watch::Sender<(u64, u64)>,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            objects: BTreeMap::new(),
            resource_version: 0,
            uid: 0,
            log: Vec::new(),
            faults: Vec::new(),
            history: VecDeque::new(),
            history_limit: DEFAULT_HISTORY,
            compacted: 0,
            watch_epoch: 0,
            changed: tokio::sync::watch::Sender::new((0, 0)),
        }
    }
}

/// A running stand-in. Dropping it stops the server.
pub struct ApiServer {
    store: Arc<Mutex<Store>>,
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ApiServer {
    pub async fn start() -> ApiServer {
        let store = Arc::new(Mutex::new(Store::default()));
        let router = Router::new().fallback(handle).with_state(store.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let url = format!("http://{}", listener.local_addr().expect("local addr"));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).into_future().await;
        });
        ApiServer { store, url, task }
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A client over HTTP, as `kube::Config` builds it.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url.parse().expect("url"));
        kube::Client::try_from(config).expect("client")
    }

    /// A kubeconfig pointing at this server.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: workload\n  cluster:\n    server: {}\nusers:\n- name: admin\n  user:\n    token: stand-in\ncontexts:\n- name: workload\n  context:\n    cluster: workload\n    user: admin\ncurrent-context: workload\n",
            self.url
        )
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Logged> {
        self.store().log.clone()
    }

    pub fn clear_log(&self) {
        self.store().log.clear();
    }

    /// Number of requests that change something (anything but GET).
    pub fn writes(&self) -> usize {
        self.store().log.iter().filter(|r| r.is_write()).count()
    }

    /// The next `n` requests whose path ends with `path` (and of `method`, if given) answer
    /// `status` with a `Status` body.
    pub fn fail_next(&self, method: Option<Method>, path: &str, n: usize, status: u16) {
        self.store().faults.push(Fault {
            method,
            path: path.to_string(),
            remaining: n,
            status,
        });
    }

    /// The stored object at an API path, e.g. `/api/v1/namespaces/ns/secrets/name`.
    pub fn get(&self, path: &str) -> Option<Value> {
        let target = Target::parse(path)?;
        let key = target.key()?;
        self.store().objects.get(&key).map(|s| s.object.clone())
    }

    /// Stores an object as is (a test's precondition), bumping its resourceVersion.
    pub fn put(&self, path_of_collection: &str, mut object: Value) {
        let target = Target::parse(path_of_collection).expect("collection path");
        let name = object["metadata"]["name"]
            .as_str()
            .expect("name")
            .to_string();
        let mut store = self.store();
        store.resource_version += 1;
        store.uid += 1;
        let rv = store.resource_version.to_string();
        let meta = object["metadata"].as_object_mut().expect("metadata");
        meta.insert("resourceVersion".into(), json!(rv));
        meta.entry("uid")
            .or_insert(json!(format!("uid-{}", store.uid)));
        meta.entry("generation").or_insert(json!(1));
        if let Some(ns) = &target.namespace {
            meta.insert("namespace".into(), json!(ns));
        }
        let key = Key {
            group_version: target.group_version.clone(),
            plural: target.plural.clone(),
            namespace: target.namespace.clone().unwrap_or_default(),
            name,
        };
        let previous = store.objects.get(&key).map(|s| s.applied.clone());
        let kind = if previous.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let applied = previous.unwrap_or_default();
        store.record(kind, &key, &object);
        store.objects.insert(key, Stored { object, applied });
    }

    /// Changes a stored object in place (e.g. sets its status, as a controller would).
    pub fn update(&self, path: &str, change: impl FnOnce(&mut Value)) {
        let target = Target::parse(path).expect("path");
        let key = target.key().expect("object path");
        let mut store = self.store();
        store.resource_version += 1;
        let rv = store.resource_version.to_string();
        let stored = store.objects.get_mut(&key).expect("object exists");
        change(&mut stored.object);
        stored.object["metadata"]["resourceVersion"] = json!(rv);
        let object = stored.object.clone();
        store.record("MODIFIED", &key, &object);
    }

    /// Removes an object without going through the API.
    pub fn remove(&self, path: &str) {
        let key = Target::parse(path)
            .and_then(|t| t.key())
            .expect("object path");
        let mut store = self.store();
        if let Some(stored) = store.objects.remove(&key) {
            store.record_deletion(&key, stored.object);
        }
    }

    /// Keeps at most `n` changes for watches; a watch further behind gets 410 Gone.
    pub fn set_watch_history(&self, n: usize) {
        let mut store = self.store();
        store.history_limit = n.max(1);
        store.trim_history();
    }

    /// Forgets every change so far, as an etcd compaction does: a watch or list+watch from
    /// an earlier resourceVersion gets 410 Gone.
    pub fn compact(&self) {
        let mut store = self.store();
        store.history.clear();
        store.compacted = store.resource_version;
    }

    /// Ends every open watch stream (an API server restart or a load balancer's idle cut).
    pub fn close_watches(&self) {
        let mut store = self.store();
        store.watch_epoch += 1;
        let state = (store.resource_version, store.watch_epoch);
        store.changed.send_replace(state);
    }

    /// Number of open watch streams.
    pub fn open_watches(&self) -> usize {
        self.store().changed.receiver_count()
    }
}

/// What a path addresses.
#[derive(Debug, Clone)]
struct Target {
    group_version: String,
    plural: String,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

impl Target {
    fn parse(path: &str) -> Option<Target> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group_version, rest) = match segments.as_slice() {
            ["api", version, rest @ ..] => (version.to_string(), rest),
            ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
            _ => return None,
        };
        let owned = |s: &&str| s.to_string();
        let target = match rest {
            // /namespaces/<ns>/status is the Namespace's own subresource.
            ["namespaces", ns, sub @ ("status" | "finalize")] => Target {
                group_version,
                plural: "namespaces".into(),
                namespace: None,
                name: Some(ns.to_string()),
                subresource: Some(sub.to_string()),
            },
            ["namespaces", ns, plural, tail @ ..] if tail.len() <= 2 => Target {
                group_version,
                plural: plural.to_string(),
                namespace: Some(ns.to_string()),
                name: tail.first().map(owned),
                subresource: tail.get(1).map(owned),
            },
            [plural, tail @ ..] if tail.len() <= 2 => Target {
                group_version,
                plural: plural.to_string(),
                namespace: None,
                name: tail.first().map(owned),
                subresource: tail.get(1).map(owned),
            },
            _ => return None,
        };
        Some(target)
    }

    fn key(&self) -> Option<Key> {
        Some(Key {
            group_version: self.group_version.clone(),
            plural: self.plural.clone(),
            namespace: self.namespace.clone().unwrap_or_default(),
            name: self.name.clone()?,
        })
    }
}

fn status_error(code: u16, reason: &str, message: impl Into<String>) -> Response {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message.into(),
        "reason": reason,
        "code": code,
    });
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(body)).into_response()
}

fn ok(code: StatusCode, body: Value) -> Response {
    (code, axum::Json(body)).into_response()
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(
    State(shared): State<Arc<Mutex<Store>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let query = uri.query().unwrap_or("").to_string();
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let partial = headers
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("as=PartialObjectMetadata"));
    let mut store = shared.lock().unwrap_or_else(|e| e.into_inner());
    store.log.push(Logged {
        method: method.clone(),
        path: path.clone(),
        query: query.clone(),
        content_type: content_type.clone(),
    });
    if let Some(fault) = store.faults.iter_mut().find(|f| {
        f.remaining > 0 && path.ends_with(&f.path) && f.method.as_ref().is_none_or(|m| *m == method)
    }) {
        fault.remaining -= 1;
        let status = fault.status;
        return status_error(
            status,
            "InjectedFault",
            format!("injected failure on {path}"),
        );
    }
    let Some(target) = Target::parse(&path) else {
        return status_error(404, "NotFound", format!("the server could not find {path}"));
    };
    let body: Option<Value> = if body.is_empty() {
        None
    } else if content_type.contains("yaml") {
        match serde_yaml::from_slice(&body) {
            Ok(v) => Some(v),
            Err(e) => return status_error(400, "BadRequest", format!("invalid YAML body: {e}")),
        }
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => Some(v),
            Err(e) => return status_error(400, "BadRequest", format!("invalid JSON body: {e}")),
        }
    };
    let watch = matches!(query_param(&query, "watch").as_deref(), Some("true" | "1"));
    match (method.clone(), target.name.is_some()) {
        (Method::GET, true) => store.get(&target, partial),
        (Method::GET, false) if watch => store.watch(shared.clone(), &target, &query, partial),
        (Method::GET, false) => store.list(&target, &query, partial),
        (Method::POST, false) => store.create(&target, body, &query),
        (Method::PUT, true) => store.replace(&target, body),
        (Method::PATCH, true) => store.patch(&target, body, &content_type, &query),
        (Method::DELETE, true) => store.delete(&target),
        _ => status_error(
            405,
            "MethodNotAllowed",
            format!("{method} {path} is not supported"),
        ),
    }
}

fn kind_of(plural: &str) -> String {
    // Only needed for empty lists; objects carry their kind.
    let singular = plural
        .strip_suffix("ies")
        .map(|s| format!("{s}y"))
        .or_else(|| plural.strip_suffix('s').map(str::to_string))
        .unwrap_or_else(|| plural.to_string());
    let mut chars = singular.chars();
    chars
        .next()
        .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
        .unwrap_or_default()
}

fn describe(target: &Target) -> String {
    format!(
        "{} \"{}\"",
        target.plural,
        target.name.as_deref().unwrap_or_default()
    )
}

impl Store {
    fn next_rv(&mut self) -> String {
        self.resource_version += 1;
        self.resource_version.to_string()
    }

    fn get(&self, target: &Target, partial: bool) -> Response {
        let key = target.key().expect("named");
        match self.objects.get(&key) {
            Some(stored) if partial => ok(StatusCode::OK, partial_metadata(&stored.object)),
            Some(stored) => ok(StatusCode::OK, stored.object.clone()),
            None => status_error(404, "NotFound", format!("{} not found", describe(target))),
        }
    }

    fn list(&self, target: &Target, query: &str, partial: bool) -> Response {
        let selector = query_param(query, "labelSelector").unwrap_or_default();
        let requirements = match parse_selector(&selector) {
            Ok(r) => r,
            Err(e) => return status_error(400, "BadRequest", e),
        };
        let items: Vec<Value> = self
            .objects
            .iter()
            .filter(|(k, _)| {
                k.group_version == target.group_version
                    && k.plural == target.plural
                    && target
                        .namespace
                        .as_ref()
                        .is_none_or(|ns| *ns == k.namespace)
            })
            .map(|(_, s)| s.object.clone())
            .filter(|o| {
                let labels = o["metadata"]["labels"]
                    .as_object()
                    .cloned()
                    .unwrap_or_default();
                requirements.iter().all(|r| r.matches(&labels))
            })
            .collect();
        if partial {
            let items: Vec<Value> = items.iter().map(partial_metadata).collect();
            return ok(
                StatusCode::OK,
                json!({
                    "apiVersion": "meta.k8s.io/v1",
                    "kind": "PartialObjectMetadataList",
                    "metadata": {"resourceVersion": self.resource_version.to_string()},
                    "items": items,
                }),
            );
        }
        let kind = items
            .first()
            .and_then(|o| o["kind"].as_str().map(str::to_string))
            .unwrap_or_else(|| kind_of(&target.plural));
        ok(
            StatusCode::OK,
            json!({
                "apiVersion": target.group_version,
                "kind": format!("{kind}List"),
                "metadata": {"resourceVersion": self.resource_version.to_string()},
                "items": items,
            }),
        )
    }

    fn create(&mut self, target: &Target, body: Option<Value>, query: &str) -> Response {
        let Some(mut object) = body.filter(Value::is_object) else {
            return status_error(400, "BadRequest", "a body is required");
        };
        // `generateName`: the prefix and a suffix unique here, as the API server makes one.
        if object["metadata"]["name"].is_null()
            && let Some(prefix) = object["metadata"]["generateName"].as_str()
        {
            let name = format!("{prefix}{:05x}", self.uid + 1);
            object["metadata"]["name"] = json!(name);
        }
        let Some(name) = object["metadata"]["name"].as_str().map(str::to_string) else {
            return status_error(422, "Invalid", "metadata.name: Required value");
        };
        let named = Target {
            name: Some(name),
            ..target.clone()
        };
        let key = named.key().expect("named");
        if self.objects.contains_key(&key) {
            return status_error(
                409,
                "AlreadyExists",
                format!("{} already exists", describe(&named)),
            );
        }
        self.uid += 1;
        let uid = format!("uid-{}", self.uid);
        let rv = self.next_rv();
        let meta = object["metadata"].as_object_mut().expect("metadata");
        meta.insert("uid".into(), json!(uid));
        meta.insert("resourceVersion".into(), json!(rv));
        meta.insert("generation".into(), json!(1));
        meta.insert("creationTimestamp".into(), json!("2026-01-01T00:00:00Z"));
        if let Some(ns) = &target.namespace {
            meta.insert("namespace".into(), json!(ns));
        }
        let _ = query_param(query, "fieldManager");
        fold_string_data(&mut object);
        self.record("ADDED", &key, &object);
        self.objects.insert(
            key,
            Stored {
                object: object.clone(),
                applied: BTreeMap::new(),
            },
        );
        ok(StatusCode::CREATED, object)
    }

    fn replace(&mut self, target: &Target, body: Option<Value>) -> Response {
        let Some(new) = body.filter(Value::is_object) else {
            return status_error(400, "BadRequest", "a body is required");
        };
        let key = target.key().expect("named");
        let Some(stored) = self.objects.get(&key) else {
            return status_error(404, "NotFound", format!("{} not found", describe(target)));
        };
        let current_rv = stored.object["metadata"]["resourceVersion"].clone();
        if let Some(rv) = new["metadata"]["resourceVersion"].as_str()
            && Some(rv) != current_rv.as_str()
        {
            return status_error(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {}: the object has been modified; please apply your changes to the latest version and try again",
                    describe(target)
                ),
            );
        }
        let old = stored.object.clone();
        let mut new = new;
        // An update without managedFields keeps them.
        if new["metadata"]
            .get("managedFields")
            .is_none_or(Value::is_null)
            && let Some(managed) = old["metadata"].get("managedFields")
            && let Some(meta) = new.get_mut("metadata").and_then(Value::as_object_mut)
        {
            meta.insert("managedFields".into(), managed.clone());
        }
        fold_string_data(&mut new);
        let merged = restrict(&old, new, target.subresource.as_deref());
        self.commit(key, old, merged, None)
    }

    fn patch(
        &mut self,
        target: &Target,
        body: Option<Value>,
        content_type: &str,
        query: &str,
    ) -> Response {
        let Some(patch) = body else {
            return status_error(400, "BadRequest", "a body is required");
        };
        let key = target.key().expect("named");
        let existing = self.objects.get(&key).cloned();
        if content_type.starts_with("application/apply-patch") {
            let Some(manager) = query_param(query, "fieldManager").filter(|m| !m.is_empty()) else {
                return status_error(
                    400,
                    "BadRequest",
                    "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                );
            };
            if patch["metadata"]["name"].as_str() != target.name.as_deref() {
                return status_error(
                    400,
                    "BadRequest",
                    "the name of the object does not match the URL",
                );
            }
            let (old, previous, mut applied) = match &existing {
                Some(stored) => (
                    stored.object.clone(),
                    stored.applied.get(&manager).cloned().unwrap_or(Value::Null),
                    stored.applied.clone(),
                ),
                None => (Value::Null, Value::Null, BTreeMap::new()),
            };
            let others: Vec<Value> = applied
                .iter()
                .filter(|(m, _)| **m != manager)
                .map(|(_, v)| v.clone())
                .collect();
            let mut object = if old.is_null() {
                json!({})
            } else {
                old.clone()
            };
            prune(&mut object, &previous, &patch, &others, 0);
            merge_into(&mut object, &patch);
            fold_string_data(&mut object);
            applied.insert(manager, patch);
            set_managed_fields(&mut object, &applied);
            if existing.is_none() {
                self.uid += 1;
                let meta = object["metadata"].as_object_mut().expect("metadata");
                meta.insert("uid".into(), json!(format!("uid-{}", self.uid)));
                meta.insert("generation".into(), json!(1));
                meta.insert("creationTimestamp".into(), json!("2026-01-01T00:00:00Z"));
                if let Some(ns) = &target.namespace {
                    meta.insert("namespace".into(), json!(ns));
                }
                let rv = self.next_rv();
                object["metadata"]["resourceVersion"] = json!(rv);
                self.record("ADDED", &key, &object);
                self.objects.insert(
                    key,
                    Stored {
                        object: object.clone(),
                        applied,
                    },
                );
                return ok(StatusCode::CREATED, object);
            }
            let merged = restrict(&old, object, target.subresource.as_deref());
            return self.commit(key, old, merged, Some(applied));
        }
        let Some(stored) = existing else {
            return status_error(404, "NotFound", format!("{} not found", describe(target)));
        };
        if content_type.starts_with("application/merge-patch")
            || content_type.starts_with("application/strategic-merge-patch")
        {
            let old = stored.object.clone();
            let mut object = old.clone();
            merge_patch(&mut object, &patch);
            fold_string_data(&mut object);
            let merged = restrict(&old, object, target.subresource.as_deref());
            return self.commit(key, old, merged, None);
        }
        status_error(
            415,
            "UnsupportedMediaType",
            format!("unsupported patch type {content_type}"),
        )
    }

    fn delete(&mut self, target: &Target) -> Response {
        let key = target.key().expect("named");
        let Some(stored) = self.objects.get(&key).cloned() else {
            return status_error(404, "NotFound", format!("{} not found", describe(target)));
        };
        let finalizers = stored.object["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if finalizers {
            let mut object = stored.object.clone();
            if object["metadata"]["deletionTimestamp"].is_null() {
                object["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
                let rv = self.next_rv();
                object["metadata"]["resourceVersion"] = json!(rv);
                self.objects.get_mut(&key).expect("exists").object = object.clone();
                self.record("MODIFIED", &key, &object);
            }
            return ok(StatusCode::OK, object);
        }
        self.objects.remove(&key);
        let object = self.record_deletion(&key, stored.object);
        ok(StatusCode::OK, object)
    }

    /// Stores `new` if it differs from `old`: resourceVersion bumped, generation bumped when
    /// something outside metadata and status changed.
    fn commit(
        &mut self,
        key: Key,
        old: Value,
        mut new: Value,
        applied: Option<BTreeMap<String, Value>>,
    ) -> Response {
        // Identity fields cannot change.
        for field in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "resourceVersion",
            "generation",
        ] {
            match old["metadata"].get(field) {
                Some(v) => new["metadata"][field] = v.clone(),
                None => {
                    if let Some(m) = new["metadata"].as_object_mut() {
                        m.remove(field);
                    }
                }
            }
        }
        let stored = self.objects.get(&key).cloned().expect("exists");
        let applied = applied.unwrap_or(stored.applied);
        if new == old {
            self.objects.insert(
                key,
                Stored {
                    object: new.clone(),
                    applied,
                },
            );
            return ok(StatusCode::OK, new);
        }
        let spec_changed =
            without(&old, &["metadata", "status"]) != without(&new, &["metadata", "status"]);
        if spec_changed {
            let generation = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
            new["metadata"]["generation"] = json!(generation);
        }
        let rv = self.next_rv();
        new["metadata"]["resourceVersion"] = json!(rv);
        self.record("MODIFIED", &key, &new);
        self.objects.insert(
            key,
            Stored {
                object: new.clone(),
                applied,
            },
        );
        ok(StatusCode::OK, new)
    }

    /// Remembers a change for watches and wakes them. `object` carries the new
    /// resourceVersion already.
    fn record(&mut self, kind: &'static str, key: &Key, object: &Value) {
        let resource_version = self.resource_version;
        self.history.push_back(Change {
            resource_version,
            key: key.clone(),
            kind,
            object: object.clone(),
        });
        self.trim_history();
        let state = (resource_version, self.watch_epoch);
        self.changed.send_replace(state);
    }

    /// A deletion takes a resourceVersion of its own; the deleted object carries it.
    fn record_deletion(&mut self, key: &Key, mut object: Value) -> Value {
        let rv = self.next_rv();
        object["metadata"]["resourceVersion"] = json!(rv);
        self.record("DELETED", key, &object);
        object
    }

    fn trim_history(&mut self) {
        while self.history.len() > self.history_limit {
            if let Some(change) = self.history.pop_front() {
                self.compacted = change.resource_version;
            }
        }
    }

    /// `GET …?watch=true`: a stream of the changes after `resourceVersion` that match.
    fn watch(
        &self,
        shared: Arc<Mutex<Store>>,
        target: &Target,
        query: &str,
        partial: bool,
    ) -> Response {
        let selector = query_param(query, "labelSelector").unwrap_or_default();
        let requirements = match parse_selector(&selector) {
            Ok(r) => r,
            Err(e) => return status_error(400, "BadRequest", e),
        };
        let since = query_param(query, "resourceVersion").unwrap_or_default();
        let filter = WatchFilter {
            group_version: target.group_version.clone(),
            plural: target.plural.clone(),
            namespace: target.namespace.clone(),
            requirements,
            partial,
        };
        let mut pending = VecDeque::new();
        let cursor = match since.as_str() {
            "" | "0" => {
                for (key, stored) in &self.objects {
                    if filter.matches(key, &stored.object) {
                        pending.push_back(event_line("ADDED", filter.shape(&stored.object)));
                    }
                }
                self.resource_version
            }
            rv => match rv.parse::<u64>() {
                Ok(rv) => rv,
                Err(_) => {
                    return status_error(
                        400,
                        "BadRequest",
                        format!("invalid resourceVersion {rv:?}"),
                    );
                }
            },
        };
        let deadline = query_param(query, "timeoutSeconds")
            .and_then(|t| t.parse::<u64>().ok())
            .map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
        let stream = WatchStream {
            shared,
            filter,
            cursor,
            pending,
            changed: self.changed.subscribe(),
            epoch: self.watch_epoch,
            bookmarks: query_param(query, "allowWatchBookmarks").as_deref() == Some("true"),
            deadline,
            done: false,
        };
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(Body::from_stream(futures::stream::unfold(
                stream,
                WatchStream::next,
            )))
            .unwrap_or_else(|_| {
                status_error(500, "InternalError", "cannot build the watch response")
            })
    }
}

/// Which objects a watch reports, and in which shape.
struct WatchFilter {
    group_version: String,
    plural: String,
    namespace: Option<String>,
    requirements: Vec<Requirement>,
    partial: bool,
}

impl WatchFilter {
    fn matches(&self, key: &Key, object: &Value) -> bool {
        let labels = object["metadata"]["labels"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        key.group_version == self.group_version
            && key.plural == self.plural
            && self
                .namespace
                .as_ref()
                .is_none_or(|ns| *ns == key.namespace)
            && self.requirements.iter().all(|r| r.matches(&labels))
    }

    fn shape(&self, object: &Value) -> Value {
        if self.partial {
            partial_metadata(object)
        } else {
            object.clone()
        }
    }
}

fn event_line(kind: &str, object: Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// An object as kube-apiserver's metadata API returns it.
fn partial_metadata(object: &Value) -> Value {
    json!({
        "apiVersion": "meta.k8s.io/v1",
        "kind": "PartialObjectMetadata",
        "metadata": object["metadata"],
    })
}

/// The state of one open watch; events are produced only as fast as the client reads them,
/// so a slow client falls behind the history and gets 410.
struct WatchStream {
    shared: Arc<Mutex<Store>>,
    filter: WatchFilter,
    cursor: u64,
    pending: VecDeque<Bytes>,
    changed: tokio::sync::watch::Receiver<(u64, u64)>,
    epoch: u64,
    bookmarks: bool,
    deadline: Option<tokio::time::Instant>,
    done: bool,
}

impl WatchStream {
    async fn next(mut self) -> Option<(Result<Bytes, std::io::Error>, Self)> {
        loop {
            if let Some(line) = self.pending.pop_front() {
                return Some((Ok(line), self));
            }
            if self.done {
                return None;
            }
            self.catch_up();
            if !self.pending.is_empty() || self.done {
                continue;
            }
            let wait = self.changed.changed();
            let outcome = match self.deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, wait).await.ok(),
                None => Some(wait.await),
            };
            match outcome {
                Some(Ok(())) => {}
                // Timed out, or the server is gone.
                _ => return None,
            }
        }
    }

    /// Queues the changes after the cursor, or a 410 when they are no longer known.
    fn catch_up(&mut self) {
        let store = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        if store.watch_epoch != self.epoch {
            self.done = true;
            return;
        }
        if self.cursor < store.compacted {
            let status = json!({
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": format!("too old resource version: {} ({})", self.cursor, store.compacted + 1),
                "reason": "Expired",
                "code": 410,
            });
            self.pending.push_back(event_line("ERROR", status));
            self.done = true;
            return;
        }
        if store.resource_version == self.cursor {
            return;
        }
        for change in store
            .history
            .iter()
            .filter(|c| c.resource_version > self.cursor)
        {
            if self.filter.matches(&change.key, &change.object) {
                self.pending
                    .push_back(event_line(change.kind, self.filter.shape(&change.object)));
            }
        }
        self.cursor = store.resource_version;
        if self.pending.is_empty() && self.bookmarks {
            let bookmark = json!({
                "apiVersion": self.filter.group_version,
                "kind": kind_of(&self.filter.plural),
                "metadata": {"resourceVersion": self.cursor.to_string()},
            });
            self.pending.push_back(event_line("BOOKMARK", bookmark));
        }
    }
}

fn without(object: &Value, fields: &[&str]) -> Value {
    let mut object = object.clone();
    if let Some(map) = object.as_object_mut() {
        for field in fields {
            map.remove(*field);
        }
    }
    object
}

/// The main resource cannot change `status`; the status subresource changes only `status`.
fn restrict(old: &Value, new: Value, subresource: Option<&str>) -> Value {
    match subresource {
        Some("status") => {
            let mut object = old.clone();
            match new.get("status") {
                Some(status) => object["status"] = status.clone(),
                None => {
                    if let Some(m) = object.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
            object
        }
        _ => {
            let mut object = new;
            match old.get("status") {
                Some(status) => object["status"] = status.clone(),
                None => {
                    if let Some(m) = object.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
            object
        }
    }
}

/// Secrets: `stringData` is folded into base64 `data`, as the API server does.
fn fold_string_data(object: &mut Value) {
    if object["kind"] != "Secret" {
        return;
    }
    let Some(map) = object.as_object_mut() else {
        return;
    };
    if let Some(Value::Object(string_data)) = map.remove("stringData") {
        use base64::Engine;
        let data = map.entry("data").or_insert_with(|| json!({}));
        for (k, v) in string_data {
            let text = v.as_str().unwrap_or_default().to_string();
            data[k] = json!(base64::engine::general_purpose::STANDARD.encode(text));
        }
    }
}

/// `metadata.managedFields` of an object from each manager's last applied configuration; a
/// manager whose configuration sets nothing the server records has no entry.
fn set_managed_fields(object: &mut Value, applied: &BTreeMap<String, Value>) {
    let entries: Vec<Value> = applied
        .iter()
        .filter_map(|(manager, config)| {
            let fields = applied_field_set(config);
            if fields.as_object().is_none_or(Map::is_empty) {
                return None;
            }
            Some(json!({
                "manager": manager,
                "operation": "Apply",
                "apiVersion": config["apiVersion"],
                "time": "2026-01-01T00:00:00Z",
                "fieldsType": "FieldsV1",
                "fieldsV1": fields,
            }))
        })
        .collect();
    let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    if entries.is_empty() {
        meta.remove("managedFields");
    } else {
        meta.insert("managedFields".into(), Value::Array(entries));
    }
}

/// The fields an applied configuration sets, without those the server owns for everyone.
fn applied_field_set(config: &Value) -> Value {
    let mut set = field_set(config);
    if let Some(top) = set.as_object_mut() {
        for field in ["f:apiVersion", "f:kind", "f:status"] {
            top.remove(field);
        }
        if let Some(Value::Object(meta)) = top.get_mut("f:metadata") {
            for field in [
                "name",
                "namespace",
                "uid",
                "resourceVersion",
                "generation",
                "creationTimestamp",
                "selfLink",
                "managedFields",
            ] {
                meta.remove(&format!("f:{field}"));
            }
            if meta.is_empty() {
                top.remove("f:metadata");
            }
        }
    }
    set
}

/// A value's field set in the `FieldsV1` format; `{}` for a leaf.
fn field_set(value: &Value) -> Value {
    match value {
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .filter(|(_, v)| v.as_array().is_none_or(|items| !items.is_empty()))
                .map(|(k, v)| (format!("f:{k}"), field_set(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Object(
            items
                .iter()
                .enumerate()
                .map(|(index, item)| {
                    let mut children = field_set(item);
                    if let Some(c) = children.as_object_mut()
                        && !c.is_empty()
                    {
                        c.insert(".".into(), json!({}));
                    }
                    (list_element(index, item), children)
                })
                .collect(),
        ),
        _ => json!({}),
    }
}

/// A list element's path element: `k:{…}` by the key fields the real API uses for the lists
/// the addon writes, `i:<n>` when the element has none of them.
fn list_element(index: usize, item: &Value) -> String {
    let Some(fields) = item.as_object() else {
        return format!("i:{index}");
    };
    let protocol = || fields.get("protocol").cloned().unwrap_or(json!("TCP"));
    let key = if let Some(port) = fields.get("containerPort").filter(|p| p.is_number()) {
        json!({"containerPort": port, "protocol": protocol()})
    } else if let Some(port) = fields.get("port").filter(|p| p.is_number()) {
        json!({"port": port, "protocol": protocol()})
    } else if let Some(path) = fields.get("mountPath").filter(|p| p.is_string()) {
        json!({"mountPath": path})
    } else if let Some(uid) = fields.get("uid").filter(|u| u.is_string()) {
        json!({"uid": uid})
    } else if let Some(name) = fields.get("name").filter(|n| n.is_string()) {
        json!({"name": name})
    } else {
        return format!("i:{index}");
    };
    format!("k:{key}")
}

/// Removes from `object` what `previous` applied and `current` no longer does, unless another
/// manager applies it.
fn prune(object: &mut Value, previous: &Value, current: &Value, others: &[Value], depth: usize) {
    let (Some(previous), Some(target)) = (previous.as_object(), object.as_object_mut()) else {
        return;
    };
    for (key, prev_value) in previous {
        if depth == 0 && (key == "apiVersion" || key == "kind") {
            continue;
        }
        let other_values: Vec<Value> = others.iter().filter_map(|o| o.get(key).cloned()).collect();
        match current.get(key) {
            None => {
                if other_values.is_empty() {
                    target.remove(key);
                }
            }
            Some(cur) => {
                if let Some(child) = target.get_mut(key)
                    && prev_value.is_object()
                    && cur.is_object()
                {
                    prune(child, prev_value, cur, &other_values, depth + 1);
                }
            }
        }
    }
}

/// Applied configuration merged into the object: maps merge, everything else replaces.
fn merge_into(object: &mut Value, applied: &Value) {
    match (object, applied) {
        (Value::Object(target), Value::Object(source)) => {
            for (k, v) in source {
                match target.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => {
                        merge_into(existing, v)
                    }
                    _ => {
                        target.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (object, applied) => *object = applied.clone(),
    }
}

/// RFC 7386 JSON merge patch.
fn merge_patch(object: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *object = patch.clone();
        return;
    };
    if !object.is_object() {
        *object = Value::Object(Map::new());
    }
    let target = object.as_object_mut().expect("object");
    for (k, v) in patch {
        if v.is_null() {
            target.remove(k);
        } else {
            merge_patch(target.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl Requirement {
    fn matches(&self, labels: &Map<String, Value>) -> bool {
        let value = |k: &str| labels.get(k).and_then(Value::as_str);
        match self {
            Requirement::Equals(k, v) => value(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => value(k) != Some(v.as_str()),
            Requirement::In(k, vs) => value(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Requirement::NotIn(k, vs) => value(k).is_none_or(|x| vs.iter().all(|v| v != x)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
        }
    }
}

/// Label selector syntax: `a=b`, `a==b`, `a!=b`, `a in (x,y)`, `a notin (x)`, `a`, `!a`.
fn parse_selector(selector: &str) -> Result<Vec<Requirement>, String> {
    let mut parts = Vec::new();
    let mut depth = 0;
    let mut current = String::new();
    for c in selector.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    parts.push(current);
    let set = |s: &str| -> Result<Vec<String>, String> {
        let s = s.trim();
        let inner = s
            .strip_prefix('(')
            .and_then(|s| s.strip_suffix(')'))
            .ok_or_else(|| format!("invalid set {s:?}"))?;
        Ok(inner.split(',').map(|v| v.trim().to_string()).collect())
    };
    let mut out = Vec::new();
    for part in parts.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
        if let Some((k, v)) = part.split_once(" notin ") {
            out.push(Requirement::NotIn(k.trim().into(), set(v)?));
        } else if let Some((k, v)) = part.split_once(" in ") {
            out.push(Requirement::In(k.trim().into(), set(v)?));
        } else if let Some((k, v)) = part.split_once("!=") {
            out.push(Requirement::NotEquals(k.trim().into(), v.trim().into()));
        } else if let Some((k, v)) = part.split_once("==") {
            out.push(Requirement::Equals(k.trim().into(), v.trim().into()));
        } else if let Some((k, v)) = part.split_once('=') {
            out.push(Requirement::Equals(k.trim().into(), v.trim().into()));
        } else if let Some(k) = part.strip_prefix('!') {
            out.push(Requirement::NotExists(k.trim().into()));
        } else {
            out.push(Requirement::Exists(part.into()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    // Unused where this module is built without a test harness (the controller benchmark).
    #[allow(unused_imports)]
    use super::*;

    #[test]
    fn paths() {
        let t = Target::parse("/api/v1/namespaces/ns/secrets/s").unwrap();
        assert_eq!(
            (t.plural.as_str(), t.namespace.as_deref(), t.name.as_deref()),
            ("secrets", Some("ns"), Some("s"))
        );
        let t = Target::parse("/api/v1/namespaces/registry-system").unwrap();
        assert_eq!(
            (t.plural.as_str(), t.namespace, t.name.as_deref()),
            ("namespaces", None, Some("registry-system"))
        );
        let t = Target::parse("/apis/apps/v1/namespaces/ns/statefulsets/r/status").unwrap();
        assert_eq!(
            (t.group_version.as_str(), t.subresource.as_deref()),
            ("apps/v1", Some("status"))
        );
    }

    #[test]
    fn selectors() {
        let labels: Map<String, Value> =
            serde_json::from_value(json!({"a": "1", "b": "2"})).unwrap();
        let check = |s: &str| {
            parse_selector(s)
                .unwrap()
                .iter()
                .all(|r| r.matches(&labels))
        };
        assert!(check("a=1,b in (2,3)"));
        assert!(check("a,!c,b notin (3)"));
        assert!(!check("a!=1"));
        assert!(!check("b in (3, 4)"));
    }

    #[test]
    fn managed_fields_are_shaped_like_the_real_ones() {
        let config = json!({
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {"name": "r", "namespace": "ns", "labels": {"a": "1"}},
            "spec": {
                "replicas": 1,
                "volumeClaimTemplates": [],
                "template": {"spec": {
                    "containers": [{
                        "name": "c",
                        "args": ["x"],
                        "ports": [{"name": "p", "containerPort": 5000}],
                        "volumeMounts": [{"name": "v", "mountPath": "/v"}],
                    }],
                    "volumes": [{"name": "v", "emptyDir": {}}],
                }},
            },
        });
        let applied = BTreeMap::from([("m".to_string(), config.clone())]);
        let mut object = config;
        set_managed_fields(&mut object, &applied);
        let entries = object["metadata"]["managedFields"].as_array().unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0]["manager"], "m");
        assert_eq!(entries[0]["operation"], "Apply");
        assert_eq!(entries[0]["apiVersion"], "apps/v1");
        assert_eq!(entries[0]["fieldsType"], "FieldsV1");
        assert_eq!(
            entries[0]["fieldsV1"],
            json!({
                "f:metadata": {"f:labels": {"f:a": {}}},
                "f:spec": {
                    "f:replicas": {},
                    "f:template": {"f:spec": {
                        "f:containers": {"k:{\"name\":\"c\"}": {
                            ".": {},
                            "f:name": {},
                            "f:args": {"i:0": {}},
                            "f:ports": {"k:{\"containerPort\":5000,\"protocol\":\"TCP\"}": {
                                ".": {}, "f:name": {}, "f:containerPort": {},
                            }},
                            "f:volumeMounts": {"k:{\"mountPath\":\"/v\"}": {
                                ".": {}, "f:name": {}, "f:mountPath": {},
                            }},
                        }},
                        "f:volumes": {"k:{\"name\":\"v\"}": {".": {}, "f:name": {}, "f:emptyDir": {}}},
                    }},
                },
            })
        );
        // A configuration of nothing but the name records nothing.
        let applied = BTreeMap::from([(
            "m".to_string(),
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "n"}}),
        )]);
        set_managed_fields(&mut object, &applied);
        assert!(object["metadata"].get("managedFields").is_none());
    }

    #[test]
    fn apply_prunes_what_a_manager_drops() {
        let mut object = json!({"spec": {"a": 1, "b": 2, "c": 3}});
        let previous = json!({"spec": {"a": 1, "b": 2}});
        let current = json!({"spec": {"a": 5}});
        prune(&mut object, &previous, &current, &[], 0);
        merge_into(&mut object, &current);
        assert_eq!(object, json!({"spec": {"a": 5, "c": 3}}));
    }
}
