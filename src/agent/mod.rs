//! `registry-addon node-agent`: keeps a node's containerd mirror configuration equal to the
//! cluster's desired config (the Secret `registry-system/registry-node-config`), acks the
//! applied hash on the Node (annotation `registry-addon.io/node-config`), and reports whether
//! the node reaches the mirror (Node condition `RegistryMirrorReady`).
//!
//! One loop: the Secret's watch applies a new config at once; every `--probe-interval` the
//! owned files are compared with the last applied config (and rewritten when they differ) and
//! the mirror is probed. The Node's annotation and conditions are written only when they
//! differ from the Node as last seen, so a steady node costs no API writes. Without the API
//! server the loop goes on from the last applied config.

pub mod desired;
pub mod files;
pub mod node;
pub mod probe;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Secret};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::hooks::patches::containerd::NodeConfig;
use crate::names;
use node::{Condition, NodeWriter};

#[derive(Debug, Clone, Args)]
pub struct NodeAgentArgs {
    /// containerd's hosts directory; nothing is written outside it.
    #[arg(long, default_value = names::CONTAINERD_CERTS_DIR)]
    pub certs_dir: PathBuf,
    /// Where containerd itself reads that directory: the prefix of the `ca` paths in the hosts
    /// files. Default: `--certs-dir`; set it when the agent mounts the host's directory at
    /// another path.
    #[arg(long)]
    pub containerd_certs_dir: Option<String>,
    /// This node's name.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Kubeconfig of the workload cluster; default: in-cluster, or `$KUBECONFIG`.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// How often the owned files are checked and the mirror probed (Go duration).
    #[arg(long, default_value = "1m", value_parser = parse_interval)]
    pub probe_interval: Duration,
    /// Namespace of the desired-config Secret.
    #[arg(long, default_value = names::REGISTRY_NAMESPACE)]
    pub namespace: String,
    /// Address of the plain-HTTP server for /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:9445")]
    pub metrics_listen: SocketAddr,
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = crate::duration::parse_go_duration(s)?;
    if d < Duration::from_millis(100) {
        return Err(format!("{s}: the probe interval must be at least 100ms"));
    }
    Ok(d)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

struct AgentMetrics {
    registry: Registry,
    mirror_ready: Family<ReasonLabels, Gauge>,
    applied: Counter,
    repaired: Counter,
    refused: Counter,
}

impl AgentMetrics {
    fn new() -> AgentMetrics {
        let mut registry = Registry::with_prefix("registry_addon_node_agent");
        let mirror_ready = Family::<ReasonLabels, Gauge>::default();
        registry.register(
            "mirror_ready",
            "1 for the reason of the last mirror probe (MirrorReachable when the node reaches the mirror), 0 for the others",
            mirror_ready.clone(),
        );
        let applied = Counter::default();
        registry.register(
            "configs_applied",
            "Desired configs applied",
            applied.clone(),
        );
        let repaired = Counter::default();
        registry.register(
            "files_repaired",
            "Owned files rewritten because they differed on disk",
            repaired.clone(),
        );
        let refused = Counter::default();
        registry.register(
            "configs_refused",
            "Desired-config Secrets refused as malformed",
            refused.clone(),
        );
        AgentMetrics {
            registry,
            mirror_ready,
            applied,
            repaired,
            refused,
        }
    }

    fn probed(&self, reason: &str) {
        for r in probe::REASONS {
            self.mirror_ready
                .get_or_create(&ReasonLabels { reason: r.into() })
                .set(i64::from(r == reason));
        }
    }

    fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

async fn client(args: &NodeAgentArgs) -> anyhow::Result<kube::Client> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no kubeconfig: neither in-cluster nor $KUBECONFIG")?,
    };
    kube::Client::try_from(config).context("Kubernetes client")
}

/// Runs the agent until SIGTERM or Ctrl-C.
pub async fn run(args: NodeAgentArgs) -> anyhow::Result<()> {
    if args.node_name.is_empty() {
        anyhow::bail!("--node-name (or $NODE_NAME) is empty");
    }
    let certs_dir = args.certs_dir.clone();
    // The `ca` paths in the hosts files are containerd's.
    let containerd_certs_dir = match &args.containerd_certs_dir {
        Some(dir) if !dir.starts_with('/') => {
            anyhow::bail!("--containerd-certs-dir {dir:?} must be an absolute path")
        }
        Some(dir) => dir.trim_end_matches('/').to_string(),
        None => certs_dir
            .to_str()
            .with_context(|| format!("--certs-dir {} is not UTF-8", certs_dir.display()))?
            .to_string(),
    };
    let client = client(&args).await?;
    let metrics = Arc::new(AgentMetrics::new());
    let listener = crate::metrics::bind(args.metrics_listen).await?;
    let ready = Arc::new(AtomicBool::new(true));
    {
        let metrics = metrics.clone();
        tokio::spawn(crate::metrics::serve_probes(
            listener,
            Arc::new(move || metrics.encode()),
            ready,
        ));
    }
    tracing::info!(
        node = %args.node_name,
        certs_dir = %certs_dir.display(),
        metrics = %args.metrics_listen,
        "node agent started"
    );

    let secret_name = names::NODE_CONFIG_SECRET;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &args.namespace);
    let mut secret_events = watcher::watcher(
        secrets,
        watcher::Config::default().fields(&format!("metadata.name={secret_name}")),
    )
    .default_backoff()
    .boxed();
    let nodes: Api<Node> = Api::all(client.clone());
    let mut node_events = watcher::watcher(
        nodes,
        watcher::Config::default().fields(&format!("metadata.name={}", args.node_name)),
    )
    .default_backoff()
    .boxed();

    let files = files::CertsDir::new(certs_dir.clone());
    let mut writer = NodeWriter::new(client, &args.node_name, &args.namespace);
    // A restart with the API server down still repairs the files, from the last record.
    let mut applied: Option<NodeConfig> = files.load_applied();
    if let Some(config) = &applied {
        tracing::info!(hash = %config.hash, "resuming from the last applied config");
    }
    let mut refused_version: Option<String> = None;
    let mut tick = tokio::time::interval(args.probe_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (probe_tx, mut probe_rx) = tokio::sync::mpsc::channel::<probe::ProbeResult>(1);
    let mut probing = false;
    let probe_timeout = args
        .probe_interval
        .clamp(Duration::from_secs(1), Duration::from_secs(10));
    let mut terminate = terminate_signal();

    loop {
        tokio::select! {
            event = secret_events.next() => {
                let secret = match event {
                    Some(Ok(Event::Apply(s) | Event::InitApply(s))) if s.name_any() == secret_name => s,
                    Some(Ok(Event::Delete(s))) if s.name_any() == secret_name => {
                        tracing::warn!(secret = %format!("{}/{secret_name}", args.namespace), "desired config deleted: keeping the files as last applied");
                        continue;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "watch of the desired config failed; keeping the last applied config");
                        continue;
                    }
                    None => anyhow::bail!("watch of the desired config ended"),
                };
                let qualified = format!("{}/{secret_name}", args.namespace);
                let data = secret.data.clone().unwrap_or_default();
                match desired::parse(&qualified, &data, &containerd_certs_dir) {
                    Ok(config) => {
                        refused_version = None;
                        if applied.as_ref().is_some_and(|a| a.hash == config.hash) {
                            continue;
                        }
                        match files.apply(&config) {
                            Ok(outcome) => {
                                tracing::info!(hash = %config.hash, phase = config.phase.as_str(), written = ?outcome.written, removed = ?outcome.removed, "desired config applied");
                                metrics.applied.inc();
                                if let Err(e) = files.save_applied(&config) {
                                    tracing::warn!(error = %e, "cannot record the applied config; a restart without the API server will not repair the files");
                                }
                                applied = Some(config);
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "cannot write the desired config");
                                writer.condition(Condition::config(false, "WriteFailed", format!("cannot write into {}: {e}", certs_dir.display()))).await;
                                continue;
                            }
                        }
                        if let Some(config) = &applied {
                            writer.condition(Condition::config(true, "Applied", format!("config {} ({}) is on disk", config.hash, config.phase.as_str()))).await;
                            writer.annotation(&config.hash).await;
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "desired config refused; files on disk unchanged");
                        let version = secret.resource_version();
                        if refused_version != version {
                            refused_version = version;
                            metrics.refused.inc();
                            writer.event(&secret, &e.to_string()).await;
                        }
                        writer.condition(Condition::config(false, "InvalidDesiredConfig", format!("{e}; the files on disk are left as they are"))).await;
                    }
                }
            }
            event = node_events.next() => {
                match event {
                    Some(Ok(Event::Apply(n) | Event::InitApply(n))) if n.name_any() == args.node_name => {
                        writer.seen(n);
                        // A Node seen for the first time (or its annotation removed) gets the ack now.
                        if let Some(config) = &applied {
                            writer.annotation(&config.hash).await;
                        }
                        writer.flush().await;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => tracing::warn!(error = %e, "watch of the Node failed"),
                    None => anyhow::bail!("watch of the Node ended"),
                }
            }
            _ = tick.tick() => {
                if let Some(config) = &applied {
                    match files.apply(config) {
                        Ok(outcome) if !outcome.written.is_empty() => {
                            tracing::warn!(files = ?outcome.written, "owned files differed on disk: rewritten");
                            metrics.repaired.inc_by(outcome.written.len() as u64);
                        }
                        Ok(_) => {}
                        Err(e) => tracing::error!(error = %e, "cannot repair the owned files"),
                    }
                }
                writer.flush().await;
                if !probing {
                    probing = true;
                    let tx = probe_tx.clone();
                    let dir = certs_dir.clone();
                    tokio::spawn(async move {
                        let _ = tx.send(probe::probe(&dir, probe_timeout).await).await;
                    });
                }
            }
            Some(result) = probe_rx.recv() => {
                probing = false;
                metrics.probed(result.reason);
                writer.condition(Condition::mirror(&result)).await;
            }
            _ = &mut terminate => {
                tracing::info!("node agent stopping");
                return Ok(());
            }
        }
    }
}

fn terminate_signal() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(async {
        #[cfg(unix)]
        {
            if let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                return;
            }
        }
        let _ = tokio::signal::ctrl_c().await;
    })
}
