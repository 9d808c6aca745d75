//! The controller's Prometheus metrics, registered with `serve`'s registry.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::SystemTime;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::controller::ClusterKey;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `success` or `error`.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReadyLabels {
    /// The `Ready` condition's status: `True`, `False` or `Unknown`.
    pub ready: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub namespace: String,
    pub cluster: String,
}

pub struct ControllerMetrics {
    reconciles: Family<ResultLabels, Counter>,
    duration: Histogram,
    clusters: Family<ReadyLabels, Gauge>,
    certificate_expiry: Family<ClusterLabels, Gauge<f64, AtomicU64>>,
    /// Each cluster's last `Ready` status, from which the `clusters` gauge is counted.
    ready: Mutex<HashMap<ClusterKey, String>>,
}

impl ControllerMetrics {
    /// Creates the metrics and registers them (the registry's prefix is `registry_addon`).
    pub fn register(registry: &mut Registry) -> ControllerMetrics {
        let reconciles = Family::<ResultLabels, Counter>::default();
        registry.register(
            "reconcile",
            "Cluster reconciles by the controller, by result (success, error)",
            reconciles.clone(),
        );
        let duration = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ]);
        registry.register(
            "reconcile_duration_seconds",
            "Time to reconcile one cluster",
            duration.clone(),
        );
        let clusters = Family::<ReadyLabels, Gauge>::default();
        registry.register(
            "clusters",
            "Clusters with the addon on, by the status of their ClusterRegistry's Ready condition",
            clusters.clone(),
        );
        let certificate_expiry = Family::<ClusterLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When each cluster's registry certificate expires (Unix time); alert on it minus time()",
            certificate_expiry.clone(),
        );
        for ready in ["True", "False", "Unknown"] {
            let _ = clusters.get_or_create(&ReadyLabels {
                ready: ready.into(),
            });
        }
        ControllerMetrics {
            reconciles,
            duration,
            clusters,
            certificate_expiry,
            ready: Mutex::new(HashMap::new()),
        }
    }

    /// Metrics registered nowhere (tests, benchmarks).
    pub fn unregistered() -> ControllerMetrics {
        ControllerMetrics::register(&mut Registry::default())
    }

    pub fn observe_reconcile(&self, ok: bool, seconds: f64) {
        let result = if ok { "success" } else { "error" };
        self.reconciles
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc();
        self.duration.observe(seconds);
    }

    pub fn reconciles(&self, ok: bool) -> u64 {
        let result = if ok { "success" } else { "error" };
        self.reconciles
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .get()
    }

    /// Records what a cluster's ClusterRegistry shows; `None`: it has none (addon off).
    pub fn set_cluster(
        &self,
        key: &ClusterKey,
        ready: Option<&str>,
        certificate_not_after: Option<SystemTime>,
    ) {
        let labels = ClusterLabels {
            namespace: key.namespace.clone(),
            cluster: key.name.clone(),
        };
        match certificate_not_after {
            Some(at) => {
                let seconds = at
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0);
                self.certificate_expiry.get_or_create(&labels).set(seconds);
            }
            None => {
                self.certificate_expiry.remove(&labels);
            }
        }
        let mut by_cluster = self.ready.lock().unwrap_or_else(|e| e.into_inner());
        match ready {
            Some(ready) => {
                by_cluster.insert(key.clone(), ready.to_string());
            }
            None => {
                by_cluster.remove(key);
            }
        }
        let mut counts: HashMap<&str, i64> = [("True", 0), ("False", 0), ("Unknown", 0)]
            .into_iter()
            .collect();
        for ready in by_cluster.values() {
            *counts.entry(ready.as_str()).or_insert(0) += 1;
        }
        for (ready, count) in counts {
            self.clusters
                .get_or_create(&ReadyLabels {
                    ready: ready.to_string(),
                })
                .set(count);
        }
    }

    /// A Cluster is gone: its series go too.
    pub fn forget_cluster(&self, key: &ClusterKey) {
        self.set_cluster(key, None, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn cluster_series_follow_the_clusters() {
        let mut registry = Registry::with_prefix("registry_addon");
        let metrics = ControllerMetrics::register(&mut registry);
        let a = ClusterKey::new("ns", "a");
        let b = ClusterKey::new("ns", "b");
        let expiry = SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000);
        metrics.set_cluster(&a, Some("True"), Some(expiry));
        metrics.set_cluster(&b, Some("False"), None);
        metrics.observe_reconcile(true, 0.02);
        metrics.observe_reconcile(false, 0.5);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("registry_addon_reconcile_total{result=\"success\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("registry_addon_reconcile_total{result=\"error\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("registry_addon_reconcile_duration_seconds_count 2"),
            "{text}"
        );
        assert!(
            text.contains("registry_addon_clusters{ready=\"True\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("registry_addon_clusters{ready=\"False\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("registry_addon_certificate_expiry_timestamp_seconds{namespace=\"ns\",cluster=\"a\"} 1900000000"),
            "{text}"
        );
        metrics.forget_cluster(&a);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("registry_addon_clusters{ready=\"True\"} 0"),
            "{text}"
        );
        assert!(!text.contains("cluster=\"a\""), "{text}");
    }
}
