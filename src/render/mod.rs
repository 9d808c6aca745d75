//! The registry objects for one cluster, rendered once for `render`, the direct deployer and
//! the Helm values; and the `render` command: every object the hooks would create for a
//! Cluster manifest, offline, as multi-document YAML.

pub mod objects;
pub mod registry;

use std::io::Read;
use std::path::Path;

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_json::Value;
use time::OffsetDateTime;

use crate::addon::modes::{self, UpstreamSecrets};
use crate::addon::users::{self, Credentials, RegistryAuth};
use crate::certs::{self, CertInfo, CertificateAuthority};
use crate::cli::{AddonOptions, Deployer, RenderArgs};
use crate::hooks::patches::containerd;
use crate::names;
use crate::wire::cluster::Cluster;
use crate::wire::variable::registry_from_config;

/// Stands in for key material in `render` output unless `--show-secrets` is given.
pub const REDACTED: &str = "<redacted>";
/// Stands in for the Cluster's uid when the manifest has none (it is assigned by the API server).
pub const UID_PLACEHOLDER: &str = "<cluster-uid>";

pub async fn run_cli(args: RenderArgs) -> anyhow::Result<()> {
    let text = read_input(&args.file)?;
    let cluster = cluster_from_manifest(&text)
        .with_context(|| format!("reading a Cluster from {}", args.file.display()))?;
    let root_ca = match &args.root_ca_dir {
        Some(dir) => Some(load_root_ca(dir)?),
        None => None,
    };
    let rendered = render(&cluster, &args.addon, &args.namespace, root_ca)?;
    print!("{}", to_yaml(&rendered, args.show_secrets)?);
    Ok(())
}

fn read_input(path: &Path) -> anyhow::Result<String> {
    if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the Cluster manifest from stdin")?;
        return Ok(text);
    }
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// The Cluster of a YAML or JSON manifest (the first `kind: Cluster` document of a stream, or
/// the only document). A missing namespace is `default`; a missing uid gets a placeholder.
pub fn cluster_from_manifest(text: &str) -> anyhow::Result<Cluster> {
    let mut documents = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let value = Value::deserialize(document).context("invalid YAML or JSON")?;
        if !value.is_null() {
            documents.push(value);
        }
    }
    let mut value = match documents.iter().position(|d| d["kind"] == "Cluster") {
        Some(i) => documents.swap_remove(i),
        None if documents.len() == 1 => documents.remove(0),
        None => bail!("no document of kind Cluster"),
    };
    if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        for (field, default) in [("namespace", "default"), ("uid", UID_PLACEHOLDER)] {
            if meta
                .get(field)
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                meta.insert(field.into(), Value::String(default.into()));
            }
        }
    }
    Cluster::from_value(&value).map_err(anyhow::Error::msg)
}

/// Root CA files: `tls.crt` + `tls.key` (a Secret's keys, e.g. from `kubectl get secret`) or
/// `ca.crt` + `ca.key`.
pub fn load_root_ca(dir: &Path) -> anyhow::Result<CertificateAuthority> {
    for (cert, key) in [("tls.crt", "tls.key"), ("ca.crt", "ca.key")] {
        let (cert_path, key_path) = (dir.join(cert), dir.join(key));
        if cert_path.exists() && key_path.exists() {
            let cert_pem = std::fs::read_to_string(&cert_path)
                .with_context(|| format!("reading {}", cert_path.display()))?;
            let key_pem = std::fs::read_to_string(&key_path)
                .with_context(|| format!("reading {}", key_path.display()))?;
            return CertificateAuthority::from_pem(&cert_pem, &key_pem)
                .with_context(|| format!("root CA in {}", dir.display()));
        }
    }
    bail!(
        "{}: expected tls.crt and tls.key, or ca.crt and ca.key",
        dir.display()
    )
}

/// What the hooks would create for `cluster`, in order: the root CA Secret (only when none
/// was given: the hooks would generate it), the cluster's CA copy, the `ro` and `rw` user
/// Secrets and the nodes' containerd hosts Secret, the registry Namespace, auth and TLS
/// Secrets (and in Proxy and Direct the upstream Secret, its values placeholders), then the
/// HelmChartProxy or the registry objects of the mode, depending on the deployer.
pub fn render(
    cluster: &Cluster,
    options: &AddonOptions,
    namespace: &str,
    root_ca: Option<CertificateAuthority>,
) -> anyhow::Result<Vec<Value>> {
    let Some(registry) = registry_from_config(cluster.variable(&options.variable_name))
        .with_context(|| {
            format!(
                "cluster {}: invalid variable {}",
                cluster.key(),
                options.variable_name
            )
        })?
    else {
        return Ok(Vec::new());
    };
    let service_ip = registry
        .resolve_service_ip(cluster.service_cidrs())
        .with_context(|| format!("cluster {}", cluster.key()))?;
    let now = OffsetDateTime::now_utc();
    let mut out = Vec::new();
    let ca = match root_ca {
        Some(ca) => ca,
        None => {
            let ca = CertificateAuthority::generate(options.key_algorithm, now)?;
            out.push(objects::root_ca_secret(namespace, &ca));
            ca
        }
    };
    out.push(objects::cluster_ca_secret(cluster, ca.cert_pem()));
    // The users as BeforeClusterCreate would create them: fresh passwords each run.
    let user = |name: &str| {
        let credentials = Credentials {
            username: name.to_string(),
            password: users::generate_password(),
        };
        let secret = users::user_secret(cluster, &credentials);
        let stored = users::read_user_secret(&secret).map_err(anyhow::Error::msg)?;
        Ok::<_, anyhow::Error>((secret, stored))
    };
    let (ro_secret, ro) = user(names::READ_ONLY_USER)?;
    let (rw_secret, rw) = user(names::READ_WRITE_USER)?;
    out.push(ro_secret);
    out.push(rw_secret);
    out.push(objects::containerd_hosts_secret(
        cluster,
        &containerd::bootstrap_hosts_toml(
            containerd::Route::of(&registry).as_ref(),
            service_ip,
            &ro.credentials,
        ),
    ));
    out.push(objects::registry_namespace());
    out.push(
        RegistryAuth::desired(None, &ro, &rw)
            .map_err(anyhow::Error::msg)?
            .secret(),
    );
    let subject = certs::registry_subject_names(registry.replicas, service_ip);
    let server = ca.issue_server(&subject, options.key_algorithm, now)?;
    out.push(objects::registry_tls_secret(&server, ca.cert_pem()));
    // Proxy's and Direct's upstream Secret, as converge copies it; offline, its values are
    // placeholders naming where they come from.
    if let Some(upstream) = registry
        .upstream
        .as_ref()
        .filter(|_| registry.mode.needs_upstream())
    {
        let from =
            |name: &str, key: &str| format!("<key {key} of secret {}/{name}>", cluster.namespace());
        let secrets = UpstreamSecrets {
            credentials: upstream
                .credentials_secret
                .as_ref()
                .map(|name| (from(name, "username"), from(name, "password"))),
            ca_pem: upstream.ca_secret.as_ref().map(|name| from(name, "ca.crt")),
        };
        out.push(modes::upstream_secret(&secrets));
    }
    let hash = CertInfo::from_pem(&server.cert_pem)?.sha256_hex();
    let values = registry::RegistryValues::new(options, &registry, service_ip, hash);
    match options.deployer {
        Deployer::Helmchartproxy => {
            out.push(objects::helm_chart_proxy(cluster, options, &values)?);
        }
        Deployer::Direct => out.extend(objects::direct_registry_objects(&values)),
    }
    Ok(out)
}

/// Multi-document YAML; every Secret value but certificates (`*.crt`) and user names replaced
/// by `<redacted>` unless `show_secrets`: keys, passwords, hashes and the files holding them.
pub fn to_yaml(objects: &[Value], show_secrets: bool) -> anyhow::Result<String> {
    let mut out = String::new();
    for object in objects {
        let mut object = object.clone();
        if !show_secrets
            && object["kind"] == "Secret"
            && let Some(data) = object.get_mut("data").and_then(Value::as_object_mut)
        {
            for (key, value) in data.iter_mut() {
                if !(key.ends_with(".crt") || key == "username") {
                    *value = Value::String(REDACTED.into());
                }
            }
        }
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&object)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_yaml_streams_and_fills_the_uid() {
        let text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n---\napiVersion: cluster.x-k8s.io/v1beta1\nkind: Cluster\nmetadata:\n  name: c1\n";
        let cluster = cluster_from_manifest(text).unwrap();
        assert_eq!(cluster.key(), "default/c1");
        assert_eq!(cluster.metadata.uid, UID_PLACEHOLDER);
        assert!(cluster_from_manifest("kind: ConfigMap\n---\nkind: Secret\n").is_err());
    }
}
