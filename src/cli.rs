//! The command line: `registry-addon serve | sync | front | render | mirror | node-agent | wait`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::names;
use crate::wire::runtime::Hook;

#[derive(Debug, Parser)]
#[command(
    name = "registry-addon",
    version,
    about = "Cluster API runtime extension: an in-cluster OCI registry mirror per workload cluster"
)]
pub struct Cli {
    /// Log format: `text` or `json`. Verbosity comes from `RUST_LOG` (default `info`).
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the Runtime SDK hooks over HTTPS, with metrics and probes on a plain-HTTP port.
    Serve(ServeArgs),
    /// Keep the local registry a superset of its peer replicas.
    Sync(crate::sync::SyncArgs),
    /// The authorizing TLS front of a registry replica: Basic users, pull-only or push.
    Front(crate::front::FrontArgs),
    /// Print every object the hooks would create for a Cluster manifest, offline.
    Render(RenderArgs),
    /// Copy images into an OCI layout or archive (`pull`) and from there into a mirror (`push`).
    Mirror(crate::mirror::MirrorArgs),
    /// On a workload node: keep containerd's mirror files current and report mirror health.
    NodeAgent(crate::agent::NodeAgentArgs),
    /// Wait until every address accepts TCP connections (a container's postStart hook, so the
    /// kubelet starts the pod's next container only then); fails after --timeout.
    Wait(WaitArgs),
}

#[derive(Debug, Clone, Args)]
pub struct WaitArgs {
    /// Address to wait for (repeatable).
    #[arg(long = "tcp", required = true)]
    pub addresses: Vec<SocketAddr>,
    /// How long to wait at most (Go duration).
    #[arg(long, default_value = "30s", value_parser = parse_timeout)]
    pub timeout: std::time::Duration,
}

/// `registry-addon wait`: returns once every address accepts a connection.
pub async fn wait(args: WaitArgs) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + args.timeout;
    for addr in &args.addresses {
        loop {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(_) => break,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    anyhow::bail!(
                        "{addr} did not accept a connection within {:?}: {e}",
                        args.timeout
                    )
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address of the HTTPS hook server.
    #[arg(long, default_value = "127.0.0.1:9443")]
    pub listen: SocketAddr,
    /// Address of the plain-HTTP server for /metrics, /healthz and /readyz.
    #[arg(long, default_value = "127.0.0.1:9440")]
    pub metrics_listen: SocketAddr,
    /// Serving certificate (PEM). Without it, a self-signed one is generated at start.
    #[arg(long, requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// Serving private key (PEM).
    #[arg(long, requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// Where the generated self-signed CA is written when no certificate is given.
    #[arg(long)]
    pub self_signed_ca_file: Option<PathBuf>,
    /// Namespace of the extension: holds the root CA Secret.
    #[arg(long, env = "POD_NAMESPACE", default_value = names::DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Hooks advertised by discovery (comma-separated). Default: every hook this addon implements.
    #[arg(long, value_delimiter = ',', value_parser = parse_hook)]
    pub hooks: Vec<Hook>,
    /// Run the day-2 controller (leader-elected): `--controller=false` leaves the hooks alone at work.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub controller: bool,
    /// Namespace whose Clusters the controller watches (repeatable); default: all namespaces.
    #[arg(long = "watch-namespace")]
    pub watch_namespaces: Vec<String>,
    /// How often the controller reconciles every cluster even when nothing changed (Go duration).
    #[arg(long, default_value = "10m", value_parser = parse_resync)]
    pub resync: std::time::Duration,
    #[command(flatten)]
    pub addon: AddonOptions,
}

/// Options shared by `serve` and `render`: how the registry is rendered and deployed.
#[derive(Debug, Clone, Args)]
pub struct AddonOptions {
    /// Topology variable holding `addons.registry`.
    #[arg(long, default_value = names::DEFAULT_VARIABLE_NAME)]
    pub variable_name: String,
    /// How the registry reaches the workload cluster; an ExtensionConfig setting `deployer` overrides it.
    #[arg(long, value_enum, default_value_t = Deployer::Helmchartproxy)]
    pub deployer: Deployer,
    /// Key algorithm of generated certificates.
    #[arg(long, value_enum, default_value_t = KeyAlgorithm::EcdsaP256)]
    pub key_algorithm: KeyAlgorithm,
    /// Renew the server certificate when less than this fraction of its lifetime remains.
    #[arg(long, default_value_t = 1.0 / 3.0, value_parser = parse_fraction)]
    pub renew_fraction: f64,
    /// Registry (CNCF Distribution) image.
    #[arg(long, default_value = names::DEFAULT_REGISTRY_IMAGE)]
    pub registry_image: String,
    /// Image of the `registry-addon sync` sidecar (this binary's image).
    #[arg(long, default_value = concat!("ghcr.io/registry-addon/registry-addon:", env!("CARGO_PKG_VERSION")))]
    pub sync_image: String,
    /// Chart repository of the registry chart for the HelmChartProxy (https:// or oci://).
    #[arg(long, default_value = "oci://ghcr.io/registry-addon/charts")]
    pub chart_repository: String,
    /// Chart name in that repository.
    #[arg(long, default_value = "registry")]
    pub chart_name: String,
    /// Chart version.
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
    pub chart_version: String,
    /// How long a NotReady node may hold back a two-phase node configuration change before it
    /// is skipped (Go duration); Ready nodes that have not applied it always hold it back.
    #[arg(long, default_value = "10m", value_parser = parse_rollout_timeout)]
    pub node_rollout_timeout: std::time::Duration,
}

fn parse_rollout_timeout(s: &str) -> Result<std::time::Duration, String> {
    crate::duration::parse_go_duration(s)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Deployer {
    /// A HelmChartProxy on the management cluster (Cluster API Add-on Provider for Helm).
    Helmchartproxy,
    /// Server-side apply of the rendered objects to the workload cluster.
    Direct,
}

impl std::str::FromStr for Deployer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        <Self as ValueEnum>::from_str(s, true)
            .map_err(|_| format!("unknown deployer {s:?}: expected helmchartproxy or direct"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeyAlgorithm {
    EcdsaP256,
    Rsa2048,
}

#[derive(Debug, Clone, Args)]
pub struct RenderArgs {
    /// Cluster manifest (YAML or JSON, v1beta1 or v1beta2); `-` for stdin.
    #[arg(short = 'f', long = "filename")]
    pub file: PathBuf,
    /// Directory with the root CA (`tls.crt` and `tls.key`, or `ca.crt`/`ca.key`); a throw-away CA otherwise.
    #[arg(long)]
    pub root_ca_dir: Option<PathBuf>,
    /// Include private keys in the output.
    #[arg(long)]
    pub show_secrets: bool,
    /// Namespace of the extension, where a generated root CA Secret would go.
    #[arg(long, default_value = names::DEFAULT_NAMESPACE)]
    pub namespace: String,
    #[command(flatten)]
    pub addon: AddonOptions,
}

fn parse_hook(s: &str) -> Result<Hook, String> {
    s.trim().parse()
}

fn parse_timeout(s: &str) -> Result<std::time::Duration, String> {
    crate::duration::parse_go_duration(s)
}

fn parse_resync(s: &str) -> Result<std::time::Duration, String> {
    let resync = crate::duration::parse_go_duration(s)?;
    if resync < std::time::Duration::from_secs(1) {
        return Err(format!("{s}: the resync period must be at least 1s"));
    }
    Ok(resync)
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    let value: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if value > 0.0 && value < 1.0 {
        Ok(value)
    } else {
        Err(format!("{s}: must lie strictly between 0 and 1"))
    }
}
