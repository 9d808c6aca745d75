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
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StorageConfig {
    pub size: String,
    pub storage_class_name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Mode {
    Local,
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
    const KNOWN: [&str; 6] = [
        "provider",
        "replicas",
        "storage",
        "serviceIP",
        "syncInterval",
        "mode",
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
        Some(Value::String(m)) if m == "Local" => Mode::Local,
        Some(Value::String(m)) if ["Proxy", "Direct", "Unmanaged"].contains(&m.as_str()) => {
            return Err(err(
                format!("{FIELD}.mode"),
                format!("mode {m:?} is not supported yet; only \"Local\""),
            ));
        }
        Some(_) => {
            return Err(err(
                format!("{FIELD}.mode"),
                "must be one of Local, Proxy, Direct, Unmanaged",
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
    })
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
                            "mode": {"type": "string", "enum": ["Local"], "default": "Local"}
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
                "addons.registry.mode: mode \"Proxy\" is not supported yet; only \"Local\"",
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
