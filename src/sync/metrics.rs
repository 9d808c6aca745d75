//! Prometheus metrics of the syncer and the small HTTP server that exposes them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::round::RoundReport;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    pub peer: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerOutcomeLabel {
    pub peer: String,
    pub outcome: String,
}

pub struct SyncMetrics {
    registry: Registry,
    notify_events: Family<OutcomeLabel, Counter>,
    notified: Family<PeerOutcomeLabel, Counter>,
    notified_errors: Family<PeerLabel, Counter>,
    checks: Family<PeerOutcomeLabel, Counter>,
    notified_bytes: Counter,
    notified_duration: Histogram,
    rounds: Counter,
    bytes: Counter,
    blobs: Counter,
    blobs_mounted: Counter,
    manifests: Counter,
    errors: Family<PeerLabel, Counter>,
    local_errors: Counter,
    peer_up: Family<PeerLabel, Gauge>,
    round_duration: Histogram,
    last_success: Gauge<f64, AtomicU64>,
    last_round: Gauge<f64, AtomicU64>,
}

impl Default for SyncMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl SyncMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("registry_sync");
        let m = SyncMetrics {
            rounds: Counter::default(),
            bytes: Counter::default(),
            blobs: Counter::default(),
            blobs_mounted: Counter::default(),
            manifests: Counter::default(),
            errors: Family::default(),
            local_errors: Counter::default(),
            peer_up: Family::default(),
            round_duration: Histogram::new(exponential_buckets(0.05, 2.0, 16)),
            last_success: Gauge::default(),
            last_round: Gauge::default(),
            notify_events: Family::default(),
            notified: Family::default(),
            notified_errors: Family::default(),
            checks: Family::default(),
            notified_bytes: Counter::default(),
            notified_duration: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            registry: Registry::default(),
        };
        registry.register("rounds", "Sync rounds run", m.rounds.clone());
        registry.register(
            "copied_bytes",
            "Blob bytes copied from peers into the local registry",
            m.bytes.clone(),
        );
        registry.register(
            "copied_blobs",
            "Blobs uploaded to the local registry",
            m.blobs.clone(),
        );
        registry.register(
            "mounted_blobs",
            "Blobs mounted from another repository of the local registry",
            m.blobs_mounted.clone(),
        );
        registry.register(
            "copied_manifests",
            "Manifests pushed to the local registry",
            m.manifests.clone(),
        );
        registry.register(
            "errors",
            "Failures while syncing from a peer (after retries)",
            m.errors.clone(),
        );
        registry.register(
            "local_errors",
            "Rounds that could not start because the local registry did not answer",
            m.local_errors.clone(),
        );
        registry.register(
            "peer_up",
            "1 when the last round synced the peer without error",
            m.peer_up.clone(),
        );
        registry.register(
            "round_duration_seconds",
            "Duration of sync rounds",
            m.round_duration.clone(),
        );
        registry.register(
            "last_success_timestamp_seconds",
            "Unix time at which the last round without any error finished",
            m.last_success.clone(),
        );
        registry.register(
            "last_round_timestamp_seconds",
            "Unix time at which the last round finished",
            m.last_round.clone(),
        );
        registry.register(
            "notify_events",
            "Push notification events received, by what was done with them (queued, own, ignored, dropped) and refused requests",
            m.notify_events.clone(),
        );
        registry.register(
            "notified_pushes",
            "Tags pushed out to a peer after a push notification, by outcome (copied, present, peer_kept)",
            m.notified.clone(),
        );
        registry.register(
            "notified_push_errors",
            "Tags that could not be pushed out to a peer after a push notification (after retries)",
            m.notified_errors.clone(),
        );
        registry.register(
            "notify_checks",
            "Peers HEADed after a peer's syncer pushed a tag here, by whether they held the same digest (agreed, differs, error)",
            m.checks.clone(),
        );
        registry.register(
            "notified_bytes",
            "Blob bytes copied to peers after push notifications",
            m.notified_bytes.clone(),
        );
        registry.register(
            "notified_push_duration_seconds",
            "Time from a push notification to its tag being on every peer that could take it",
            m.notified_duration.clone(),
        );
        SyncMetrics { registry, ..m }
    }

    /// Declares the peers up front so that their series exist before the first error.
    pub fn register_peers<'a>(&self, peers: impl IntoIterator<Item = &'a str>) {
        for peer in peers {
            let label = PeerLabel {
                peer: peer.to_string(),
            };
            let _ = self.errors.get_or_create(&label);
            let _ = self.notified_errors.get_or_create(&label);
            let _ = self.peer_up.get_or_create(&label);
        }
    }

    pub fn record(&self, report: &RoundReport) {
        self.rounds.inc();
        self.bytes.inc_by(report.bytes_copied);
        self.blobs.inc_by(report.blobs_copied);
        self.blobs_mounted.inc_by(report.blobs_mounted);
        self.manifests.inc_by(report.manifests_copied);
        if report.local_error.is_some() {
            self.local_errors.inc();
        }
        for peer in &report.peers {
            let label = PeerLabel {
                peer: peer.name.clone(),
            };
            self.errors
                .get_or_create(&label)
                .inc_by(peer.errors.len() as u64);
            self.peer_up
                .get_or_create(&label)
                .set(i64::from(peer.errors.is_empty()));
        }
        self.round_duration.observe(report.duration.as_secs_f64());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        self.last_round.set(now);
        if report.is_success() {
            self.last_success.set(now);
        }
    }

    /// A push notification event (or a refused request), by outcome.
    pub fn notify_event(&self, outcome: &str) {
        self.notify_events
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// A tag pushed out to a peer after a notification.
    pub fn notified(&self, peer: &str, report: &super::round::PushReport) {
        self.notified
            .get_or_create(&PeerOutcomeLabel {
                peer: peer.to_string(),
                outcome: report.outcome.as_str().to_string(),
            })
            .inc();
        self.notified_bytes.inc_by(report.bytes_copied);
    }

    /// A peer checked after a peer's syncer pushed a tag here.
    pub fn checked(&self, peer: &str, outcome: &str) {
        self.checks
            .get_or_create(&PeerOutcomeLabel {
                peer: peer.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub fn notified_error(&self, peer: &str) {
        self.notified_errors
            .get_or_create(&PeerLabel {
                peer: peer.to_string(),
            })
            .inc();
    }

    pub fn notified_duration(&self, seconds: f64) {
        self.notified_duration.observe(seconds);
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` over plain HTTP until the process ends.
pub async fn serve(addr: SocketAddr, metrics: Arc<SyncMetrics>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving sync metrics");
    tokio::spawn(crate::metrics::serve_probes(
        listener,
        Arc::new(move || metrics.encode()),
        Arc::new(std::sync::atomic::AtomicBool::new(true)),
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::round::PeerReport;

    #[test]
    fn records_rounds_per_peer() {
        let m = SyncMetrics::new();
        m.register_peers(["https://a:5000", "https://b:5000"]);
        let report = RoundReport {
            peers: vec![
                PeerReport {
                    name: "https://a:5000".into(),
                    errors: vec!["x".into(), "y".into()],
                    ..PeerReport::default()
                },
                PeerReport {
                    name: "https://b:5000".into(),
                    ..PeerReport::default()
                },
            ],
            bytes_copied: 42,
            blobs_copied: 2,
            ..RoundReport::default()
        };
        m.record(&report);
        let text = m.encode();
        for line in [
            "registry_sync_rounds_total 1",
            "registry_sync_copied_bytes_total 42",
            "registry_sync_copied_blobs_total 2",
            "registry_sync_errors_total{peer=\"https://a:5000\"} 2",
            "registry_sync_errors_total{peer=\"https://b:5000\"} 0",
            "registry_sync_peer_up{peer=\"https://a:5000\"} 0",
            "registry_sync_peer_up{peer=\"https://b:5000\"} 1",
            "registry_sync_round_duration_seconds_count 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        // A failed round does not move the last-success time.
        assert!(
            text.contains("registry_sync_last_success_timestamp_seconds 0"),
            "{text}"
        );
    }
}
