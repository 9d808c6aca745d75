//! The `addons.registry` topology variable (SPEC §3): defaults, validation and the schema
//! published by DiscoverVariables. Errors name the field, e.g.
//! `addons.registry.replicas: must be an integer from 1 to 7`.

use std::net::IpAddr;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::duration::parse_go_duration;
use crate::names;
use crate::wire::cluster::is_dns1123_subdomain;

/// The addon's settings for one cluster, defaults applied.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistryConfig {
    pub provider: String,
    pub replicas: u8,
    pub storage: StorageConfig,
    /// Set explicitly in the variable; otherwise derived from the service CIDR.
    pub service_ip: Option<IpAddr>,
    pub sync_interval: String,
    #[serde(skip)]
    pub sync_interval_duration: Duration,
    pub mode: Mode,
    /// Where Proxy and Direct get images from; `None` in Local and Unmanaged.
    pub upstream: Option<Upstream>,
    /// Proxy only: how long a pulled image stays cached (Go duration), when set.
    pub cache_ttl: Option<String>,
}

/// The registry Proxy caches and Direct forwards to: `https://host[:port][/path]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Upstream {
    /// The URL as given.
    pub url: String,
    /// `host` or `host:port` (IPv6 bracketed), as containerd names the host's directory.
    pub host: String,
    /// The path after the host, without a trailing `/`; empty when none.
    pub path: String,
    /// Secret in the Cluster's namespace with `username` and `password`.
    pub credentials_secret: Option<String>,
    /// Secret in the Cluster's namespace with `ca.crt`, the CA the upstream is verified with.
    pub ca_secret: Option<String>,
}

impl Upstream {
    /// `https://host[:port]`: what Distribution's `proxy.remoteurl` and the front's `--remote`
    /// take. Repository paths pass through unchanged below it.
    pub fn origin(&self) -> String {
        format!("https://{}", self.host)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StorageConfig {
    pub size: String,
    pub storage_class_name: Option<String>,
}

/// How the cluster gets its images (SPEC §9.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum Mode {
    /// A full copy in the cluster.
    Local,
    /// A caching pull-through of the upstream.
    Proxy,
    /// No storage: the front forwards to the upstream.
    Direct,
    /// Nothing deployed; nodes pull as without the addon.
    Unmanaged,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::Local, Mode::Proxy, Mode::Direct, Mode::Unmanaged];

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Local => "Local",
            Mode::Proxy => "Proxy",
            Mode::Direct => "Direct",
            Mode::Unmanaged => "Unmanaged",
        }
    }

    /// Proxy and Direct take their images from `upstream`.
    pub fn needs_upstream(self) -> bool {
        matches!(self, Mode::Proxy | Mode::Direct)
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

const PROVIDER: &str = "CNCF Distribution";
const FIELD: &str = "addons.registry";

/// A variable that cannot be used, with the path of the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct VariableError {
    pub field: String,
    pub problem: String,
}

fn err(field: impl Into<String>, problem: impl Into<String>) -> VariableError {
    VariableError {
        field: field.into(),
        problem: problem.into(),
    }
}

/// Reads `addons.registry` from the value of the cluster's config variable.
/// `Ok(None)`: the addon is off for this cluster (variable, `addons` or `registry` missing or null).
pub fn registry_from_config(
    config: Option<&Value>,
) -> Result<Option<RegistryConfig>, VariableError> {
    let Some(config) = config else {
        return Ok(None);
    };
    let config = match config {
        Value::Null => return Ok(None),
        Value::Object(map) => map,
        _ => return Err(err("value", "must be an object")),
    };
    let addons = match config.get("addons") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(map)) => map,
        Some(_) => return Err(err("addons", "must be an object")),
    };
    match addons.get("registry") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(map)) => parse_registry(map).map(Some),
        Some(_) => Err(err(FIELD, "must be an object")),
    }
}

fn parse_registry(map: &Map<String, Value>) -> Result<RegistryConfig, VariableError> {
    const KNOWN: [&str; 8] = [
        "provider",
        "replicas",
        "storage",
        "serviceIP",
        "syncInterval",
        "mode",
        "upstream",
        "cache",
    ];
    if let Some(unknown) = map.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(err(
            format!("{FIELD}.{unknown}"),
            format!("unknown field; known fields: {}", KNOWN.join(", ")),
        ));
    }

    let provider = match map.get("provider") {
        None | Some(Value::Null) => PROVIDER.to_string(),
        Some(Value::String(p)) if p == PROVIDER => p.clone(),
        Some(_) => {
            return Err(err(
                format!("{FIELD}.provider"),
                format!("must be {PROVIDER:?}"),
            ));
        }
    };

    let replicas = match map.get("replicas") {
        None | Some(Value::Null) => names::DEFAULT_REPLICAS,
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=u64::from(names::MAX_REPLICAS)).contains(n))
            .map(|n| n as u8)
            .ok_or_else(|| {
                err(
                    format!("{FIELD}.replicas"),
                    format!("must be an integer from 1 to {}", names::MAX_REPLICAS),
                )
            })?,
    };

    let storage = parse_storage(map.get("storage"))?;

    let service_ip = match map.get("serviceIP") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.parse::<IpAddr>().map_err(|_| {
            err(
                format!("{FIELD}.serviceIP"),
                format!("{s:?} is not an IP address"),
            )
        })?),
        Some(_) => return Err(err(format!("{FIELD}.serviceIP"), "must be a string")),
    };

    let sync_interval = match map.get("syncInterval") {
        None | Some(Value::Null) => names::DEFAULT_SYNC_INTERVAL.to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(err(
                format!("{FIELD}.syncInterval"),
                "must be a duration string such as \"2m\"",
            ));
        }
    };
    let sync_interval_duration = parse_go_duration(&sync_interval)
        .ok()
        .filter(|d| *d >= Duration::from_secs(1))
        .ok_or_else(|| {
            err(
                format!("{FIELD}.syncInterval"),
                format!("{sync_interval:?} is not a duration of at least 1s (e.g. \"2m\")"),
            )
        })?;

    let mode = match map.get("mode") {
        None | Some(Value::Null) => Mode::Local,
        Some(Value::String(m)) => Mode::ALL
            .into_iter()
            .find(|mode| mode.as_str() == m)
            .ok_or_else(|| {
                err(
                    format!("{FIELD}.mode"),
                    format!("{m:?} is not one of Local, Proxy, Direct, Unmanaged"),
                )
            })?,
        Some(_) => {
            return Err(err(
                format!("{FIELD}.mode"),
                "must be one of Local, Proxy, Direct, Unmanaged",
            ));
        }
    };

    let upstream = match map.get("upstream") {
        None | Some(Value::Null) => None,
        Some(value) if mode.needs_upstream() => Some(parse_upstream(value)?),
        Some(_) => {
            return Err(err(
                format!("{FIELD}.upstream"),
                format!("not allowed in mode {mode}: only Proxy and Direct use an upstream"),
            ));
        }
    };
    if mode.needs_upstream() && upstream.is_none() {
        return Err(err(
            format!("{FIELD}.upstream"),
            format!("required in mode {mode}: {{url: https://host[:port][/path]}}"),
        ));
    }

    let cache_ttl = match map.get("cache") {
        None | Some(Value::Null) => None,
        Some(value) if mode == Mode::Proxy => parse_cache(value)?,
        Some(_) => {
            return Err(err(
                format!("{FIELD}.cache"),
                format!("not allowed in mode {mode}: only Proxy caches"),
            ));
        }
    };

    Ok(RegistryConfig {
        provider,
        replicas,
        storage,
        service_ip,
        sync_interval,
        sync_interval_duration,
        mode,
        upstream,
        cache_ttl,
    })
}

fn known_fields(
    map: &Map<String, Value>,
    field: &str,
    known: &[&str],
) -> Result<(), VariableError> {
    match map.keys().find(|k| !known.contains(&k.as_str())) {
        Some(unknown) => Err(err(
            format!("{field}.{unknown}"),
            format!("unknown field; known fields: {}", known.join(", ")),
        )),
        None => Ok(()),
    }
}

fn parse_upstream(value: &Value) -> Result<Upstream, VariableError> {
    let field = format!("{FIELD}.upstream");
    let Value::Object(map) = value else {
        return Err(err(field, "must be an object"));
    };
    known_fields(map, &field, &["url", "credentialsSecretRef", "caSecretRef"])?;
    let url = match map.get("url") {
        Some(Value::String(url)) => url.clone(),
        None | Some(Value::Null) => {
            return Err(err(
                format!("{field}.url"),
                "required: https://host[:port][/path]",
            ));
        }
        Some(_) => return Err(err(format!("{field}.url"), "must be a string")),
    };
    let (host, path) = parse_upstream_url(&url).map_err(|problem| {
        err(
            format!("{field}.url"),
            format!("{url:?} {problem}; expected https://host[:port][/path]"),
        )
    })?;
    let secret_ref = |key: &str| -> Result<Option<String>, VariableError> {
        let field = format!("{field}.{key}");
        let map = match map.get(key) {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Object(map)) => map,
            Some(_) => return Err(err(field, "must be an object {name: <secret>}")),
        };
        known_fields(map, &field, &["name"])?;
        match map.get("name") {
            Some(Value::String(name)) if is_dns1123_subdomain(name) => Ok(Some(name.clone())),
            _ => Err(err(
                format!("{field}.name"),
                "required: the name of a Secret in the Cluster's namespace (a DNS-1123 subdomain)",
            )),
        }
    };
    Ok(Upstream {
        url,
        host,
        path,
        credentials_secret: secret_ref("credentialsSecretRef")?,
        ca_secret: secret_ref("caSecretRef")?,
    })
}

/// `(host[:port], path)` of an `https://host[:port][/path]` URL, or what is wrong with it.
fn parse_upstream_url(url: &str) -> Result<(String, String), String> {
    let uri: http::Uri = url.parse().map_err(|_| "is not a URL".to_string())?;
    if uri.scheme_str() != Some("https") {
        return Err("is not https".into());
    }
    let authority = uri.authority().ok_or("has no host")?;
    if authority.as_str().contains('@') {
        return Err("carries user information: use credentialsSecretRef".into());
    }
    let host = authority.host();
    if host.is_empty() {
        return Err("has no host".into());
    }
    let valid_host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            host.parse::<std::net::Ipv4Addr>().is_ok()
                || is_dns1123_subdomain(&host.to_ascii_lowercase())
        }
    };
    if !valid_host {
        return Err(format!("has an invalid host {host:?}"));
    }
    if let Some(port) = authority.port_u16()
        && port == 0
    {
        return Err("has port 0".into());
    }
    if uri.query().is_some() || url.contains('#') {
        return Err("has a query or fragment".into());
    }
    // Containerd names the host's directory without the default port.
    let host = match authority.port_u16() {
        Some(443) | None => host.to_ascii_lowercase(),
        Some(port) => format!("{}:{port}", host.to_ascii_lowercase()),
    };
    let path = uri.path().trim_end_matches('/').to_string();
    Ok((host, path))
}

fn parse_cache(value: &Value) -> Result<Option<String>, VariableError> {
    let field = format!("{FIELD}.cache");
    let Value::Object(map) = value else {
        return Err(err(field, "must be an object"));
    };
    known_fields(map, &field, &["ttl"])?;
    match map.get("ttl") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(ttl))
            if parse_go_duration(ttl).is_ok_and(|d| d >= Duration::from_secs(1)) =>
        {
            Ok(Some(ttl.clone()))
        }
        Some(_) => Err(err(
            format!("{field}.ttl"),
            "must be a Go duration of at least 1s, such as \"168h\"",
        )),
    }
}

fn parse_storage(value: Option<&Value>) -> Result<StorageConfig, VariableError> {
    let mut storage = StorageConfig {
        size: names::DEFAULT_STORAGE_SIZE.to_string(),
        storage_class_name: None,
    };
    let map = match value {
        None | Some(Value::Null) => return Ok(storage),
        Some(Value::Object(map)) => map,
        Some(_) => return Err(err(format!("{FIELD}.storage"), "must be an object")),
    };
    if let Some(unknown) = map
        .keys()
        .find(|k| !["size", "storageClassName"].contains(&k.as_str()))
    {
        return Err(err(
            format!("{FIELD}.storage.{unknown}"),
            "unknown field; known fields: size, storageClassName",
        ));
    }
    match map.get("size") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if is_storage_quantity(s) => storage.size = s.clone(),
        Some(_) => {
            return Err(err(
                format!("{FIELD}.storage.size"),
                "must be a positive Kubernetes quantity such as \"100Gi\"",
            ));
        }
    }
    match map.get("storageClassName") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if is_dns1123_subdomain(s) => {
            storage.storage_class_name = Some(s.clone())
        }
        Some(_) => {
            return Err(err(
                format!("{FIELD}.storage.storageClassName"),
                "must be a DNS-1123 subdomain",
            ));
        }
    }
    Ok(storage)
}

/// A positive quantity with an optional binary or decimal suffix: `100Gi`, `500M`, `1.5Ti`.
fn is_storage_quantity(s: &str) -> bool {
    const SUFFIXES: [&str; 12] = [
        "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "k", "M", "G", "T", "P", "E",
    ];
    let number = SUFFIXES
        .iter()
        .find_map(|suffix| s.strip_suffix(suffix))
        .unwrap_or(s);
    let mut parts = number.splitn(2, '.');
    let int = parts.next().unwrap_or("");
    let frac = parts.next();
    let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    digits(int) && frac.is_none_or(digits) && number.bytes().any(|b| (b'1'..=b'9').contains(&b))
}

impl RegistryConfig {
    /// The fixed Service IP: the variable's `serviceIP` (checked to lie inside the first
    /// service CIDR) or the CIDR's network address + 20.
    pub fn resolve_service_ip(&self, service_cidrs: &[String]) -> Result<IpAddr, VariableError> {
        let first = service_cidrs.first().ok_or_else(|| {
            err(
                "cluster.spec.clusterNetwork.services.cidrBlocks",
                "required: the registry's Service IP is taken from the first service CIDR",
            )
        })?;
        let cidr = Cidr::parse(first).map_err(|problem| {
            err(
                "cluster.spec.clusterNetwork.services.cidrBlocks[0]",
                problem,
            )
        })?;
        match self.service_ip {
            Some(ip) if cidr.contains(ip) => Ok(ip),
            Some(ip) => Err(err(
                format!("{FIELD}.serviceIP"),
                format!("{ip} is not inside the service CIDR {first}"),
            )),
            None => cidr.nth(names::SERVICE_IP_OFFSET).ok_or_else(|| {
                err(
                    "cluster.spec.clusterNetwork.services.cidrBlocks[0]",
                    format!("{first} is too small to hold the registry's Service IP"),
                )
            }),
        }
    }
}

/// An IPv4 or IPv6 network in CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub network: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not in CIDR notation"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?}: {addr:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("{s:?}: prefix length must be 0–{max}"))?;
        let network = mask(addr, prefix);
        Ok(Cidr { network, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.network.is_ipv4() && mask(ip, self.prefix) == self.network
    }

    /// The address `offset` after the network address, if the network holds it.
    pub fn nth(&self, offset: u128) -> Option<IpAddr> {
        let bits: u32 = if self.network.is_ipv4() { 32 } else { 128 };
        let host_bits = bits - u32::from(self.prefix);
        if host_bits < 128 && offset >= (1u128 << host_bits) {
            return None;
        }
        Some(match self.network {
            IpAddr::V4(v4) => IpAddr::V4((u32::from(v4) + offset as u32).into()),
            IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) + offset).into()),
        })
    }
}

fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix))
            };
            IpAddr::V4((u32::from(v4) & m).into())
        }
        IpAddr::V6(v6) => {
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix))
            };
            IpAddr::V6((u128::from(v6) & m).into())
        }
    }
}

/// The OpenAPI schema of the config variable, as published by DiscoverVariables. It types
/// `addons.registry` and leaves the rest of the variable open to other addons.
pub fn variable_schema() -> Value {
    json!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
        "properties": {
            "addons": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": true,
                "properties": {
                    "registry": {
                        "type": "object",
                        "description": "In-cluster OCI registry mirror. Present (even empty) enables it.",
                        "properties": {
                            "provider": {"type": "string", "enum": [PROVIDER]},
                            "replicas": {"type": "integer", "minimum": 1, "maximum": names::MAX_REPLICAS, "default": names::DEFAULT_REPLICAS},
                            "storage": {
                                "type": "object",
                                "properties": {
                                    "size": {"type": "string", "default": names::DEFAULT_STORAGE_SIZE},
                                    "storageClassName": {"type": "string"}
                                }
                            },
                            "serviceIP": {"type": "string", "description": "Fixed ClusterIP of the registry; default: service CIDR network address + 20."},
                            "syncInterval": {"type": "string", "default": names::DEFAULT_SYNC_INTERVAL},
                            "mode": {
                                "type": "string",
                                "enum": ["Local", "Proxy", "Direct", "Unmanaged"],
                                "default": "Local",
                                "description": "Local: a full copy in the cluster. Proxy: a pull-through cache of upstream. Direct: the fixed address forwards to upstream, storing nothing. Unmanaged: nothing deployed."
                            },
                            "upstream": {
                                "type": "object",
                                "description": "The registry Proxy caches and Direct forwards to; required for those modes, refused for the others.",
                                "required": ["url"],
                                "properties": {
                                    "url": {"type": "string", "pattern": "^https://[^/?#@]+(/[^?#]*)?$", "description": "https://host[:port][/path]"},
                                    "credentialsSecretRef": {
                                        "type": "object",
                                        "description": "Secret in the Cluster's namespace: type kubernetes.io/basic-auth, or keys username and password.",
                                        "required": ["name"],
                                        "properties": {"name": {"type": "string", "minLength": 1}}
                                    },
                                    "caSecretRef": {
                                        "type": "object",
                                        "description": "Secret in the Cluster's namespace whose key ca.crt holds the PEM CA the upstream is verified with.",
                                        "required": ["name"],
                                        "properties": {"name": {"type": "string", "minLength": 1}}
                                    }
                                }
                            },
                            "cache": {
                                "type": "object",
                                "description": "Proxy mode's cache.",
                                "properties": {
                                    "ttl": {"type": "string", "description": "How long a pulled image stays cached (Go duration); honoured by Distribution 3.0 and later."}
                                }
                            }
                        }
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<Option<RegistryConfig>, String> {
        registry_from_config(Some(&v)).map_err(|e| e.to_string())
    }

    #[test]
    fn off_when_absent_or_null() {
        assert_eq!(registry_from_config(None), Ok(None));
        assert_eq!(parse(json!({})), Ok(None));
        assert_eq!(parse(json!({"addons": {}})), Ok(None));
        assert_eq!(parse(json!({"addons": {"registry": null}})), Ok(None));
    }

    #[test]
    fn empty_registry_gets_defaults() {
        let cfg = parse(json!({"addons": {"registry": {}}})).unwrap().unwrap();
        assert_eq!(cfg.replicas, 2);
        assert_eq!(cfg.storage.size, "100Gi");
        assert_eq!(cfg.sync_interval_duration, Duration::from_secs(120));
        assert_eq!(cfg.mode, Mode::Local);
        let cfg = parse(json!({"addons": {"registry": {"provider": "CNCF Distribution", "replicas": 7, "storage": {"size": "1.5Ti", "storageClassName": "fast"}, "syncInterval": "30s"}}})).unwrap().unwrap();
        assert_eq!(cfg.replicas, 7);
        assert_eq!(cfg.storage.storage_class_name.as_deref(), Some("fast"));
    }

    #[test]
    fn invalid_values_name_the_field() {
        let cases = [
            (
                json!({"replicas": 0}),
                "addons.registry.replicas: must be an integer from 1 to 7",
            ),
            (
                json!({"replicas": 8}),
                "addons.registry.replicas: must be an integer from 1 to 7",
            ),
            (
                json!({"replicas": "3"}),
                "addons.registry.replicas: must be an integer from 1 to 7",
            ),
            (
                json!({"replicas": 2.5}),
                "addons.registry.replicas: must be an integer from 1 to 7",
            ),
            (
                json!({"storage": {"size": "lots"}}),
                "addons.registry.storage.size: must be a positive Kubernetes quantity such as \"100Gi\"",
            ),
            (
                json!({"storage": {"size": "0Gi"}}),
                "addons.registry.storage.size: must be a positive Kubernetes quantity such as \"100Gi\"",
            ),
            (
                json!({"serviceIP": "10.96.0.300"}),
                "addons.registry.serviceIP: \"10.96.0.300\" is not an IP address",
            ),
            (
                json!({"syncInterval": "soon"}),
                "addons.registry.syncInterval: \"soon\" is not a duration of at least 1s (e.g. \"2m\")",
            ),
            (
                json!({"mode": "Proxy"}),
                "addons.registry.upstream: required in mode Proxy: {url: https://host[:port][/path]}",
            ),
            (
                json!({"mode": "Remote"}),
                "addons.registry.mode: \"Remote\" is not one of Local, Proxy, Direct, Unmanaged",
            ),
            (
                json!({"provider": "Harbor"}),
                "addons.registry.provider: must be \"CNCF Distribution\"",
            ),
        ];
        for (registry, expected) in cases {
            assert_eq!(
                parse(json!({"addons": {"registry": registry}})).unwrap_err(),
                expected
            );
        }
        assert!(
            parse(json!({"addons": {"registry": {"replica": 3}}}))
                .unwrap_err()
                .starts_with("addons.registry.replica: unknown field")
        );
        assert_eq!(
            parse(json!({"addons": {"registry": []}})).unwrap_err(),
            "addons.registry: must be an object"
        );
        assert_eq!(parse(json!("x")).unwrap_err(), "value: must be an object");
    }

    #[test]
    fn modes_and_upstream() {
        let reg = |v: Value| parse(json!({"addons": {"registry": v}}));
        for mode in ["Local", "Unmanaged"] {
            assert_eq!(reg(json!({"mode": mode})).unwrap().unwrap().upstream, None);
        }
        let cfg = reg(json!({"mode": "Proxy", "upstream": {
            "url": "https://Registry.Example.com:5443/mirror/",
            "credentialsSecretRef": {"name": "up-creds"},
            "caSecretRef": {"name": "up-ca"},
        }, "cache": {"ttl": "72h"}}))
        .unwrap()
        .unwrap();
        assert_eq!(cfg.mode, Mode::Proxy);
        let up = cfg.upstream.unwrap();
        assert_eq!(up.host, "registry.example.com:5443");
        assert_eq!(up.path, "/mirror");
        assert_eq!(up.origin(), "https://registry.example.com:5443");
        assert_eq!(up.credentials_secret.as_deref(), Some("up-creds"));
        assert_eq!(up.ca_secret.as_deref(), Some("up-ca"));
        assert_eq!(cfg.cache_ttl.as_deref(), Some("72h"));
        // The default port is not part of containerd's directory name.
        let direct = reg(json!({"mode": "Direct", "upstream": {"url": "https://r.example:443"}}))
            .unwrap()
            .unwrap();
        let up = direct.upstream.unwrap();
        assert_eq!((up.host.as_str(), up.path.as_str()), ("r.example", ""));
        assert_eq!(up.credentials_secret, None);
        let v6 = reg(json!({"mode": "Direct", "upstream": {"url": "https://[fd00::1]:5000"}}))
            .unwrap()
            .unwrap();
        assert_eq!(v6.upstream.unwrap().host, "[fd00::1]:5000");
    }

    #[test]
    fn mode_errors_name_the_field() {
        let up = json!({"url": "https://r.example"});
        let cases = [
            (
                json!({"mode": "Direct"}),
                "addons.registry.upstream: required in mode Direct",
            ),
            (
                json!({"mode": "Local", "upstream": up}),
                "addons.registry.upstream: not allowed in mode Local",
            ),
            (
                json!({"upstream": up}),
                "addons.registry.upstream: not allowed in mode Local",
            ),
            (
                json!({"mode": "Unmanaged", "upstream": up}),
                "addons.registry.upstream: not allowed in mode Unmanaged",
            ),
            (
                json!({"mode": "Direct", "upstream": up, "cache": {"ttl": "1h"}}),
                "addons.registry.cache: not allowed in mode Direct",
            ),
            (
                json!({"mode": "Local", "cache": {"ttl": "1h"}}),
                "addons.registry.cache: not allowed in mode Local",
            ),
            (
                json!({"mode": "Proxy", "upstream": up, "cache": {"ttl": "a week"}}),
                "addons.registry.cache.ttl: must be a Go duration",
            ),
            (
                json!({"mode": "Proxy", "upstream": up, "cache": {"size": "1"}}),
                "addons.registry.cache.size: unknown field",
            ),
            (
                json!({"mode": "Proxy", "upstream": {}}),
                "addons.registry.upstream.url: required",
            ),
            (
                json!({"mode": "Proxy", "upstream": "https://r.example"}),
                "addons.registry.upstream: must be an object",
            ),
            (
                json!({"mode": "Proxy", "upstream": {"url": "http://r.example"}}),
                "addons.registry.upstream.url: \"http://r.example\" is not https",
            ),
            (
                json!({"mode": "Proxy", "upstream": {"url": "r.example/x"}}),
                "addons.registry.upstream.url: \"r.example/x\" is not a URL",
            ),
            (
                json!({"mode": "Proxy", "upstream": {"url": "https://"}}),
                "addons.registry.upstream.url: \"https://\" is not a URL",
            ),
            (
                json!({"mode": "Proxy", "upstream": {"url": "https://a b"}}),
                "addons.registry.upstream.url: \"https://a b\" is not a URL",
            ),
            (
                json!({"mode": "Proxy", "upstream": {"url": "https://u:p@r.example"}}),
                "addons.registry.upstream.url: \"https://u:p@r.example\" carries user information",
            ),
            (
                json!({"mode": "Proxy", "upstream": {"url": "https://r_x.example"}}),
                "addons.registry.upstream.url: \"https://r_x.example\" has an invalid host",
            ),
            (
                json!({"mode": "Proxy", "upstream": {"url": "https://r.example?x=1"}}),
                "addons.registry.upstream.url: \"https://r.example?x=1\" has a query or fragment",
            ),
            (
                json!({"mode": "Proxy", "upstream": {"url": 5}}),
                "addons.registry.upstream.url: must be a string",
            ),
            (
                json!({"mode": "Proxy", "upstream": {"url": "https://r.example", "token": "x"}}),
                "addons.registry.upstream.token: unknown field",
            ),
            (
                json!({"mode": "Proxy", "upstream": {"url": "https://r.example", "credentialsSecretRef": {}}}),
                "addons.registry.upstream.credentialsSecretRef.name: required",
            ),
            (
                json!({"mode": "Proxy", "upstream": {"url": "https://r.example", "caSecretRef": {"name": "Bad_Name"}}}),
                "addons.registry.upstream.caSecretRef.name: required",
            ),
            (
                json!({"mode": "Proxy", "upstream": {"url": "https://r.example", "caSecretRef": "ca"}}),
                "addons.registry.upstream.caSecretRef: must be an object",
            ),
            (json!({"mode": 3}), "addons.registry.mode: must be one of"),
        ];
        for (registry, expected) in cases {
            let e = parse(json!({"addons": {"registry": registry.clone()}})).unwrap_err();
            assert!(e.starts_with(expected), "{registry}: {e}");
        }
    }

    #[test]
    fn service_ip_is_the_20th_address() {
        let cfg = parse(json!({"addons": {"registry": {}}})).unwrap().unwrap();
        let ip = |c: &str| {
            cfg.resolve_service_ip(&[c.to_string()])
                .map(|ip| ip.to_string())
        };
        assert_eq!(ip("10.96.0.0/12").unwrap(), "10.96.0.20");
        assert_eq!(ip("10.128.0.0/12").unwrap(), "10.128.0.20");
        assert_eq!(ip("10.96.5.7/12").unwrap(), "10.96.0.20");
        assert_eq!(ip("fd00:10:96::/108").unwrap(), "fd00:10:96::14");
        assert!(
            ip("10.0.0.0/28")
                .unwrap_err()
                .to_string()
                .contains("too small")
        );
        assert!(ip("banana").is_err());
        assert!(cfg.resolve_service_ip(&[]).is_err());
    }

    #[test]
    fn explicit_service_ip_must_lie_inside_the_cidr() {
        let cfg = parse(json!({"addons": {"registry": {"serviceIP": "10.96.1.1"}}}))
            .unwrap()
            .unwrap();
        assert_eq!(
            cfg.resolve_service_ip(&["10.96.0.0/12".into()])
                .unwrap()
                .to_string(),
            "10.96.1.1"
        );
        let e = cfg
            .resolve_service_ip(&["192.168.0.0/16".into()])
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "addons.registry.serviceIP: 10.96.1.1 is not inside the service CIDR 192.168.0.0/16"
        );
    }
}
