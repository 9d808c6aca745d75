//! What a node needs to pull through the cluster's registry (SPEC §7): containerd's
//! `hosts.toml` for every registry (`_default`), the registry's CA, the `config_path`
//! fragments for containerd 1.x and 2.x, and the script that makes containerd load them.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::addon::users::Credentials;
use crate::names;
use crate::wire::variable::{Mode, RegistryConfig};

/// A containerd `hosts.toml` (`certs.d/<namespace>/hosts.toml`), as far as the addon writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostsFile {
    /// The upstream; absent in `_default`, where containerd falls back to the image's own
    /// registry after the hosts below.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// Mirrors, tried in order, keyed by URL.
    #[serde(default)]
    pub host: BTreeMap<String, HostEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostEntry {
    pub capabilities: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    /// Headers sent with every request to this host: the `ro` user's `Authorization`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub header: BTreeMap<String, String>,
}

/// A file for cloud-init's `write_files`, as KubeadmConfigSpec `files` holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeFile {
    pub path: String,
    pub owner: String,
    pub permissions: String,
    #[serde(flatten)]
    pub content: FileContent,
}

/// A file's content: inline, or read by the bootstrap provider from a Secret in the Cluster's
/// namespace (for content that must not appear in the templates).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FileContent {
    Content(String),
    ContentFrom { secret: SecretKey },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecretKey {
    pub name: String,
    pub key: String,
}

/// The registry's host as containerd and URLs spell it: `10.96.0.20`, `[fd00:10:96::14]`.
pub fn mirror_host(service_ip: IpAddr) -> String {
    match service_ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// The directory of containerd's hosts directory for the images a registry `host` serves:
/// the host itself, but `docker.io` for Docker Hub's API hosts, since containerd looks images
/// named `docker.io/…` (or `nginx`) up there.
pub fn hosts_directory(host: &str) -> &str {
    match host {
        crate::oci::reference::DOCKER_HUB_API | "index.docker.io" => {
            crate::oci::reference::DOCKER_HUB
        }
        other => other,
    }
}

/// The mirror URL nodes pull from (port 443).
pub fn mirror_url(service_ip: IpAddr) -> String {
    format!("https://{}", mirror_host(service_ip))
}

/// Where the registry's CA lands: in the directory containerd also reads for pulls that name
/// the registry directly (`<host>/<repo>:<tag>`).
pub fn ca_path(service_ip: IpAddr) -> String {
    format!(
        "{}/{}/ca.crt",
        names::CONTAINERD_CERTS_DIR,
        mirror_host(service_ip)
    )
}

/// `hosts.toml` sending every pull and resolve first to `mirror_url`, trusting `ca_file`,
/// with `authorization` as the `Authorization` header when given.
pub fn hosts_toml(mirror_url: &str, ca_file: &str, authorization: Option<&str>) -> String {
    let header = authorization
        .map(|value| BTreeMap::from([("Authorization".to_string(), value.to_string())]))
        .unwrap_or_default();
    let file = HostsFile {
        server: None,
        host: BTreeMap::from([(
            mirror_url.to_string(),
            HostEntry {
                capabilities: vec!["pull".into(), "resolve".into()],
                ca: Some(ca_file.to_string()),
                header,
            },
        )]),
    };
    render_hosts_file(&file)
}

/// The containerd configuration fragment setting `config_path` for containerd `major`
/// (1: config version 2, CRI plugin `io.containerd.grpc.v1.cri`; 2: config version 3, images
/// plugin `io.containerd.cri.v1.images`).
pub fn containerd_fragment(major: u8) -> String {
    let (version, plugin) = if major >= 2 {
        (3, "io.containerd.cri.v1.images")
    } else {
        (2, "io.containerd.grpc.v1.cri")
    };
    let mut registry = toml::Table::new();
    registry.insert(
        "config_path".into(),
        names::CONTAINERD_CERTS_DIR.to_string().into(),
    );
    let mut plugin_table = toml::Table::new();
    plugin_table.insert("registry".into(), registry.into());
    let mut plugins = toml::Table::new();
    plugins.insert(plugin.into(), plugin_table.into());
    let mut config = toml::Table::new();
    config.insert("version".into(), toml::Value::Integer(version));
    config.insert("plugins".into(), plugins.into());
    let body = toml::to_string(&config).expect("a table always serializes");
    format!(
        "# Managed by registry-addon: containerd {major}.x reads registry hosts from certs.d.\n{body}"
    )
}

/// Path of the fragment for containerd `major`.
pub fn fragment_path(major: u8) -> String {
    format!("{}/containerd-{major}.toml", names::CONTAINERD_ADDON_DIR)
}

/// Path of the script run before kubeadm.
pub fn script_path() -> String {
    format!("{}/configure.sh", names::CONTAINERD_ADDON_DIR)
}

/// The `preKubeadmCommands` entry running the script.
pub fn pre_kubeadm_command() -> String {
    format!("/bin/sh {}", script_path())
}

/// The script that makes containerd load the right fragment.
///
/// `config_path` is only read from containerd's main configuration or a file it `imports`,
/// and which plugin holds it depends on the containerd major version, unknown until the node
/// boots. A drop-in alone is ignored unless the main configuration imports it, so the script
/// copies the matching fragment to `conf.d`, adds it to `imports` unless the main
/// configuration already imports it (directly or through `conf.d/*.toml`, as image-builder
/// writes it), creates a minimal main configuration when there is none, and restarts
/// containerd if it already runs. `REGISTRY_ADDON_ROOT` prefixes every path (for tests); the
/// restart happens only without it.
pub fn configure_script() -> String {
    const SCRIPT: &str = r#"#!/bin/sh
# Managed by registry-addon: makes containerd read registry hosts from @CERTS_DIR@.
set -eu
root="${REGISTRY_ADDON_ROOT:-}"
config="$root@CONFIG@"
dropin="$root@DROP_IN@"
fragments="$root@ADDON_DIR@"

major="$(containerd --version 2>/dev/null | awk '{print $3}' | sed -e 's/^v//' -e 's/\..*//')" || major=""
case "$major" in
  ''|*[!0-9]*) major=1 ;;
esac
if [ "$major" -ge 2 ]; then version=3; fragment=containerd-2.toml; else version=2; fragment=containerd-1.toml; fi

mkdir -p "$(dirname "$dropin")"
cp "$fragments/$fragment" "$dropin"

glob="$(dirname "$dropin")/*.toml"
if [ ! -s "$config" ]; then
  mkdir -p "$(dirname "$config")"
  printf 'version = %s\nimports = ["%s"]\n' "$version" "$dropin" > "$config"
elif grep -Fq "\"$dropin\"" "$config" || grep -Fq "\"$glob\"" "$config"; then
  : # already imported
elif grep -Eq '^[[:space:]]*imports[[:space:]]*=[[:space:]]*\[' "$config"; then
  sed -i -E \
    -e "s|^([[:space:]]*imports[[:space:]]*=[[:space:]]*\[)[[:space:]]*\]|\1\"$dropin\"]|" \
    -e t \
    -e "s|^([[:space:]]*imports[[:space:]]*=[[:space:]]*\[)|\1\"$dropin\", |" \
    "$config"
else
  # Keys before the first table are top-level: prepending keeps the file valid.
  { printf 'imports = ["%s"]\n' "$dropin"; cat "$config"; } > "$config.registry-addon"
  mv "$config.registry-addon" "$config"
fi

# The hosts file goes where its server line says: that registry's directory, or _default
# (every registry) without one. Empty when the mode routes nothing through the mirror.
hosts="$fragments/hosts.toml"
if [ -s "$hosts" ]; then
  server="$(sed -n -E 's|^server[[:space:]]*=[[:space:]]*"https?://([^"/]+).*|\1|p' "$hosts" | head -n 1)"
  # containerd looks Docker Hub's images up under docker.io, whatever host serves its API.
  case "$server" in registry-1.docker.io|index.docker.io) server=docker.io ;; esac
  dir="$root@CERTS_DIR@/${server:-_default}"
  mkdir -p "$dir"
  cp "$hosts" "$dir/hosts.toml.registry-addon"
  chmod 0600 "$dir/hosts.toml.registry-addon"
  mv "$dir/hosts.toml.registry-addon" "$dir/hosts.toml"
fi

if [ -z "$root" ] && command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet containerd; then
  systemctl restart containerd
fi
"#;
    SCRIPT
        .replace("@CERTS_DIR@", names::CONTAINERD_CERTS_DIR)
        .replace("@CONFIG@", names::CONTAINERD_CONFIG)
        .replace("@DROP_IN@", names::CONTAINERD_DROP_IN)
        .replace("@ADDON_DIR@", names::CONTAINERD_ADDON_DIR)
}

/// Where the `_default` mirror's `hosts.toml` lands on a node.
pub fn default_hosts_path() -> String {
    format!("{}/_default/hosts.toml", names::CONTAINERD_CERTS_DIR)
}

/// The `_default` `hosts.toml` of a node of the cluster whose registry is at `service_ip`:
/// pull through it as `ro`. It carries the password, so it reaches nodes through the Secret
/// [`names::containerd_hosts_secret`], never inline in a template. Taken from
/// [`node_config`], as the node agent's desired config is, so the two cannot differ.
pub fn default_hosts_toml(service_ip: IpAddr, ro: &Credentials) -> String {
    bootstrap_hosts_toml(Some(&Route::Default), service_ip, ro)
}

/// The `hosts.toml` of a node whose mirror is at `service_ip` and carries the images of
/// `route` (`None`, Unmanaged: none, and so empty). Taken from [`node_config`], as the node
/// agent's desired config is, so the two cannot differ.
pub fn bootstrap_hosts_toml(route: Option<&Route>, service_ip: IpAddr, ro: &Credentials) -> String {
    let Some(route) = route else {
        return String::new();
    };
    let side = MirrorSide {
        host: mirror_host(service_ip),
        // The hosts file does not depend on the CA's content.
        ca_pem: String::new(),
        ro: ro.clone(),
        route: Some(route.clone()),
    };
    let config = node_config(names::CONTAINERD_CERTS_DIR, &Rollout::Final(&side));
    config
        .files
        .get(&route.hosts_file())
        .cloned()
        .unwrap_or_default()
}

/// Where the bootstrap files put the hosts file before the configure script moves it into
/// the directory its `server` names (`_default` without one).
pub fn staged_hosts_path() -> String {
    format!("{}/hosts.toml", names::CONTAINERD_ADDON_DIR)
}

/// Every bootstrap file of a node, in every mode: the hosts file (read from the management
/// Secret `hosts_secret`, see [`bootstrap_hosts_toml`]; empty in Unmanaged), the CA (read
/// from the cluster's CA copy `ca_secret`), and what makes containerd read the hosts
/// directory.
///
/// Nothing in them depends on the mode or on the CA's content: the content comes from the
/// two Secrets through `contentFrom`, and the configure script places the hosts file in the
/// directory its `server` line names. So a mode switch or a CA rotation changes no bootstrap
/// template, and Cluster API replaces no machine for it; the node agent changes running
/// nodes in place, and new machines read the Secrets as they are when they boot.
pub fn node_files(service_ip: IpAddr, ca_secret: &str, hosts_secret: &str) -> Vec<NodeFile> {
    let file = |path: String, permissions: &str, content: String| NodeFile {
        path,
        owner: "root:root".into(),
        permissions: permissions.into(),
        content: FileContent::Content(content),
    };
    let from = |path: String, permissions: &str, secret: &str, key: &str| NodeFile {
        path,
        owner: "root:root".into(),
        permissions: permissions.into(),
        content: FileContent::ContentFrom {
            secret: SecretKey {
                name: secret.to_string(),
                key: key.to_string(),
            },
        },
    };
    vec![
        // Only root reads the credentials.
        from(
            staged_hosts_path(),
            "0600",
            hosts_secret,
            names::CONTAINERD_HOSTS_SECRET_KEY,
        ),
        from(ca_path(service_ip), "0644", ca_secret, "ca.crt"),
        file(fragment_path(1), "0644", containerd_fragment(1)),
        file(fragment_path(2), "0644", containerd_fragment(2)),
        file(script_path(), "0700", configure_script()),
    ]
}

/// How every hosts file the addon renders begins: the node agent takes over such a file where
/// it finds one (bootstrap wrote it), and leaves any other one alone.
pub const HOSTS_FILE_HEADER: &str = "# Managed by registry-addon:";

/// Where the `_default` `hosts.toml` lies, relative to containerd's hosts directory.
pub const DEFAULT_HOSTS_FILE: &str = "_default/hosts.toml";

/// Where the CA bundle for mirror `host` lies, relative to containerd's hosts directory.
pub fn ca_file(host: &str) -> String {
    format!("{host}/ca.crt")
}

/// Which images a node sends through the mirror.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Route {
    /// Every registry's (containerd's `_default` directory): Local.
    Default,
    /// Only those of this upstream host (`host` or `host:port`, as the image references name
    /// it): Proxy and Direct. Other registries are pulled as without the addon.
    Host(String),
}

impl Route {
    /// The route of a mode: `None` for Unmanaged, whose nodes get no file.
    pub fn of(registry: &RegistryConfig) -> Option<Route> {
        match registry.mode {
            Mode::Local => Some(Route::Default),
            Mode::Proxy | Mode::Direct => registry
                .upstream
                .as_ref()
                .map(|upstream| Route::Host(upstream.host.clone())),
            Mode::Unmanaged => None,
        }
    }

    /// The directory of containerd's hosts directory holding the route's `hosts.toml`.
    pub fn directory(&self) -> &str {
        match self {
            Route::Default => "_default",
            Route::Host(host) => hosts_directory(host),
        }
    }

    /// Where the route's `hosts.toml` lies, relative to containerd's hosts directory.
    pub fn hosts_file(&self) -> String {
        format!("{}/hosts.toml", self.directory())
    }

    /// The `server` of the route's `hosts.toml`: the upstream itself, after the mirror.
    /// `_default` has none: containerd falls back to the image's own registry.
    pub fn server(&self) -> Option<String> {
        match self {
            Route::Default => None,
            Route::Host(host) => Some(format!("https://{host}")),
        }
    }
}

/// One state of the mirror as nodes see it: where it is (`10.96.0.20`, or `host:port`), the
/// CA bundle it is trusted with, the `ro` credentials it accepts, and which images go through
/// it (`None`: none, the node keeps no file of the addon).
#[derive(Debug, Clone, PartialEq)]
pub struct MirrorSide {
    pub host: String,
    pub ca_pem: String,
    pub ro: Credentials,
    pub route: Option<Route>,
}

impl MirrorSide {
    /// Local's side: every registry's images through the mirror.
    pub fn local(host: String, ca_pem: String, ro: Credentials) -> MirrorSide {
        MirrorSide {
            host,
            ca_pem,
            ro,
            route: Some(Route::Default),
        }
    }
}

/// Which phase of a change the node configuration belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Old and new both accepted.
    Transition,
    /// New only: also the phase of a configuration that is not changing.
    Final,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Transition => "transition",
            Phase::Final => "final",
        }
    }
}

impl std::str::FromStr for Phase {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "transition" => Ok(Phase::Transition),
            "final" => Ok(Phase::Final),
            other => Err(format!(
                "unknown phase {other:?}: expected transition or final"
            )),
        }
    }
}

/// What the node configuration is made from.
///
/// A change that could break pulls (a new CA, new `ro` credentials, another mirror address,
/// another route) goes out in two phases, so that a node always holds a configuration that
/// works:
/// - `Transition { old, new }`: every mirror host of both sides is listed (containerd tries
///   the next host when one fails), in the hosts file of each side's route (both files when
///   the route changes); each host's `ca.crt` is the bundle of both CAs, so either server
///   certificate verifies; the header is the **old** credentials (the new ones when the old
///   side had no route). containerd sends one static header per host, so the node cannot
///   offer both: the registry side accepts old and new credentials before this phase is
///   written, and keeps accepting the old ones until every node carries the final hash.
/// - `Final(new)`: the new host, CA, credentials and route only; no file at all without a
///   route (Unmanaged).
#[derive(Debug, Clone, Copy)]
pub enum Rollout<'a> {
    Transition {
        old: &'a MirrorSide,
        new: &'a MirrorSide,
    },
    Final(&'a MirrorSide),
}

/// A node's desired mirror configuration: the files the addon owns, relative to containerd's
/// hosts directory, and a hash of them and the phase.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeConfig {
    pub phase: Phase,
    pub files: BTreeMap<String, String>,
    pub hash: String,
}

impl NodeConfig {
    /// A configuration from its files; the hash is computed here, never taken on trust.
    pub fn new(phase: Phase, files: BTreeMap<String, String>) -> NodeConfig {
        let hash = config_hash(phase, &files);
        NodeConfig { phase, files, hash }
    }
}

/// `sha256:<hex>` over the phase and every (path, content), in path order, each part
/// length-prefixed so that no two configurations hash alike.
fn config_hash(phase: Phase, files: &BTreeMap<String, String>) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    let mut part = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_be_bytes());
        hasher.update(bytes);
    };
    part(phase.as_str().as_bytes());
    for (path, content) in files {
        part(path.as_bytes());
        part(content.as_bytes());
    }
    format!("sha256:{}", hex::encode(hasher.finalize()))
}

/// Concatenates PEM bundles, each ending in a newline, skipping repeats.
fn ca_bundle(pems: &[&str]) -> String {
    let mut out = String::new();
    let mut seen: Vec<&str> = Vec::new();
    for pem in pems {
        let trimmed = pem.trim_end();
        if trimmed.is_empty() || seen.contains(&trimmed) {
            continue;
        }
        seen.push(trimmed);
        out.push_str(pem);
        if !pem.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

/// The one rendering of a node's mirror configuration, used by GeneratePatches (bootstrap
/// files) and by the node agent's desired config. `certs_dir` is containerd's hosts directory
/// on the node: `hosts.toml` names each CA file by its absolute path. See [`Rollout`] for the
/// two-phase rule.
pub fn node_config(certs_dir: &str, rollout: &Rollout<'_>) -> NodeConfig {
    let certs_dir = certs_dir.trim_end_matches('/');
    let (phase, sides): (Phase, Vec<&MirrorSide>) = match rollout {
        Rollout::Final(new) => (Phase::Final, vec![new]),
        Rollout::Transition { old, new } => (Phase::Transition, vec![new, old]),
    };
    // A side without a route has no file on the node.
    let routed: Vec<&MirrorSide> = sides.into_iter().filter(|s| s.route.is_some()).collect();
    let header_side = match rollout {
        Rollout::Transition { old, .. } if old.route.is_some() => *old,
        Rollout::Transition { new, .. } | Rollout::Final(new) => *new,
    };
    let bundle = if routed.len() == 1 && phase == Phase::Final {
        // Bootstrap writes the CA exactly as it is.
        routed[0].ca_pem.clone()
    } else {
        ca_bundle(&routed.iter().map(|s| s.ca_pem.as_str()).collect::<Vec<_>>())
    };
    let authorization = header_side.ro.basic_header();
    let mut hosts_files: BTreeMap<&Route, BTreeMap<String, HostEntry>> = BTreeMap::new();
    let mut files = BTreeMap::new();
    for side in &routed {
        let Some(route) = &side.route else { continue };
        let ca = ca_file(&side.host);
        hosts_files.entry(route).or_default().insert(
            format!("https://{}", side.host),
            HostEntry {
                capabilities: vec!["pull".into(), "resolve".into()],
                ca: Some(format!("{certs_dir}/{ca}")),
                header: BTreeMap::from([("Authorization".to_string(), authorization.clone())]),
            },
        );
        files.insert(ca, bundle.clone());
    }
    for (route, host) in hosts_files {
        files.insert(
            route.hosts_file(),
            render_hosts_file(&HostsFile {
                server: route.server(),
                host,
            }),
        );
    }
    NodeConfig::new(phase, files)
}

fn render_hosts_file(file: &HostsFile) -> String {
    let body = toml::to_string(file).expect("a hosts file always serializes");
    format!("{HOSTS_FILE_HEADER} pull through the cluster's registry, then upstream.\n{body}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(host: &str, ca: &str, password: &str) -> MirrorSide {
        MirrorSide::local(
            host.into(),
            ca.into(),
            Credentials {
                username: "ro".into(),
                password: password.into(),
            },
        )
    }

    #[test]
    fn bootstrap_files_are_the_final_node_config() {
        let ip: IpAddr = "10.96.0.20".parse().unwrap();
        let new = side("10.96.0.20", "-----CA-----\n", "secret");
        let config = node_config(names::CONTAINERD_CERTS_DIR, &Rollout::Final(&new));
        assert_eq!(config.phase, Phase::Final);
        assert_eq!(
            config.files.keys().collect::<Vec<_>>(),
            ["10.96.0.20/ca.crt", "_default/hosts.toml"]
        );
        assert_eq!(
            config.files["_default/hosts.toml"],
            default_hosts_toml(ip, &new.ro)
        );
        // Bootstrap reads the CA as the cluster's CA copy holds it, which a final config
        // writes exactly as it is.
        assert_eq!(config.files["10.96.0.20/ca.crt"], new.ca_pem);
        let files = node_files(ip, "c1-registry-addon-ca", "s");
        let ca = files.iter().find(|f| f.path == ca_path(ip)).unwrap();
        assert_eq!(
            ca.content,
            FileContent::ContentFrom {
                secret: SecretKey {
                    name: "c1-registry-addon-ca".into(),
                    key: "ca.crt".into(),
                }
            }
        );
        assert!(config.hash.starts_with("sha256:") && config.hash.len() == 71);
    }

    #[test]
    fn transition_lists_both_and_sends_the_old_header() {
        let old = side("10.96.0.20", "OLD\n", "old");
        let new = side("10.96.0.21", "NEW", "new");
        let config = node_config(
            "/certs",
            &Rollout::Transition {
                old: &old,
                new: &new,
            },
        );
        assert_eq!(config.phase, Phase::Transition);
        let hosts: HostsFile = toml::from_str(&config.files["_default/hosts.toml"]).unwrap();
        assert_eq!(hosts.host.len(), 2);
        for (url, entry) in &hosts.host {
            let host = url.trim_start_matches("https://");
            assert_eq!(
                entry.ca.as_deref(),
                Some(format!("/certs/{host}/ca.crt").as_str())
            );
            assert_eq!(entry.header["Authorization"], old.ro.basic_header());
            assert_eq!(config.files[&ca_file(host)], "NEW\nOLD\n");
        }
        // The same host with a new CA: one host, both CAs, and a different hash from final.
        let rotated = side("10.96.0.20", "NEW\n", "old");
        let transition = node_config(
            "/certs",
            &Rollout::Transition {
                old: &old,
                new: &rotated,
            },
        );
        assert_eq!(transition.files.len(), 2);
        assert_eq!(transition.files["10.96.0.20/ca.crt"], "NEW\nOLD\n");
        let last = node_config("/certs", &Rollout::Final(&rotated));
        assert_eq!(last.files["10.96.0.20/ca.crt"], "NEW\n");
        assert_ne!(transition.hash, last.hash);
    }

    fn routed(host: &str, ca: &str, password: &str, route: Option<Route>) -> MirrorSide {
        MirrorSide {
            route,
            ..side(host, ca, password)
        }
    }

    #[test]
    fn upstream_modes_route_only_the_upstream_host() {
        let up = Route::Host("registry.example.com:5443".into());
        let proxy = routed("10.96.0.20", "CA\n", "pw", Some(up.clone()));
        let config = node_config("/certs", &Rollout::Final(&proxy));
        assert_eq!(
            config.files.keys().collect::<Vec<_>>(),
            ["10.96.0.20/ca.crt", "registry.example.com:5443/hosts.toml"]
        );
        let hosts: HostsFile =
            toml::from_str(&config.files["registry.example.com:5443/hosts.toml"]).unwrap();
        assert_eq!(
            hosts.server.as_deref(),
            Some("https://registry.example.com:5443")
        );
        let entry = &hosts.host["https://10.96.0.20"];
        assert_eq!(entry.ca.as_deref(), Some("/certs/10.96.0.20/ca.crt"));
        assert_eq!(entry.header["Authorization"], proxy.ro.basic_header());
        assert_eq!(entry.capabilities, ["pull", "resolve"]);
        // The bootstrap hosts file is the same file.
        let ip: IpAddr = "10.96.0.20".parse().unwrap();
        let on_node = node_config(names::CONTAINERD_CERTS_DIR, &Rollout::Final(&proxy));
        assert_eq!(
            bootstrap_hosts_toml(Some(&up), ip, &proxy.ro),
            on_node.files["registry.example.com:5443/hosts.toml"]
        );
        // Staged, then placed by the configure script where its server line says.
        let files = node_files(ip, "ca-secret", "s");
        assert_eq!(files[0].path, staged_hosts_path());
    }

    #[test]
    fn unmanaged_has_no_file_and_a_route_change_lists_both() {
        let none = routed("10.96.0.20", "CA\n", "pw", None);
        let config = node_config("/certs", &Rollout::Final(&none));
        assert!(config.files.is_empty());
        let ip: IpAddr = "10.96.0.20".parse().unwrap();
        assert_eq!(bootstrap_hosts_toml(None, ip, &none.ro), "");

        let local = side("10.96.0.20", "CA\n", "old");
        let direct = routed(
            "10.96.0.20",
            "CA\n",
            "old",
            Some(Route::Host("r.example".into())),
        );
        let both = node_config(
            "/certs",
            &Rollout::Transition {
                old: &local,
                new: &direct,
            },
        );
        assert_eq!(
            both.files.keys().collect::<Vec<_>>(),
            [
                "10.96.0.20/ca.crt",
                "_default/hosts.toml",
                "r.example/hosts.toml"
            ]
        );
        // Leaving Unmanaged: the header is the new side's, the only one there is.
        let back = node_config(
            "/certs",
            &Rollout::Transition {
                old: &none,
                new: &local,
            },
        );
        let hosts: HostsFile = toml::from_str(&back.files["_default/hosts.toml"]).unwrap();
        assert_eq!(
            hosts.host["https://10.96.0.20"].header["Authorization"],
            local.ro.basic_header()
        );
        let to_none = node_config(
            "/certs",
            &Rollout::Transition {
                old: &local,
                new: &none,
            },
        );
        assert_eq!(to_none.files.len(), 2);
        assert!(to_none.files.contains_key("_default/hosts.toml"));
    }

    #[test]
    fn hosts_toml_reads_back() {
        let ip: IpAddr = "10.96.0.20".parse().unwrap();
        let ro = Credentials {
            username: "ro".into(),
            password: "secret".into(),
        };
        let text = default_hosts_toml(ip, &ro);
        let parsed: HostsFile = toml::from_str(&text).unwrap();
        // base64("ro:secret")
        assert_eq!(
            parsed.host["https://10.96.0.20"].header["Authorization"],
            "Basic cm86c2VjcmV0"
        );
        assert_eq!(parsed.server, None);
        let entry = &parsed.host["https://10.96.0.20"];
        assert_eq!(entry.capabilities, ["pull", "resolve"]);
        assert_eq!(
            entry.ca.as_deref(),
            Some("/etc/containerd/certs.d/10.96.0.20/ca.crt")
        );
        assert!(text.contains("[host.\"https://10.96.0.20\"]"), "{text}");
    }

    #[test]
    fn ipv6_hosts_are_bracketed() {
        let ip: IpAddr = "fd00:10:96::14".parse().unwrap();
        assert_eq!(mirror_url(ip), "https://[fd00:10:96::14]");
        assert_eq!(
            ca_path(ip),
            "/etc/containerd/certs.d/[fd00:10:96::14]/ca.crt"
        );
        let parsed: HostsFile =
            toml::from_str(&hosts_toml(&mirror_url(ip), &ca_path(ip), None)).unwrap();
        assert!(parsed.host.contains_key("https://[fd00:10:96::14]"));
    }

    #[test]
    fn fragments_set_config_path_for_each_containerd() {
        let v1: toml::Table = toml::from_str(&containerd_fragment(1)).unwrap();
        assert_eq!(v1["version"].as_integer(), Some(2));
        assert_eq!(
            v1["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["config_path"].as_str(),
            Some("/etc/containerd/certs.d")
        );
        let v2: toml::Table = toml::from_str(&containerd_fragment(2)).unwrap();
        assert_eq!(v2["version"].as_integer(), Some(3));
        assert_eq!(
            v2["plugins"]["io.containerd.cri.v1.images"]["registry"]["config_path"].as_str(),
            Some("/etc/containerd/certs.d")
        );
    }
}
