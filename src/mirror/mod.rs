//! `registry-addon mirror pull` and `mirror push`: images from their registries into an OCI
//! image layout or archive on the connected side, and from there into a cluster's mirror on
//! the air-gapped side, at the paths nodes ask for ([`crate::oci::reference`]).
//!
//! Both go through the one registry client ([`crate::oci`]): Basic and Bearer auth, digest
//! verification of every manifest and blob, bounded parallel transfers.

pub mod layout;
pub mod progress;
pub mod pull;
pub mod push;

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use crate::oci::{ClientOptions, Credentials, HttpClients, build_http_clients};
use crate::sync::CredentialSet;

#[derive(Debug, Clone, Args)]
pub struct MirrorArgs {
    #[command(subcommand)]
    pub command: MirrorCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum MirrorCommand {
    /// Copy images from their registries into an OCI image layout, or an OCI archive when
    /// PATH ends in `.tar`. A rerun resumes: blobs already there are not fetched again.
    Pull(PullArgs),
    /// Push every image of a layout or archive into a registry, at the repository paths
    /// containerd asks its `_default` mirror for.
    Push(PushArgs),
}

#[derive(Debug, Clone, Args)]
pub struct PullArgs {
    /// Full image references: `registry.k8s.io/pause:3.10`, `docker.io/library/nginx:1.27`,
    /// `repo@sha256:…`.
    #[arg(value_name = "IMAGE")]
    pub images: Vec<String>,
    /// A file with one image reference per line; `#` starts a comment.
    #[arg(long = "images", value_name = "FILE")]
    pub images_file: Option<PathBuf>,
    /// The layout directory, or an archive when it ends in `.tar`.
    #[arg(long, value_name = "PATH")]
    pub to: PathBuf,
    /// Copy only this platform of multi-platform images (`os/arch` or `os/arch/variant`;
    /// repeatable). Default: every platform.
    #[arg(long = "platform", value_name = "OS/ARCH")]
    pub platforms: Vec<String>,
    /// Docker `config.json` with credentials per registry (`auths`).
    #[arg(long, value_name = "FILE")]
    pub auth_file: Option<PathBuf>,
    /// PEM bundle of the CAs to trust instead of the system's.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// No progress and no per-image lines; failures are still printed.
    #[arg(long, short)]
    pub quiet: bool,
    /// Images copied at once.
    #[arg(long, default_value_t = 4, hide = true)]
    pub parallel_images: usize,
}

#[derive(Debug, Clone, Args)]
pub struct PushArgs {
    /// The layout directory, or an archive ending in `.tar`.
    #[arg(long, value_name = "PATH")]
    pub from: PathBuf,
    /// The registry: `https://host[:port]`.
    #[arg(long, value_name = "URL")]
    pub to: String,
    /// User name; the password is read from stdin (`--password-stdin`).
    #[arg(long, requires = "password_stdin", conflicts_with = "credentials_file")]
    pub username: Option<String>,
    /// Read the password from stdin (one line).
    #[arg(long, requires = "username")]
    pub password_stdin: bool,
    /// A file holding `user:password`, or JSON (`{"username", "password"}` or a Docker
    /// `config.json`).
    #[arg(long, value_name = "FILE")]
    pub credentials_file: Option<PathBuf>,
    /// PEM bundle of the CAs to trust instead of the system's.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Where images whose layout name is only a tag (as `skopeo copy … oci:DIR:TAG` writes)
    /// go: an image name such as `registry.k8s.io/pause` or `nginx`, mapped by the same rule
    /// as full names.
    #[arg(long, value_name = "NAME")]
    pub repository: Option<String>,
    /// No progress and no per-image lines; failures are still printed.
    #[arg(long, short)]
    pub quiet: bool,
    /// Images pushed at once.
    #[arg(long, default_value_t = 4, hide = true)]
    pub parallel_images: usize,
}

/// Runs `mirror pull` or `mirror push`. Fails when any image failed; each failure has been
/// printed with its reference and reason.
pub async fn run(args: MirrorArgs) -> anyhow::Result<()> {
    match args.command {
        MirrorCommand::Pull(args) => pull::run(args).await,
        MirrorCommand::Push(args) => {
            let password = if args.password_stdin {
                Some(read_password_stdin()?)
            } else {
                None
            };
            push::run(args, password).await
        }
    }
}

fn read_password_stdin() -> anyhow::Result<String> {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
        .context("--password-stdin: cannot read stdin")?;
    let password = text.trim_end_matches(['\n', '\r']).to_string();
    if password.is_empty() {
        bail!("--password-stdin: stdin held no password");
    }
    Ok(password)
}

/// The HTTP clients, trusting only `ca_file` when given.
pub(crate) fn http_clients(ca_file: Option<&Path>) -> anyhow::Result<HttpClients> {
    let ca = match ca_file {
        Some(path) => {
            Some(std::fs::read(path).with_context(|| format!("--ca-file {}", path.display()))?)
        }
        None => None,
    };
    build_http_clients(ca.as_deref())
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| match ca_file {
            Some(path) => format!("--ca-file {}", path.display()),
            None => "TLS set-up".into(),
        })
}

pub(crate) fn client_options(credentials: Option<Credentials>) -> ClientOptions {
    ClientOptions {
        credentials,
        attempts: 3,
        backoff: std::time::Duration::from_millis(300),
        ..ClientOptions::default()
    }
}

/// Credentials of `host` in a Docker `config.json` (Docker Hub's entry is keyed
/// `https://index.docker.io/v1/`).
pub(crate) fn credentials_for(set: &CredentialSet, host: &str) -> Option<Credentials> {
    if host == crate::oci::reference::DOCKER_HUB_API {
        for key in ["docker.io", "index.docker.io/v1", "index.docker.io", host] {
            if let Some(c) = set.by_host.get(key) {
                return Some(c.clone());
            }
        }
    }
    set.for_host(host)
}

/// An error with its causes, on one line.
pub(crate) fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_credentials_by_host() {
        let set = CredentialSet::parse(
            r#"{"auths": {
                "https://index.docker.io/v1/": {"auth": "aHViOmh1Yi1wdw=="},
                "127.0.0.1:5000": {"username": "u", "password": "p"}}}"#,
        )
        .unwrap();
        let hub = credentials_for(&set, crate::oci::reference::DOCKER_HUB_API).unwrap();
        assert_eq!(
            (hub.username.as_str(), hub.password.as_str()),
            ("hub", "hub-pw")
        );
        assert_eq!(
            credentials_for(&set, "127.0.0.1:5000").unwrap().username,
            "u"
        );
        assert!(credentials_for(&set, "quay.io").is_none());
    }
}
