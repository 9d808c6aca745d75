//! The replica syncer (`registry-addon sync`), SPEC §8: keeps the local registry a superset
//! of its peers.
//!
//! Peers come from `--peer` flags, or, in the StatefulSet sidecar, from the pod's own name
//! (`POD_NAME`, ordinal after the last `-`), the replica count (`REGISTRY_REPLICAS`), the
//! headless Service and the namespace (`POD_NAMESPACE`): every other ordinal at
//! `https://<statefulset>-<i>.<headless>.<namespace>.svc:5000`.
//!
//! Credentials: `--credentials-file` (a `user:password` line, or JSON — see
//! [`config::CredentialSet::parse`]), else `REGISTRY_USERNAME` and `REGISTRY_PASSWORD`.
//!
//! A tag that differs between replicas is settled from the digest both last agreed on, or by
//! a tie-break every replica makes alike (see [`round`]); `--state-file` keeps that memory
//! across restarts ([`state`]).
//!
//! With `--notify-listen`, the local registry's push notifications make the sidecar copy
//! each tag pushed here to every peer at once ([`notify`]); the rounds stay the safety net.

pub mod config;
pub mod metrics;
pub mod notify;
pub mod round;
pub mod state;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;

use crate::names;
use crate::oci::{ClientOptions, Credentials, Registry, build_http_clients_with_agent};
pub use config::{CredentialSet, StatefulSetPeers};
pub use metrics::SyncMetrics;
pub use notify::{Notifier, SYNC_USER_AGENT};
pub use round::{PeerReport, PushOutcome, PushReport, RoundReport, Syncer, peer_wins};
pub use state::Agreements;

/// Command-line of `registry-addon sync`.
#[derive(Debug, Clone, Args)]
pub struct SyncArgs {
    /// The registry this replica serves.
    #[arg(long, default_value = "https://127.0.0.1:5000")]
    pub local: String,
    /// A peer registry to copy from (repeatable).
    #[arg(long = "peer")]
    pub peers: Vec<String>,
    /// Derive the peers from the StatefulSet this pod belongs to (see --pod-name,
    /// --replicas, --headless-service, --namespace), skipping this pod.
    #[arg(long)]
    pub statefulset_peers: bool,
    /// This pod's name, `<statefulset>-<ordinal>`.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// Number of StatefulSet replicas.
    #[arg(long, env = "REGISTRY_REPLICAS")]
    pub replicas: Option<u32>,
    /// Headless Service giving each replica a DNS name.
    #[arg(long, default_value = names::REGISTRY_HEADLESS_SERVICE)]
    pub headless_service: String,
    /// Namespace of the StatefulSet.
    #[arg(long, env = "POD_NAMESPACE", default_value = names::REGISTRY_NAMESPACE)]
    pub namespace: String,
    /// Port of the peers derived from the StatefulSet.
    #[arg(long, default_value_t = names::REGISTRY_PORT)]
    pub peer_port: u16,
    /// Scheme of the peers derived from the StatefulSet.
    #[arg(long, default_value = "https", value_parser = ["https", "http"])]
    pub peer_scheme: String,
    /// CA bundle (PEM) trusted for the local registry and the peers; the system roots
    /// otherwise.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Registry credentials: a `user:password` line, `{"username":…,"password":…}`, or a
    /// Docker config (`{"auths":{"host:port":{"auth":"base64(user:password)"}}}`).
    /// Without it, `REGISTRY_USERNAME` and `REGISTRY_PASSWORD` are used when set.
    #[arg(long, env = "REGISTRY_CREDENTIALS_FILE")]
    pub credentials_file: Option<PathBuf>,
    /// Run one round and exit: status 1 when any peer failed.
    #[arg(long)]
    pub once: bool,
    /// Time between the end of a round and the start of the next (Go duration).
    #[arg(long, default_value = names::DEFAULT_SYNC_INTERVAL, value_parser = parse_duration, conflicts_with = "once")]
    pub interval: Duration,
    /// Concurrent metadata requests, and separately concurrent blob transfers, per registry.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub concurrency: u16,
    /// Serve Prometheus metrics on this address at /metrics.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Tries per request (and per blob transfer) on transient failures.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub attempts: u32,
    /// First retry delay, doubled on each further retry (Go duration).
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pub retry_backoff: Duration,
    /// Upload blobs in PATCH chunks instead of one PUT (for registries that need it; chosen
    /// automatically when a registry refuses a monolithic upload).
    #[arg(long)]
    pub chunked_uploads: bool,
    /// Remember here, across restarts, the digest each peer and this registry last agreed on
    /// per tag, so that an image pushed to this replica just before a restart is not reverted
    /// to a peer's older one. Without it the memory lasts as long as the process.
    #[arg(long)]
    pub state_file: Option<PathBuf>,
    /// Accept the local registry's push notifications on this address (`POST /events`, CNCF
    /// Distribution's `notifications.endpoints`) and push each tag pushed here out to every
    /// peer at once, instead of waiting for the peers' rounds. Requests must carry
    /// `Authorization: Bearer <token>`.
    #[arg(long, conflicts_with = "once")]
    pub notify_listen: Option<SocketAddr>,
    /// File holding the notification token; without it, `REGISTRY_NOTIFY_TOKEN`.
    #[arg(long, env = "REGISTRY_NOTIFY_TOKEN_FILE", requires = "notify_listen")]
    pub notify_token_file: Option<PathBuf>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::duration::parse_go_duration(s)
}

impl SyncArgs {
    /// The peers to sync from: explicit ones, plus the StatefulSet's when asked for.
    pub fn peer_urls(&self) -> anyhow::Result<Vec<String>> {
        let mut peers = self.peers.clone();
        if self.statefulset_peers {
            let sts = StatefulSetPeers {
                pod_name: self
                    .pod_name
                    .clone()
                    .context("--statefulset-peers needs --pod-name or POD_NAME")?,
                replicas: self
                    .replicas
                    .context("--statefulset-peers needs --replicas or REGISTRY_REPLICAS")?,
                headless_service: self.headless_service.clone(),
                namespace: self.namespace.clone(),
                scheme: self.peer_scheme.clone(),
                port: self.peer_port,
            };
            peers.extend(sts.peer_urls().map_err(anyhow::Error::msg)?);
        }
        let local = self.local.trim_end_matches('/');
        peers.retain(|p| p.trim_end_matches('/') != local);
        peers.dedup();
        Ok(peers)
    }

    fn credentials(&self) -> anyhow::Result<CredentialSet> {
        if let Some(path) = &self.credentials_file {
            return CredentialSet::from_file(path).map_err(anyhow::Error::msg);
        }
        let user = std::env::var("REGISTRY_USERNAME")
            .ok()
            .filter(|u| !u.is_empty());
        let password = std::env::var("REGISTRY_PASSWORD").ok();
        Ok(match (user, password) {
            (Some(username), Some(password)) => CredentialSet {
                all: Some(Credentials { username, password }),
                ..CredentialSet::default()
            },
            (Some(_), None) => bail!("REGISTRY_USERNAME is set but REGISTRY_PASSWORD is not"),
            _ => CredentialSet::default(),
        })
    }

    /// Builds the syncer: one client per registry, sharing the HTTP connection pool.
    pub fn build(&self) -> anyhow::Result<Syncer> {
        let peers = self.peer_urls()?;
        let ca = match &self.ca_file {
            Some(path) => {
                Some(std::fs::read(path).with_context(|| format!("CA file {}", path.display()))?)
            }
            None => None,
        };
        // A User-Agent of its own: the registries' push notifications tell the syncer's
        // pushes from those of people and other tools by it (see [`notify`]).
        let http = build_http_clients_with_agent(ca.as_deref(), SYNC_USER_AGENT)
            .map_err(anyhow::Error::msg)?;
        let credentials = self.credentials()?;
        let base = ClientOptions {
            concurrency: usize::from(self.concurrency),
            credentials: None,
            attempts: self.attempts,
            backoff: self.retry_backoff,
            chunked_uploads: self.chunked_uploads,
            ..ClientOptions::default()
        };
        let registry = |url: &str| -> anyhow::Result<Arc<Registry>> {
            let probe = Registry::new(url, http.clone(), &base).map_err(anyhow::Error::msg)?;
            let options = ClientOptions {
                credentials: credentials.for_host(&probe.host()),
                ..base.clone()
            };
            Ok(Arc::new(
                Registry::new(url, http.clone(), &options).map_err(anyhow::Error::msg)?,
            ))
        };
        let local = registry(&self.local)?;
        let peers = peers
            .iter()
            .map(|p| registry(p))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let syncer = Syncer::new(
            local,
            peers,
            usize::from(self.concurrency),
            self.attempts,
            self.retry_backoff,
        )
        .with_round_interval(self.interval);
        Ok(match &self.state_file {
            Some(path) => syncer.with_state_file(path),
            None => syncer,
        })
    }
}

/// Logs one structured line summing up a round, and a line per failure.
pub fn log_round(report: &RoundReport) {
    if let Some(error) = &report.local_error {
        tracing::warn!(error = %error, "the local registry does not answer; round skipped");
    }
    for peer in &report.peers {
        for error in &peer.errors {
            tracing::warn!(peer = %peer.name, error = %error, "sync error");
        }
    }
    tracing::info!(
        peers = report.peers.len(),
        failed_peers = ?report.failed_peers(),
        repositories = report.repositories,
        tags = report.tags,
        tags_copied = report.tags_copied,
        manifests_copied = report.manifests_copied,
        blobs_copied = report.blobs_copied,
        blobs_mounted = report.blobs_mounted,
        bytes_copied = report.bytes_copied,
        blob_gets = report.blob_gets,
        tag_lists = report.tag_lists,
        peer_manifest_heads = report.peer_manifest_heads,
        local_manifest_heads = report.local_manifest_heads,
        errors = report.error_count(),
        duration_ms = report.duration.as_millis() as u64,
        "sync round finished"
    );
}

const FIRST_RETRY_DELAY: Duration = Duration::from_secs(5);

pub async fn run(args: SyncArgs) -> anyhow::Result<()> {
    // Checked before anything starts: a misconfigured token is an error, not a silent
    // fallback to rounds only.
    let notify_token = match args.notify_listen {
        Some(_) => Some(
            notify::read_token(args.notify_token_file.as_deref()).map_err(anyhow::Error::msg)?,
        ),
        None => None,
    };
    let syncer = Arc::new(args.build()?);
    if syncer.peers().is_empty() {
        tracing::warn!("no peers to sync from");
    }
    let metrics = Arc::new(SyncMetrics::new());
    metrics.register_peers(syncer.peers().iter().map(|p| p.name()));
    if let Some(addr) = args.metrics_listen {
        metrics::serve(addr, metrics.clone())
            .await
            .with_context(|| format!("metrics listener on {addr}"))?;
    }
    if let (Some(addr), Some(token)) = (args.notify_listen, notify_token) {
        Notifier::start(
            syncer.clone(),
            metrics.clone(),
            addr,
            token,
            usize::from(args.concurrency),
        )
        .await
        .with_context(|| format!("notification listener on {addr}"))?;
    }
    tracing::info!(
        local = syncer.local().name(),
        peers = ?syncer.peers().iter().map(|p| p.name()).collect::<Vec<_>>(),
        state_file = syncer.agreements().path().map(|p| p.display().to_string()),
        agreed_tags = syncer.agreements().len(),
        "syncing"
    );
    // After a failed round the next comes sooner, backing off up to the interval: a peer
    // or local registry that was starting up is caught up without waiting a whole period.
    let mut retry_delay = FIRST_RETRY_DELAY;
    loop {
        let report = syncer.round().await;
        metrics.record(&report);
        log_round(&report);
        if args.once {
            if report.is_success() {
                return Ok(());
            }
            if let Some(error) = report.local_error {
                bail!("sync round failed: {error}");
            }
            bail!(
                "sync round failed for {} of {} peers: {}",
                report.failed_peers().len(),
                report.peers.len(),
                report.failed_peers().join(", ")
            );
        }
        let delay = if report.is_success() {
            retry_delay = FIRST_RETRY_DELAY;
            args.interval
        } else {
            let delay = retry_delay.min(args.interval);
            retry_delay = retry_delay.saturating_mul(2);
            delay
        };
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sync: SyncArgs,
    }

    fn parse(args: &[&str]) -> Result<SyncArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("sync").chain(args.iter().copied())).map(|c| c.sync)
    }

    #[test]
    fn statefulset_sidecar_form() {
        let args = parse(&[
            "--statefulset-peers",
            "--pod-name",
            "registry-1",
            "--replicas",
            "3",
            "--namespace",
            "registry-system",
            "--interval",
            "1m30s",
        ])
        .unwrap();
        assert_eq!(args.interval, Duration::from_secs(90));
        assert_eq!(
            args.peer_urls().unwrap(),
            vec![
                "https://registry-0.registry-headless.registry-system.svc:5000",
                "https://registry-2.registry-headless.registry-system.svc:5000",
            ]
        );
        let missing = parse(&["--statefulset-peers", "--replicas", "3"]).unwrap();
        if missing.pod_name.is_none() {
            assert!(missing.peer_urls().is_err());
        }
    }

    #[test]
    fn explicit_peers_and_flags() {
        let args = parse(&[
            "--local",
            "https://127.0.0.1:5000/",
            "--peer",
            "https://a:5000",
            "--peer",
            "https://127.0.0.1:5000",
            "--once",
            "--concurrency",
            "3",
            "--state-file",
            "/var/lib/registry-addon-sync/agreed.json",
        ])
        .unwrap();
        assert!(args.once);
        assert_eq!(
            args.state_file.as_deref(),
            Some(std::path::Path::new(
                "/var/lib/registry-addon-sync/agreed.json"
            ))
        );
        assert_eq!(args.concurrency, 3);
        assert_eq!(args.interval, Duration::from_secs(120));
        // The local registry is never its own peer.
        assert_eq!(args.peer_urls().unwrap(), vec!["https://a:5000"]);
        assert!(parse(&["--once", "--interval", "2m"]).is_err());
        assert!(parse(&["--interval", "2 minutes"]).is_err());
        assert!(parse(&["--concurrency", "0"]).is_err());
        let notify = parse(&["--notify-listen", "127.0.0.1:5002"]).unwrap();
        assert_eq!(
            notify.notify_listen,
            Some("127.0.0.1:5002".parse().unwrap())
        );
        assert!(parse(&["--once", "--notify-listen", "127.0.0.1:5002"]).is_err());
        assert!(parse(&["--notify-listen", "localhost"]).is_err());
    }
}
