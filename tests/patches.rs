//! GeneratePatches through the hook dispatcher, with the management cluster's API served by a
//! small in-process stand-in holding Secrets.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use base64::Engine;
use clap::Parser;
use registry_addon::cli::AddonOptions;
use registry_addon::hooks::patches::containerd;
use registry_addon::hooks::{HookConfig, HookContext, Management, dispatch};
use registry_addon::wire::runtime::Hook;
use serde_json::{Value, json};

const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBcluster\n-----END CERTIFICATE-----\n";

type Secrets = Arc<Mutex<BTreeMap<(String, String), Value>>>;

fn secret(namespace: &str, name: &str, data: &[(&str, &str)]) -> Value {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let data: serde_json::Map<String, Value> = data
        .iter()
        .map(|(k, v)| (k.to_string(), json!(b64(v))))
        .collect();
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace}, "data": data})
}

fn not_found(name: &str) -> (StatusCode, axum::Json<Value>) {
    (
        StatusCode::NOT_FOUND,
        axum::Json(
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": format!("secrets \"{name}\" not found")}),
        ),
    )
}

/// GET and POST of Secrets, like the API server.
fn management(secrets: Secrets) -> kube::Client {
    async fn get_secret(
        State(s): State<Secrets>,
        Path((ns, name)): Path<(String, String)>,
    ) -> (StatusCode, axum::Json<Value>) {
        match s.lock().unwrap().get(&(ns, name.clone())) {
            Some(secret) => (StatusCode::OK, axum::Json(secret.clone())),
            None => not_found(&name),
        }
    }
    async fn create_secret(
        State(s): State<Secrets>,
        Path(ns): Path<String>,
        body: axum::Json<Value>,
    ) -> (StatusCode, axum::Json<Value>) {
        let name = body["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let mut secrets = s.lock().unwrap();
        if secrets.contains_key(&(ns.clone(), name.clone())) {
            return (
                StatusCode::CONFLICT,
                axum::Json(
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists", "code": 409, "message": "exists"}),
                ),
            );
        }
        secrets.insert((ns, name), body.0.clone());
        (StatusCode::CREATED, axum::Json(body.0))
    }
    let router = Router::new()
        .route("/api/v1/namespaces/{ns}/secrets/{name}", get(get_secret))
        .route(
            "/api/v1/namespaces/{ns}/secrets",
            axum::routing::post(create_secret),
        )
        .with_state(secrets);
    kube::Client::new(router, "default")
}

#[derive(Parser)]
struct Options {
    #[command(flatten)]
    addon: AddonOptions,
}

fn context(management: Management) -> HookContext {
    let config = HookConfig {
        namespace: "registry-addon-system".into(),
        addon: Options::parse_from(["registry-addon"]).addon,
    };
    HookContext::new(config, management)
}

fn with_cluster_ca() -> Secrets {
    let secrets = Secrets::default();
    secrets.lock().unwrap().insert(
        ("ns1".into(), "c1-registry-addon-ca".into()),
        secret("ns1", "c1-registry-addon-ca", &[("ca.crt", CA)]),
    );
    secrets
}

fn builtin(services: &[&str]) -> Value {
    json!({"cluster": {"name": "c1", "namespace": "ns1", "topology": {"version": "v1.33.0", "class": "quick-start"}, "network": {"services": services, "pods": ["192.168.0.0/16"], "serviceDomain": "cluster.local"}}})
}

fn control_plane_template() -> Value {
    json!({
        "apiVersion": "controlplane.cluster.x-k8s.io/v1beta1",
        "kind": "KubeadmControlPlaneTemplate",
        "metadata": {"name": "cp", "namespace": "ns1"},
        "spec": {"template": {"spec": {"kubeadmConfigSpec": {"clusterConfiguration": {}}}}}
    })
}

fn worker_template() -> Value {
    json!({
        "apiVersion": "bootstrap.cluster.x-k8s.io/v1beta1",
        "kind": "KubeadmConfigTemplate",
        "metadata": {"name": "md", "namespace": "ns1"},
        "spec": {"template": {"spec": {
            "files": [{"path": "/etc/user.conf", "owner": "root:root", "permissions": "0600", "content": "mine"}],
            "preKubeadmCommands": ["echo user"],
            "joinConfiguration": {}
        }}}
    })
}

fn request(registry: Value, services: &[&str], objects: Vec<(&str, Value, Vec<Value>)>) -> Vec<u8> {
    let items: Vec<Value> = objects
        .into_iter()
        .map(|(uid, object, variables)| {
            json!({
                "uid": uid,
                "holderReference": {"apiVersion": "cluster.x-k8s.io/v1beta1", "kind": "MachineDeployment", "namespace": "ns1", "name": "c1-md-0", "fieldPath": "spec.template.spec.bootstrap.configRef"},
                "object": object,
                "variables": variables,
            })
        })
        .collect();
    serde_json::to_vec(&json!({
        "apiVersion": "hooks.runtime.cluster.x-k8s.io/v1alpha1",
        "kind": "GeneratePatchesRequest",
        "settings": {},
        "variables": [
            {"name": "builtin", "value": builtin(services)},
            {"name": "clusterConfig", "value": {"addons": {"registry": registry}}},
        ],
        "items": items,
    }))
    .unwrap()
}

async fn call(ctx: &HookContext, body: &[u8]) -> Value {
    let response = dispatch(ctx, Hook::GeneratePatches, body, Duration::from_secs(10)).await;
    serde_json::to_value(response).unwrap()
}

/// The item's decoded JSON patch, by uid.
fn patch_of(response: &Value, uid: &str) -> Option<Vec<Value>> {
    let item = response["items"]
        .as_array()?
        .iter()
        .find(|i| i["uid"] == uid)?;
    assert_eq!(item["patchType"], "JSONPatch");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(item["patch"].as_str()?)
        .unwrap();
    Some(serde_json::from_slice(&bytes).unwrap())
}

/// RFC 6902 `add` and `replace`, the operations the handler emits.
fn apply(object: &Value, patch: &[Value]) -> Value {
    let mut object = object.clone();
    for op in patch {
        let path = op["path"].as_str().unwrap();
        let (parent, last) = path.rsplit_once('/').unwrap();
        let target = object
            .pointer_mut(parent)
            .unwrap_or_else(|| panic!("{parent} does not exist"));
        let value = op["value"].clone();
        match (op["op"].as_str().unwrap(), target) {
            ("add", Value::Array(list)) if last == "-" => list.push(value),
            ("add", Value::Array(list)) => list.insert(last.parse().unwrap(), value),
            ("replace", Value::Array(list)) => list[last.parse::<usize>().unwrap()] = value,
            ("add", Value::Object(map)) => {
                map.insert(last.to_string(), value);
            }
            ("replace", Value::Object(map)) => {
                assert!(map.contains_key(last), "replace of missing {path}");
                map.insert(last.to_string(), value);
            }
            (op, target) => panic!("cannot {op} {path} in {target}"),
        }
    }
    object
}

fn files(spec: &Value) -> BTreeMap<String, Value> {
    spec["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["path"].as_str().unwrap().to_string(), f.clone()))
        .collect()
}

#[tokio::test]
async fn control_plane_template_without_files_gets_the_mirror_files() {
    let ctx = context(Management::Client(management(with_cluster_ca())));
    let body = request(
        json!({}),
        &["10.96.0.0/12"],
        vec![("cp", control_plane_template(), vec![])],
    );
    let response = call(&ctx, &body).await;
    assert_eq!(response["status"], "Success", "{response}");
    let patched = apply(
        &control_plane_template(),
        &patch_of(&response, "cp").unwrap(),
    );
    let spec = &patched["spec"]["template"]["spec"]["kubeadmConfigSpec"];
    let files = files(spec);
    // The hosts.toml carries the ro password: read from the management Secret by the
    // bootstrap provider, never inline in the template.
    // Staged: the configure script moves it where its server line says (`_default` here).
    let hosts = &files[&containerd::staged_hosts_path()];
    assert!(hosts.get("content").is_none(), "{hosts}");
    assert_eq!(
        hosts["contentFrom"],
        json!({"secret": {"name": "c1-registry-addon-containerd", "key": "hosts.toml"}})
    );
    assert_eq!(hosts["permissions"], "0600");
    assert!(!patched.to_string().contains("Basic "), "{patched}");
    // The CA from the cluster's CA copy, so a rotation changes no template.
    assert_eq!(
        files["/etc/containerd/certs.d/10.96.0.20/ca.crt"]["contentFrom"],
        json!({"secret": {"name": "c1-registry-addon-ca", "key": "ca.crt"}})
    );
    assert!(
        !patched.to_string().contains("BEGIN CERTIFICATE"),
        "{patched}"
    );
    for major in [1, 2] {
        let fragment: toml::Table = toml::from_str(
            files[&containerd::fragment_path(major)]["content"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert!(fragment.contains_key("plugins"));
    }
    assert_eq!(files[&containerd::script_path()]["permissions"], "0700");
    assert_eq!(
        spec["preKubeadmCommands"],
        json!([containerd::pre_kubeadm_command()])
    );
    assert_eq!(spec["clusterConfiguration"], json!({}));
}

#[tokio::test]
async fn user_files_and_commands_are_kept_and_reapplying_adds_nothing() {
    let ctx = context(Management::Client(management(with_cluster_ca())));
    let body = request(
        json!({"replicas": 3}),
        &["10.128.0.0/12"],
        vec![("md", worker_template(), vec![])],
    );
    let response = call(&ctx, &body).await;
    let patch = patch_of(&response, "md").unwrap();
    assert!(
        patch
            .iter()
            .all(|op| op["op"] == "add" && op["path"].as_str().unwrap().ends_with("/-")),
        "{patch:?}"
    );
    let patched = apply(&worker_template(), &patch);
    let spec = &patched["spec"]["template"]["spec"];
    let files = files(spec);
    assert_eq!(files["/etc/user.conf"]["content"], "mine");
    assert_eq!(files.len(), 6);
    assert!(files.contains_key("/etc/containerd/certs.d/10.128.0.20/ca.crt"));
    assert_eq!(
        spec["preKubeadmCommands"],
        json!(["echo user", containerd::pre_kubeadm_command()])
    );

    // The same request against the patched template: nothing more to do.
    let again = request(
        json!({"replicas": 3}),
        &["10.128.0.0/12"],
        vec![("md", patched.clone(), vec![])],
    );
    let response = call(&ctx, &again).await;
    assert_eq!(response["status"], "Success");
    match patch_of(&response, "md") {
        None => {}
        Some(patch) => assert_eq!(apply(&patched, &patch), patched),
    }

    // A stale addon file is replaced in place, not duplicated.
    let mut stale = patched.clone();
    let list = stale["spec"]["template"]["spec"]["files"]
        .as_array_mut()
        .unwrap();
    let hosts = list
        .iter_mut()
        .find(|f| f["path"] == containerd::staged_hosts_path().as_str())
        .unwrap();
    hosts["content"] = json!("old");
    let response = call(
        &ctx,
        &request(
            json!({"replicas": 3}),
            &["10.128.0.0/12"],
            vec![("md", stale.clone(), vec![])],
        ),
    )
    .await;
    let fixed = apply(&stale, &patch_of(&response, "md").unwrap());
    assert_eq!(fixed, patched);
}

#[tokio::test]
async fn addon_off_means_no_patches_and_no_api_calls() {
    let ctx = context(Management::Unavailable("no kubeconfig".into()));
    let mut body: Value = serde_json::from_slice(&request(
        json!({}),
        &["10.96.0.0/12"],
        vec![("cp", control_plane_template(), vec![])],
    ))
    .unwrap();
    body["variables"][1]["value"] = json!({"addons": {"registry": null}});
    let response = call(&ctx, &serde_json::to_vec(&body).unwrap()).await;
    assert_eq!(response["status"], "Success", "{response}");
    assert_eq!(response["items"], json!([]));

    body["variables"].as_array_mut().unwrap().pop();
    let response = call(&ctx, &serde_json::to_vec(&body).unwrap()).await;
    assert_eq!(response["items"], json!([]));
}

#[tokio::test]
async fn item_variables_override_the_cluster_ones() {
    let ctx = context(Management::Client(management(with_cluster_ca())));
    let off = vec![
        json!({"name": "clusterConfig", "value": {}}),
        json!({"name": "builtin", "value": {"machineDeployment": {"class": "md"}}}),
    ];
    let body = request(
        json!({}),
        &["10.96.0.0/12"],
        vec![
            ("cp", control_plane_template(), vec![]),
            ("md", worker_template(), off),
        ],
    );
    let response = call(&ctx, &body).await;
    assert!(patch_of(&response, "cp").is_some());
    assert!(patch_of(&response, "md").is_none(), "{response}");
}

#[tokio::test]
async fn ipv6_service_ip_is_bracketed() {
    let ctx = context(Management::Client(management(with_cluster_ca())));
    let body = request(
        json!({}),
        &["fd00:10:96::/108", "10.96.0.0/12"],
        vec![("md", worker_template(), vec![])],
    );
    let response = call(&ctx, &body).await;
    let patched = apply(&worker_template(), &patch_of(&response, "md").unwrap());
    let files = files(&patched["spec"]["template"]["spec"]);
    assert!(files.contains_key(&containerd::staged_hosts_path()));
    assert_eq!(
        files["/etc/containerd/certs.d/[fd00:10:96::14]/ca.crt"]["contentFrom"]["secret"]["name"],
        "c1-registry-addon-ca"
    );
}

#[tokio::test]
async fn patches_need_no_api_and_are_the_same_in_every_mode() {
    // CAPI computes patches before BeforeClusterCreate creates the CA copy: the files only
    // name the Secrets, so neither the management cluster nor the CA is needed here, and a
    // mode switch or CA rotation leaves every template as it is.
    let ctx = context(Management::Unavailable("no kubeconfig".into()));
    let upstream = json!({"url": "https://upstream.example:5443/team"});
    let mut patches = Vec::new();
    for registry in [
        json!({}),
        json!({"mode": "Proxy", "upstream": upstream}),
        json!({"mode": "Direct", "upstream": upstream}),
        json!({"mode": "Unmanaged"}),
    ] {
        let body = request(
            registry.clone(),
            &["10.96.0.0/12"],
            vec![("md", worker_template(), vec![])],
        );
        let response = call(&ctx, &body).await;
        assert_eq!(response["status"], "Success", "{registry}: {response}");
        patches.push(patch_of(&response, "md").unwrap());
    }
    assert!(patches.windows(2).all(|w| w[0] == w[1]), "{patches:?}");
}

#[tokio::test]
async fn failures_say_what_is_wrong() {
    let ctx = context(Management::Client(management(with_cluster_ca())));
    let response = call(
        &ctx,
        &request(
            json!({"replicas": 9}),
            &["10.96.0.0/12"],
            vec![("md", worker_template(), vec![])],
        ),
    )
    .await;
    assert_eq!(response["status"], "Failure");
    assert!(
        response["message"]
            .as_str()
            .unwrap()
            .contains("addons.registry.replicas"),
        "{response}"
    );

    let response = call(
        &ctx,
        &request(json!({}), &[], vec![("md", worker_template(), vec![])]),
    )
    .await;
    assert_eq!(response["status"], "Failure");
    assert!(
        response["message"].as_str().unwrap().contains("cidrBlocks"),
        "{response}"
    );

    let mut broken = worker_template();
    broken["spec"]["template"]["spec"]["files"] = json!("not a list");
    let response = call(
        &ctx,
        &request(json!({}), &["10.96.0.0/12"], vec![("md", broken, vec![])]),
    )
    .await;
    assert_eq!(response["status"], "Failure");
    assert!(
        response["message"]
            .as_str()
            .unwrap()
            .contains("/spec/template/spec/files is not a list"),
        "{response}"
    );
}
