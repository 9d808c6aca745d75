//! Thin Kubernetes access: reads, server-side apply of only what differs, create-if-absent,
//! delete, and workload-cluster clients built from CAPI's kubeconfig Secrets.
//!
//! Objects are plain JSON (`serde_json::Value`) addressed by apiVersion/kind, so the same code
//! applies Secrets, HelmChartProxies and whatever the registry renderer returns.

pub mod fields;

use std::fmt;
use std::time::Duration;

use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::Value;

use crate::names;

/// Which cluster an API belongs to, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Management,
    Workload,
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::Management => f.write_str("on the management cluster"),
            Place::Workload => f.write_str("on the workload cluster"),
        }
    }
}

/// A failed request, naming the object: `secret registry-system/registry-tls on the workload
/// cluster: apply: 422 Invalid: …`.
#[derive(Debug, thiserror::Error)]
#[error("{object} {place}: {action}: {}", describe(.source))]
pub struct Error {
    pub object: String,
    pub place: Place,
    pub action: &'static str,
    #[source]
    pub source: kube::Error,
}

impl Error {
    /// Worth retrying later: the API was unreachable, overloaded or failed internally.
    pub fn is_transient(&self) -> bool {
        match &self.source {
            kube::Error::Api(status) => status.code == 429 || status.code >= 500,
            kube::Error::HyperError(_) | kube::Error::Service(_) => true,
            _ => false,
        }
    }

    /// The API did not answer at all: connection refused, TLS or transport failure.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self.source,
            kube::Error::HyperError(_) | kube::Error::Service(_)
        )
    }

    /// The HTTP status the API answered, if it answered.
    pub fn code(&self) -> Option<u16> {
        match &self.source {
            kube::Error::Api(status) => Some(status.code),
            _ => None,
        }
    }
}

fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) => {
            let reason = if status.reason.is_empty() {
                String::new()
            } else {
                format!(" {}", status.reason)
            };
            format!("{}{reason}: {}", status.code, status.message)
        }
        // Transport errors say little at the top ("client error (SendRequest)"): add the causes.
        other => {
            let mut text = other.to_string();
            let mut cause = std::error::Error::source(other);
            while let Some(inner) = cause {
                let inner_text = inner.to_string();
                if !text.contains(&inner_text) {
                    text.push_str(": ");
                    text.push_str(&inner_text);
                }
                cause = inner.source();
            }
            text
        }
    }
}

/// What `ensure` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The object already held every field we set: no write was sent.
    Unchanged,
    /// The object was created or updated by server-side apply.
    Applied,
}

/// The API of one cluster.
#[derive(Clone)]
pub struct ClusterApi {
    client: kube::Client,
    place: Place,
}

impl ClusterApi {
    pub fn new(client: kube::Client, place: Place) -> Self {
        ClusterApi { client, place }
    }

    pub fn place(&self) -> Place {
        self.place
    }

    fn api(&self, api_version: &str, kind: &str, namespace: Option<&str>) -> Api<DynamicObject> {
        let resource = api_resource(api_version, kind);
        match namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &resource),
            None => Api::all_with(self.client.clone(), &resource),
        }
    }

    fn error(
        &self,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
        action: &'static str,
        source: kube::Error,
    ) -> Error {
        Error {
            object: object_name(kind, namespace, name),
            place: self.place,
            action,
            source,
        }
    }

    /// The object, or `None` when it does not exist. Any 404 counts as absent: when the
    /// resource itself is not served (a CRD not installed), kube-apiserver answers with a
    /// plain-text 404 that is not a NotFound Status.
    pub async fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Option<Value>, Error> {
        let object = match self.api(api_version, kind, namespace).get(name).await {
            Ok(object) => object,
            Err(kube::Error::Api(status)) if status.code == 404 => return Ok(None),
            Err(e) => return Err(self.error(kind, namespace, name, "get", e)),
        };
        serde_json::to_value(object)
            .map(Some)
            .map_err(|e| self.error(kind, namespace, name, "decode", kube::Error::SerdeError(e)))
    }

    /// Every object of a kind, in `namespace` or in all namespaces. A kind that is not served
    /// (any 404) lists as empty.
    pub async fn list(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
    ) -> Result<Vec<Value>, Error> {
        let list = match self
            .api(api_version, kind, namespace)
            .list(&ListParams::default())
            .await
        {
            Ok(list) => list,
            Err(kube::Error::Api(status)) if status.code == 404 => return Ok(Vec::new()),
            Err(e) => return Err(self.error(kind, namespace, "", "list", e)),
        };
        list.items
            .into_iter()
            .map(|item| {
                serde_json::to_value(item).map_err(|e| {
                    self.error(kind, namespace, "", "decode", kube::Error::SerdeError(e))
                })
            })
            .collect()
    }

    /// Server-side apply of `desired` with field manager `registry-addon`, forcing ownership.
    pub async fn apply(&self, desired: &Value) -> Result<Value, Error> {
        let id = ObjectId::of(desired);
        let params = PatchParams::apply(names::FIELD_MANAGER).force();
        let object = self
            .api(&id.api_version, &id.kind, id.namespace.as_deref())
            .patch(&id.name, &params, &Patch::Apply(desired))
            .await
            .map_err(|e| self.error(&id.kind, id.namespace.as_deref(), &id.name, "apply", e))?;
        serde_json::to_value(object).map_err(|e| {
            self.error(
                &id.kind,
                id.namespace.as_deref(),
                &id.name,
                "decode",
                kube::Error::SerdeError(e),
            )
        })
    }

    /// Reads the object and applies `desired` only if it is not converged (see
    /// [`is_converged`]), so a converged object costs one GET and no write.
    pub async fn ensure(&self, desired: &Value) -> Result<Outcome, Error> {
        let id = ObjectId::of(desired);
        let current = self
            .get(&id.api_version, &id.kind, id.namespace.as_deref(), &id.name)
            .await?;
        self.converge(current.as_ref(), desired).await
    }

    /// Applies `desired` unless `current`, the object as just read, is converged with it.
    pub async fn converge(
        &self,
        current: Option<&Value>,
        desired: &Value,
    ) -> Result<Outcome, Error> {
        if current.is_some_and(|c| is_converged(c, desired)) {
            return Ok(Outcome::Unchanged);
        }
        self.apply(desired).await?;
        Ok(Outcome::Applied)
    }

    /// POSTs `object`: the created object, or `None` when one of that name exists (409).
    async fn try_create(&self, object: &Value) -> Result<Option<Value>, Error> {
        let id = ObjectId::of(object);
        let fail = |action: &'static str, e: kube::Error| {
            self.error(&id.kind, id.namespace.as_deref(), &id.name, action, e)
        };
        let api = self.api(&id.api_version, &id.kind, id.namespace.as_deref());
        let data: DynamicObject = serde_json::from_value(object.clone())
            .map_err(|e| fail("encode", kube::Error::SerdeError(e)))?;
        let params = PostParams {
            field_manager: Some(names::FIELD_MANAGER.to_string()),
            ..PostParams::default()
        };
        match api.create(&params, &data).await {
            Ok(created) => serde_json::to_value(created)
                .map(Some)
                .map_err(|e| fail("decode", kube::Error::SerdeError(e))),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(None),
            Err(e) => Err(fail("create", e)),
        }
    }

    /// Creates `object` unless an object of that name exists, and returns the object as the
    /// server holds it: the created one, or the one someone else made first.
    pub async fn create_or_read(&self, object: &Value) -> Result<Value, Error> {
        if let Some(created) = self.try_create(object).await? {
            return Ok(created);
        }
        let id = ObjectId::of(object);
        match self
            .get(&id.api_version, &id.kind, id.namespace.as_deref(), &id.name)
            .await?
        {
            Some(existing) => Ok(existing),
            // Deleted between the 409 and the GET: CAPI calls again.
            None => Err(self.error(
                &id.kind,
                id.namespace.as_deref(),
                &id.name,
                "create",
                kube::Error::Api(
                    kube::core::Status::failure("exists, then was gone when read", "Conflict")
                        .with_code(409)
                        .boxed(),
                ),
            )),
        }
    }

    /// Creates `object` unless an object of that name exists. `Ok(None)`: created;
    /// `Ok(Some(existing))`: someone else was first, use theirs.
    pub async fn create_or_get(&self, object: &Value) -> Result<Option<Value>, Error> {
        if self.try_create(object).await?.is_some() {
            return Ok(None);
        }
        let id = ObjectId::of(object);
        self.get(&id.api_version, &id.kind, id.namespace.as_deref(), &id.name)
            .await
    }

    /// Deletes the object; `false` when it did not exist.
    pub async fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<bool, Error> {
        match self
            .api(api_version, kind, namespace)
            .delete(name, &DeleteParams::background())
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
            Err(e) => Err(self.error(kind, namespace, name, "delete", e)),
        }
    }
}

/// `kind namespace/name` in lower case, as kubectl prints it: `secret default/c1-kubeconfig`.
pub fn object_name(kind: &str, namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{} {ns}/{name}", kind.to_ascii_lowercase()),
        None => format!("{} {name}", kind.to_ascii_lowercase()),
    }
}

/// Where an object lives, read from the object itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectId {
    pub api_version: String,
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
}

impl ObjectId {
    pub fn of(object: &Value) -> Self {
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        ObjectId {
            api_version: text(&object["apiVersion"]),
            kind: text(&object["kind"]),
            namespace: object["metadata"]["namespace"]
                .as_str()
                .filter(|ns| !ns.is_empty())
                .map(str::to_string),
            name: text(&object["metadata"]["name"]),
        }
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&object_name(
            &self.kind,
            self.namespace.as_deref(),
            &self.name,
        ))
    }
}

/// The API resource of a kind. The plurals the addon writes are listed; any other kind gets
/// the usual English plural. Namespaced or not is decided by the object's metadata.
pub fn api_resource(api_version: &str, kind: &str) -> ApiResource {
    let (group, version) = match api_version.split_once('/') {
        Some((group, version)) => (group, version),
        None => ("", api_version),
    };
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let plural = match kind {
        "Namespace" => "namespaces",
        "Secret" => "secrets",
        "ConfigMap" => "configmaps",
        "Service" => "services",
        "ServiceAccount" => "serviceaccounts",
        "StatefulSet" => "statefulsets",
        "Deployment" => "deployments",
        "PodDisruptionBudget" => "poddisruptionbudgets",
        "NetworkPolicy" => "networkpolicies",
        "Role" => "roles",
        "RoleBinding" => "rolebindings",
        "HelmChartProxy" => "helmchartproxies",
        "Cluster" => "clusters",
        _ => return ApiResource::from_gvk(&gvk),
    };
    ApiResource::from_gvk_with_plural(&gvk, plural)
}

/// Whether applying `desired` to `current` with our field manager would change nothing: every
/// field `desired` sets has that value, and our last apply set no field `desired` drops
/// (server-side apply prunes such a field only when we apply again). Without an apply entry
/// of ours in `metadata.managedFields`, the first condition alone.
pub fn is_converged(current: &Value, desired: &Value) -> bool {
    contains(current, desired) && !fields::apply_would_prune(current, desired, names::FIELD_MANAGER)
}

/// Whether `current` already holds every field `desired` sets, with the same value. Fields
/// the server adds (defaults, status, metadata) are ignored; lists must have the same length
/// and each element must contain the desired one. A desired `null` means "absent".
pub fn contains(current: &Value, desired: &Value) -> bool {
    match (current, desired) {
        (Value::Object(current), Value::Object(desired)) => {
            desired.iter().all(|(key, want)| match current.get(key) {
                Some(have) => contains(have, want),
                None => want.is_null(),
            })
        }
        (Value::Array(current), Value::Array(desired)) => {
            current.len() == desired.len()
                && current.iter().zip(desired).all(|(c, d)| contains(c, d))
        }
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (current, desired) => current == desired,
    }
}

/// A client for a workload cluster from the content of its CAPI kubeconfig Secret (key
/// `value`). Timeouts are short: hooks have seconds, not minutes.
pub async fn client_from_kubeconfig(
    kubeconfig: &str,
    timeout: Duration,
) -> Result<kube::Client, String> {
    let kubeconfig =
        Kubeconfig::from_yaml(kubeconfig).map_err(|e| format!("invalid kubeconfig: {e}"))?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|e| format!("unusable kubeconfig: {e}"))?;
    config.connect_timeout = Some(timeout);
    config.read_timeout = Some(timeout);
    config.write_timeout = Some(timeout);
    kube::Client::try_from(config).map_err(|e| format!("cannot build a client: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn contains_ignores_server_fields() {
        let desired =
            json!({"metadata": {"name": "a", "labels": {"x": "1"}}, "spec": {"list": [{"a": 1}]}});
        let current = json!({"metadata": {"name": "a", "uid": "u", "labels": {"x": "1", "y": "2"}}, "spec": {"list": [{"a": 1, "b": 2}]}, "status": {}});
        assert!(contains(&current, &desired));
        let changed =
            json!({"metadata": {"name": "a", "labels": {"x": "2"}}, "spec": {"list": [{"a": 1}]}});
        assert!(!contains(&changed, &desired));
        let longer = json!({"metadata": {"name": "a", "labels": {"x": "1"}}, "spec": {"list": [{"a": 1}, {"a": 2}]}});
        assert!(!contains(&longer, &desired));
        assert!(contains(&json!({}), &json!({"gone": null})));
    }

    #[test]
    fn converged_leaves_nothing_of_ours_to_prune() {
        let desired = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"x": "1"}});
        let mut current = desired.clone();
        current["data"]["y"] = json!("2");
        // Nobody's apply entry: `y` may be someone else's.
        assert!(is_converged(&current, &desired));
        let ours = |fields: Value| {
            json!([{
                "manager": names::FIELD_MANAGER,
                "operation": "Apply",
                "apiVersion": "v1",
                "time": "2026-01-01T00:00:00Z",
                "fieldsType": "FieldsV1",
                "fieldsV1": fields,
            }])
        };
        current["metadata"]["managedFields"] = ours(json!({"f:data": {"f:x": {}, "f:y": {}}}));
        assert!(!is_converged(&current, &desired));
        current["metadata"]["managedFields"] = ours(json!({"f:data": {"f:x": {}}}));
        assert!(is_converged(&current, &desired));
        current["data"]["x"] = json!("2");
        assert!(!is_converged(&current, &desired));
    }

    #[test]
    fn resources_and_names() {
        let r = api_resource("addons.cluster.x-k8s.io/v1alpha1", "HelmChartProxy");
        assert_eq!(r.plural, "helmchartproxies");
        assert_eq!(r.group, "addons.cluster.x-k8s.io");
        let r = api_resource("v1", "Secret");
        assert_eq!((r.group.as_str(), r.version.as_str()), ("", "v1"));
        assert_eq!(
            api_resource("policy/v1", "PodDisruptionBudget").plural,
            "poddisruptionbudgets"
        );
        assert_eq!(api_resource("example.com/v1", "Widget").plural, "widgets");
        assert_eq!(object_name("Secret", Some("ns"), "s"), "secret ns/s");
        assert_eq!(
            object_name("Namespace", None, "registry-system"),
            "namespace registry-system"
        );
    }
}
