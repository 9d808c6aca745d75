//! The mirror probe: from the node, with the files exactly as they are on disk (the
//! `_default` hosts file, each host's `ca` file and `Authorization` header), TLS to every
//! mirror host verifies and `GET /v2/` answers 200.

use std::path::Path;
use std::time::Duration;

use crate::hooks::patches::containerd::{DEFAULT_HOSTS_FILE, HostsFile};

/// What a probe found, as the Node condition says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    pub ready: bool,
    /// CamelCase: `MirrorReachable`, `CertificateUntrusted`, `Unauthorized`, `Unreachable`,
    /// `UnexpectedStatus`, `NotConfigured`.
    pub reason: &'static str,
    /// What was found and what to do next; never a credential.
    pub message: String,
}

pub const REASONS: [&str; 6] = [
    "MirrorReachable",
    "CertificateUntrusted",
    "Unauthorized",
    "Unreachable",
    "UnexpectedStatus",
    "NotConfigured",
];

fn failed(reason: &'static str, message: String) -> ProbeResult {
    ProbeResult {
        ready: false,
        reason,
        message,
    }
}

/// The hosts files the agent wrote (`_default/hosts.toml` in Local, the upstream host's in
/// Proxy and Direct; none in Unmanaged), or `_default/hosts.toml` before it applied any
/// config (bootstrap files).
fn hosts_files(certs_dir: &Path) -> Vec<std::path::PathBuf> {
    let manifest = super::files::CertsDir::new(certs_dir.to_path_buf()).manifest();
    let owned: Vec<_> = manifest
        .files
        .keys()
        .filter(|path| path.ends_with("/hosts.toml"))
        .filter_map(|path| super::files::owned_path(certs_dir, path).ok())
        .collect();
    let applied = certs_dir.join(crate::names::NODE_AGENT_MANIFEST).exists();
    if owned.is_empty() && !applied {
        return vec![certs_dir.join(DEFAULT_HOSTS_FILE)];
    }
    owned
}

/// Probes every host of every hosts file of the addon; the first failure is the result.
pub async fn probe(certs_dir: &Path, timeout: Duration) -> ProbeResult {
    let files = hosts_files(certs_dir);
    if files.is_empty() {
        return failed(
            "NotConfigured",
            "no mirror is configured on this node (mode Unmanaged): images are pulled from their registries".into(),
        );
    }
    let mut urls: Vec<String> = Vec::new();
    for hosts_path in files {
        match probe_file(&hosts_path, timeout).await {
            Ok(found) => urls.extend(found),
            Err(result) => return result,
        }
    }
    urls.dedup();
    ProbeResult {
        ready: true,
        reason: "MirrorReachable",
        message: format!(
            "{} answers /v2/ with the node's CA and credentials",
            urls.join(", ")
        ),
    }
}

async fn probe_file(hosts_path: &Path, timeout: Duration) -> Result<Vec<String>, ProbeResult> {
    let hosts = match std::fs::read_to_string(hosts_path)
        .map_err(|e| e.to_string())
        .and_then(|text| toml::from_str::<HostsFile>(&text).map_err(|e| e.message().to_string()))
    {
        Ok(hosts) if !hosts.host.is_empty() => hosts,
        Ok(_) => {
            return Err(failed(
                "NotConfigured",
                format!("{} lists no mirror host", hosts_path.display()),
            ));
        }
        Err(e) => {
            return Err(failed(
                "NotConfigured",
                format!(
                    "cannot read {}: {e}; the agent rewrites it from the desired config",
                    hosts_path.display()
                ),
            ));
        }
    };
    let mut urls: Vec<String> = Vec::new();
    for (url, entry) in &hosts.host {
        probe_host(url, entry, timeout).await?;
        urls.push(url.clone());
    }
    Ok(urls)
}

async fn probe_host(
    url: &str,
    entry: &crate::hooks::patches::containerd::HostEntry,
    timeout: Duration,
) -> Result<(), ProbeResult> {
    let ca_pem = match entry.ca.as_deref() {
        Some(path) => std::fs::read(path).map_err(|e| {
            failed(
                "CertificateUntrusted",
                format!("{url}: cannot read CA file {path}: {e}"),
            )
        })?,
        None => {
            return Err(failed(
                "CertificateUntrusted",
                format!("{url}: hosts.toml names no CA file"),
            ));
        }
    };
    let client = crate::oci::client::build_http_client(Some(&ca_pem)).map_err(|e| {
        failed(
            "CertificateUntrusted",
            format!(
                "{url}: CA file {}: {e}",
                entry.ca.as_deref().unwrap_or_default()
            ),
        )
    })?;
    verify_tls(url, &ca_pem, timeout).await.map_err(|reason| {
        failed(
            "CertificateUntrusted",
            format!(
                "{url}: the server certificate does not verify against {}: {reason}; the node's CA bundle is out of date",
                entry.ca.as_deref().unwrap_or_default()
            ),
        )
    })?;
    let mut request = client
        .get(format!("{}/v2/", url.trim_end_matches('/')))
        .timeout(timeout);
    for (name, value) in &entry.header {
        request = request.header(name, value);
    }
    match request.send().await {
        Ok(response) => match response.status().as_u16() {
            200 => Ok(()),
            401 | 403 => Err(failed(
                "Unauthorized",
                format!(
                    "{url} refused the node's credentials ({}): the ro password in {DEFAULT_HOSTS_FILE} is stale; check the registry-node-config Secret",
                    response.status()
                ),
            )),
            _ => Err(failed(
                "UnexpectedStatus",
                format!(
                    "{url}/v2/ answered {}; check the registry pods",
                    response.status()
                ),
            )),
        },
        Err(e) => Err(failed(
            "Unreachable",
            format!(
                "{url}: {}; check the registry Service and pods",
                if e.is_timeout() {
                    "timed out".to_string()
                } else {
                    error_chain(&e)
                }
            ),
        )),
    }
}

/// The error and its causes, `: `-separated (reqwest's own message names only the URL).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(err) = source {
        out.push_str(": ");
        out.push_str(&err.to_string());
        source = err.source();
    }
    out
}

/// A TLS handshake with `url`'s host trusting only `ca_pem`: `Err` with rustls' reason when the
/// certificate does not verify. A host that cannot be reached passes here and fails the GET.
async fn verify_tls(url: &str, ca_pem: &[u8], timeout: Duration) -> Result<(), String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName};
    let Some(authority) = url
        .strip_prefix("https://")
        .map(|a| a.trim_end_matches('/'))
    else {
        return Err("not an https:// host".into());
    };
    let uri: http::Uri = format!("https://{authority}/")
        .parse()
        .map_err(|_| format!("bad host {authority:?}"))?;
    let host = uri.host().unwrap_or_default();
    let port = uri.port_u16().unwrap_or(443);
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(bare.to_string()).map_err(|e| e.to_string())?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem).flatten() {
        let _ = roots.add(cert);
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let Ok(Ok(tcp)) =
        tokio::time::timeout(timeout, tokio::net::TcpStream::connect((bare, port))).await
    else {
        return Ok(());
    };
    match tokio::time::timeout(timeout, connector.connect(name, tcp)).await {
        Ok(Ok(_)) | Err(_) => Ok(()),
        Ok(Err(e)) => match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(tls) => Err(tls.to_string()),
            // Reset or closed during the handshake: a reachability problem, left to the GET.
            None => Ok(()),
        },
    }
}
