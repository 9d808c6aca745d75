//! Writes the registry chart's values and the objects `registry_objects` renders from them,
//! for several configurations, so `tests/charts/test_registry_chart.py` can render the chart
//! with the real Helm engine and compare object by object.
//!
//! Output: `$CHART_CHECK_DIR/<case>/{values.yaml,objects.json}` (default:
//! `<target>/tmp/chart-check`).

use std::net::IpAddr;
use std::path::PathBuf;

use clap::Parser;
use registry_addon::cli::AddonOptions;
use registry_addon::render::registry::{RegistryValues, registry_objects};
use registry_addon::wire::variable::registry_from_config;
use serde_json::{Value, json};

#[derive(Parser)]
struct Options {
    #[command(flatten)]
    addon: AddonOptions,
}

fn values(args: &[&str], registry: Value, service_ip: &str, hash: &str) -> RegistryValues {
    let options =
        Options::parse_from(std::iter::once("registry-addon").chain(args.iter().copied())).addon;
    let config = json!({"addons": {"registry": registry}});
    let registry = registry_from_config(Some(&config))
        .expect("valid variable")
        .expect("addon on");
    let ip: IpAddr = service_ip.parse().expect("IP address");
    RegistryValues::new(&options, &registry, ip, hash.to_string())
}

fn cases() -> Vec<(&'static str, RegistryValues)> {
    let hash = "4f1c0a2b9d3e5f6a7b8c9d0e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c";
    let mut tuned = values(
        &[
            "--registry-image",
            "mirror.example/distribution:3.0.0",
            "--sync-image",
            "mirror.example/registry-addon:dev",
        ],
        json!({"replicas": 7, "syncInterval": "1m30s", "storage": {"size": "1.5Ti"}}),
        "10.128.0.20",
        "123456",
    );
    tuned.control_plane.tolerate = false;
    tuned.control_plane.prefer = true;
    tuned
        .resources
        .registry
        .limits
        .insert("memory".into(), "1Gi".into());
    tuned.resources.sync.requests.clear();
    tuned.notifications.token_secret = "registry-sync-notify".into();
    tuned.notifications.token_key = "notify-token".into();
    vec![
        ("defaults", values(&[], json!({}), "10.96.0.20", hash)),
        (
            "ipv6-one-replica",
            values(
                &[],
                json!({"replicas": 1, "storage": {"size": "5Gi", "storageClassName": "fast-ssd"}, "syncInterval": "30s"}),
                "fd00:10:96::14",
                hash,
            ),
        ),
        ("tuned", tuned),
        ("proxy-with-secret-hash", {
            let mut values = values(
                &[],
                json!({"mode": "Proxy", "upstream": {
                    "url": "https://upstream.example",
                    "credentialsSecretRef": {"name": "up-creds"},
                }}),
                "10.96.0.20",
                hash,
            );
            values.upstream.secret_hash = "0123456789abcdef0123456789abcdef".into();
            values
        }),
        (
            "proxy",
            values(
                &["--registry-image", "registry:3.0.0"],
                json!({"mode": "Proxy", "replicas": 3, "upstream": {
                    "url": "https://upstream.example:5443/library",
                    "credentialsSecretRef": {"name": "up-creds"},
                    "caSecretRef": {"name": "up-ca"},
                }, "cache": {"ttl": "72h"}}),
                "10.96.0.20",
                hash,
            ),
        ),
        (
            "proxy-anonymous",
            values(
                &[],
                json!({"mode": "Proxy", "upstream": {"url": "https://upstream.example"}, "cache": {"ttl": "72h"}}),
                "10.96.0.20",
                hash,
            ),
        ),
        (
            "direct",
            values(
                &[],
                json!({"mode": "Direct", "replicas": 1, "upstream": {
                    "url": "https://upstream.example:5443",
                    "credentialsSecretRef": {"name": "up-creds"},
                    "caSecretRef": {"name": "up-ca"},
                }}),
                "10.96.0.20",
                hash,
            ),
        ),
        (
            "direct-ca-only",
            values(
                &[],
                json!({"mode": "Direct", "replicas": 4, "upstream": {
                    "url": "https://[fd00::1]:5000", "caSecretRef": {"name": "up-ca"},
                }}),
                "fd00:10:96::14",
                hash,
            ),
        ),
        (
            "unmanaged",
            values(&[], json!({"mode": "Unmanaged"}), "10.96.0.20", hash),
        ),
    ]
}

#[test]
fn dump_registry_values_and_objects() {
    let dir = std::env::var_os("CHART_CHECK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("chart-check"));
    for (name, values) in cases() {
        let objects = registry_objects(&values);
        for object in &objects {
            // The node agent's ClusterRole and its binding are cluster-scoped.
            if object["kind"] == "ClusterRole" || object["kind"] == "ClusterRoleBinding" {
                assert!(object["metadata"].get("namespace").is_none(), "{object}");
                continue;
            }
            assert_eq!(
                object["metadata"]["namespace"], "registry-system",
                "{object}"
            );
        }
        let case = dir.join(name);
        std::fs::create_dir_all(&case).expect("create output directory");
        let yaml = serde_yaml::to_string(&values).expect("values as YAML");
        // What the HelmChartProxy carries must read back as the same values.
        let back: RegistryValues = serde_yaml::from_str(&yaml).expect("values read back");
        assert_eq!(back, values);
        std::fs::write(case.join("values.yaml"), yaml).expect("write values.yaml");
        let json = serde_json::to_string_pretty(&objects).expect("objects as JSON");
        std::fs::write(case.join("objects.json"), json).expect("write objects.json");
    }
}
