//! Which Clusters exist and when their spec changes: a metadata-only watch (a few hundred
//! bytes per Cluster held, not the whole object), in all namespaces or in each watched one.

use std::collections::{HashMap, HashSet};

use futures::StreamExt;
use kube::api::{Api, DynamicObject, ListParams};
use kube::core::{ApiResource, GroupVersionKind, PartialObjectMeta};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};

use crate::controller::ClusterKey;
use crate::controller::queue::WorkQueue;

pub const CLUSTER_GROUP: &str = "cluster.x-k8s.io";
/// Newest first: the first one served is used.
pub const CLUSTER_VERSIONS: [&str; 2] = ["v1beta2", "v1beta1"];

pub fn cluster_resource(version: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(CLUSTER_GROUP, version, "Cluster"),
        "clusters",
    )
}

/// The newest Cluster version the API server serves (v1beta2 on CAPI ≥ 1.11, v1beta1
/// before). Listing one item tells, with the RBAC the controller has anyway.
pub async fn served_cluster_resource(
    client: &kube::Client,
    namespaces: &[String],
) -> Result<ApiResource, kube::Error> {
    let mut last_error = None;
    for version in CLUSTER_VERSIONS {
        let resource = cluster_resource(version);
        let api: Api<DynamicObject> = match namespaces.first() {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
            None => Api::all_with(client.clone(), &resource),
        };
        match api.list_metadata(&ListParams::default().limit(1)).await {
            Ok(_) => return Ok(resource),
            Err(kube::Error::Api(status)) if status.code == 404 => {
                last_error = Some(kube::Error::Api(status));
            }
            Err(e) => return Err(e),
        }
    }
    Err(last_error.expect("at least one version tried"))
}

/// What the watch knows of a Cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    generation: i64,
}

/// Called when a Cluster goes away.
pub trait OnDelete: Fn(&ClusterKey) + Send + Sync + 'static {}
impl<F: Fn(&ClusterKey) + Send + Sync + 'static> OnDelete for F {}

/// Watches Clusters and queues each one that is new or whose generation (its spec) changed;
/// a Cluster that is deleted is forgotten. Runs until the watch streams end (never, as they
/// retry with backoff).
pub async fn watch_clusters(
    client: kube::Client,
    resource: ApiResource,
    namespaces: Vec<String>,
    queue: WorkQueue<ClusterKey>,
    on_delete: impl OnDelete,
) {
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.into_iter().map(Some).collect()
    };
    let streams = scopes.iter().enumerate().map(|(index, scope)| {
        // `PartialObjectMeta`: kube asks for metadata only (`as=PartialObjectMetadata`).
        let api: Api<PartialObjectMeta<DynamicObject>> = match scope {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
            None => Api::all_with(client.clone(), &resource),
        };
        watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .map(move |event| (index, event))
            .boxed()
    });
    let mut events = futures::stream::select_all(streams);
    let mut known: HashMap<ClusterKey, Seen> = HashMap::new();
    // Keys listed since a scope's relist began.
    let mut relisting: HashMap<usize, HashSet<ClusterKey>> = HashMap::new();
    while let Some((index, event)) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                tracing::warn!(error = %e, resource = %resource.api_version, "watching Clusters failed; retrying");
                continue;
            }
        };
        match event {
            Event::Init => {
                relisting.insert(index, HashSet::new());
            }
            Event::InitApply(meta) => {
                if let Some(key) = key_of(&meta) {
                    relisting.entry(index).or_default().insert(key.clone());
                    seen(&mut known, &queue, key, &meta);
                }
            }
            Event::InitDone => {
                let listed = relisting.remove(&index).unwrap_or_default();
                let scope = &scopes[index];
                let gone: Vec<ClusterKey> = known
                    .keys()
                    .filter(|k| scope.as_ref().is_none_or(|ns| *ns == k.namespace))
                    .filter(|k| !listed.contains(*k))
                    .cloned()
                    .collect();
                for key in gone {
                    known.remove(&key);
                    queue.forget(key.clone());
                    on_delete(&key);
                }
            }
            Event::Apply(meta) => {
                if let Some(key) = key_of(&meta) {
                    seen(&mut known, &queue, key, &meta);
                }
            }
            Event::Delete(meta) => {
                if let Some(key) = key_of(&meta) {
                    known.remove(&key);
                    queue.forget(key.clone());
                    on_delete(&key);
                }
            }
        }
    }
}

fn key_of(meta: &PartialObjectMeta<DynamicObject>) -> Option<ClusterKey> {
    Some(ClusterKey::new(
        meta.metadata.namespace.as_deref()?,
        meta.metadata.name.as_deref()?,
    ))
}

/// Queues a Cluster that is new or whose spec changed. Status-only changes (CAPI updates a
/// Cluster's status often) do not bump the generation and are not queued; the resync
/// covers what they might mean.
fn seen(
    known: &mut HashMap<ClusterKey, Seen>,
    queue: &WorkQueue<ClusterKey>,
    key: ClusterKey,
    meta: &PartialObjectMeta<DynamicObject>,
) {
    let now = Seen {
        generation: meta.metadata.generation.unwrap_or(0),
    };
    if known.insert(key.clone(), now) != Some(now) {
        queue.add(key);
    }
}
