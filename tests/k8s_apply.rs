//! `ClusterApi::ensure` against the in-memory API server, through a real `kube::Client` over
//! loopback HTTP: a converged object costs one GET and no write, and a field an earlier apply
//! of ours set but the desired object no longer does is pruned by applying again, as told by
//! the object's `metadata.managedFields`.

mod support;

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use registry_addon::k8s::{self, ClusterApi, Outcome, Place};
use registry_addon::names;
use registry_addon::render::registry::{RegistryValues, registry_objects};
use registry_addon::wire::cluster::Cluster;
use registry_addon::wire::variable::registry_from_config;
use serde_json::{Value, json};
use support::apiserver::ApiServer;
use support::*;

const STS_PATH: &str = "/apis/apps/v1/namespaces/registry-system/statefulsets/registry";

fn statefulset() -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {
            "name": "registry",
            "namespace": "registry-system",
            "labels": {"app.kubernetes.io/name": "registry"},
        },
        "spec": {
            "replicas": 2,
            "serviceName": "registry-headless",
            "selector": {"matchLabels": {"app.kubernetes.io/name": "registry"}},
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": "registry"}},
                "spec": {
                    "containers": [{
                        "name": "registry",
                        "image": "registry:2.8.3",
                        "env": [{"name": "REGISTRY_HTTP_ADDR", "value": ":5000"}],
                        "ports": [{"name": "registry", "containerPort": 5000, "protocol": "TCP"}],
                    }],
                },
            },
        },
    })
}

/// What an earlier version of the addon applied: one more label, pod annotation, container
/// field and port field. (A dropped list element, such as an env var, changes the list's
/// length, which the values alone already tell.)
fn older_statefulset() -> Value {
    let mut object = statefulset();
    object["metadata"]["labels"]["registry-addon/legacy"] = json!("true");
    object["spec"]["template"]["metadata"]["annotations"] = json!({"registry-addon/debug": "1"});
    let container = &mut object["spec"]["template"]["spec"]["containers"][0];
    container["workingDir"] = json!("/var/lib/registry");
    container["ports"][0]["hostPort"] = json!(5000);
    object
}

fn workload(server: &ApiServer) -> ClusterApi {
    ClusterApi::new(server.client(), Place::Workload)
}

fn container(object: &Value) -> &Value {
    &object["spec"]["template"]["spec"]["containers"][0]
}

/// Server-side apply by another field manager, as kubectl or a controller would.
async fn apply_as(server: &ApiServer, manager: &str, object: &Value) {
    let id = k8s::ObjectId::of(object);
    let resource = k8s::api_resource(&id.api_version, &id.kind);
    let api: Api<DynamicObject> =
        Api::namespaced_with(server.client(), id.namespace.as_deref().unwrap(), &resource);
    api.patch(
        &id.name,
        &PatchParams::apply(manager).force(),
        &Patch::Apply(object),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_converged_object_costs_one_get_and_no_write() {
    let server = ApiServer::start().await;
    let api = workload(&server);
    assert_eq!(api.ensure(&statefulset()).await.unwrap(), Outcome::Applied);
    assert_eq!(server.writes(), 1);

    server.clear_log();
    assert_eq!(
        api.ensure(&statefulset()).await.unwrap(),
        Outcome::Unchanged
    );
    assert_eq!(server.writes(), 0);
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn managed_fields_come_back_on_get() {
    let server = ApiServer::start().await;
    let api = workload(&server);
    api.ensure(&statefulset()).await.unwrap();

    // Through kube's typed ObjectMeta, as `ensure` reads it.
    let object = api
        .get(
            "apps/v1",
            "StatefulSet",
            Some("registry-system"),
            "registry",
        )
        .await
        .unwrap()
        .unwrap();
    let entries = object["metadata"]["managedFields"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{entries:#?}");
    let entry = &entries[0];
    assert_eq!(entry["manager"], names::FIELD_MANAGER);
    assert_eq!(entry["operation"], "Apply");
    assert_eq!(entry["apiVersion"], "apps/v1");
    assert_eq!(entry["fieldsType"], "FieldsV1");
    let fields = &entry["fieldsV1"];
    assert!(fields.get("f:apiVersion").is_none() && fields.get("f:kind").is_none());
    assert!(fields["f:metadata"].get("f:name").is_none());
    let containers = &fields["f:spec"]["f:template"]["f:spec"]["f:containers"];
    let registry = &containers["k:{\"name\":\"registry\"}"];
    assert_eq!(registry["."], json!({}));
    assert_eq!(
        registry["f:ports"]["k:{\"containerPort\":5000,\"protocol\":\"TCP\"}"]["f:containerPort"],
        json!({})
    );
    assert!(!k8s::fields::owns_more_than(fields, &statefulset()));
}

#[tokio::test]
async fn fields_the_addon_stopped_setting_are_pruned() {
    let server = ApiServer::start().await;
    let api = workload(&server);
    api.apply(&older_statefulset()).await.unwrap();
    // Every field the new version sets already has its value: values alone say "converged".
    let before = server.get(STS_PATH).unwrap();
    assert!(k8s::contains(&before, &statefulset()));

    server.clear_log();
    assert_eq!(api.ensure(&statefulset()).await.unwrap(), Outcome::Applied);
    assert_eq!(server.writes(), 1);
    let after = server.get(STS_PATH).unwrap();
    assert_eq!(
        after["metadata"]["labels"],
        statefulset()["metadata"]["labels"]
    );
    assert!(
        after["spec"]["template"]["metadata"]
            .get("annotations")
            .is_none()
    );
    assert!(container(&after).get("workingDir").is_none());
    assert_eq!(
        container(&after)["ports"],
        container(&statefulset())["ports"]
    );

    server.clear_log();
    assert_eq!(
        api.ensure(&statefulset()).await.unwrap(),
        Outcome::Unchanged
    );
    assert_eq!(server.writes(), 0);
}

#[tokio::test]
async fn a_dropped_env_var_is_pruned() {
    let server = ApiServer::start().await;
    let api = workload(&server);
    let mut older = statefulset();
    older["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "REGISTRY_LOG_LEVEL", "value": "debug"}));
    api.apply(&older).await.unwrap();

    assert_eq!(api.ensure(&statefulset()).await.unwrap(), Outcome::Applied);
    let after = server.get(STS_PATH).unwrap();
    assert_eq!(container(&after)["env"], container(&statefulset())["env"]);
}

#[tokio::test]
async fn other_managers_fields_do_not_cause_applies() {
    let server = ApiServer::start().await;
    let api = workload(&server);
    api.ensure(&statefulset()).await.unwrap();
    apply_as(
        &server,
        "kubectl",
        &json!({
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {
                "name": "registry",
                "namespace": "registry-system",
                "labels": {"team": "platform"},
                "annotations": {"note": "kept"},
            },
            "spec": {"template": {"metadata": {"annotations": {"restartedAt": "now"}}}},
        }),
    )
    .await;
    let managers: Vec<Value> = server.get(STS_PATH).unwrap()["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["manager"].clone())
        .collect();
    assert_eq!(managers, [json!("kubectl"), json!(names::FIELD_MANAGER)]);

    server.clear_log();
    assert_eq!(
        api.ensure(&statefulset()).await.unwrap(),
        Outcome::Unchanged
    );
    assert_eq!(server.writes(), 0);
    let object = server.get(STS_PATH).unwrap();
    assert_eq!(object["metadata"]["labels"]["team"], "platform");
    assert_eq!(
        object["spec"]["template"]["metadata"]["annotations"]["restartedAt"],
        "now"
    );
}

#[tokio::test]
async fn without_an_apply_of_ours_values_alone_decide() {
    let server = ApiServer::start().await;
    let api = workload(&server);
    // Created by someone else, extra fields and all: nothing of ours to prune.
    apply_as(&server, "helm", &older_statefulset()).await;
    server.clear_log();
    assert_eq!(
        api.ensure(&statefulset()).await.unwrap(),
        Outcome::Unchanged
    );
    assert_eq!(server.writes(), 0);

    // Created with a plain create (no apply entry): the same.
    let created = json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "other", "namespace": "registry-system", "labels": {"x": "1"}},
        "spec": {"replicas": 1},
    });
    assert!(api.create_or_get(&created).await.unwrap().is_none());
    let mut desired = created.clone();
    desired["metadata"]["labels"] = json!({});
    server.clear_log();
    assert_eq!(api.ensure(&desired).await.unwrap(), Outcome::Unchanged);
    assert_eq!(server.writes(), 0);
    desired["spec"]["replicas"] = json!(2);
    assert_eq!(api.ensure(&desired).await.unwrap(), Outcome::Applied);
}

#[tokio::test]
async fn every_rendered_registry_object_converges() {
    let server = ApiServer::start().await;
    let api = workload(&server);
    let cluster = Cluster::from_value(&cluster_fixture("cluster-v1beta2.json")).unwrap();
    let registry = registry_from_config(cluster.variable("clusterConfig"))
        .unwrap()
        .unwrap();
    let options = options(&[]);
    let values = RegistryValues::new(
        &options,
        &registry,
        "10.128.0.20".parse().unwrap(),
        "abc".into(),
    );
    let objects = registry_objects(&values);
    assert!(!objects.is_empty());
    api.ensure(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": names::REGISTRY_NAMESPACE}}))
        .await
        .unwrap();
    for object in &objects {
        assert_eq!(api.ensure(object).await.unwrap(), Outcome::Applied);
    }

    server.clear_log();
    for object in &objects {
        let id = k8s::ObjectId::of(object);
        assert_eq!(
            api.ensure(object).await.unwrap(),
            Outcome::Unchanged,
            "{id}"
        );
    }
    assert_eq!(server.writes(), 0);
    assert_eq!(server.requests().len(), objects.len());
}
