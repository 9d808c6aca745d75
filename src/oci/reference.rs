//! Image references (`registry.k8s.io/pause:3.10`, `nginx`, `repo@sha256:…`), normalised as
//! containerd and Docker do, and the path rule of containerd's `_default` mirror.
//!
//! With a `_default` mirror in `certs.d`, containerd asks the mirror for an image at the
//! repository path it would ask the image's own registry for, and names that registry in the
//! `ns` query parameter: `registry.k8s.io/pause:3.10` becomes
//! `GET /v2/pause/manifests/3.10?ns=registry.k8s.io`. So whatever fills the mirror must
//! push each image to `<mirror>/<repository>`, dropping the registry host.
//! [`ImageReference::mirror_path`] is the one place that rule lives.

use std::fmt;

use oci_spec::image::Digest;

use super::{valid_repository, valid_tag};

/// The registry of references without one (`nginx`, `library/nginx`).
pub const DOCKER_HUB: &str = "docker.io";

/// Where Docker Hub's registry API answers: `docker.io` itself does not.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A parsed, normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageReference {
    /// Registry host, with its port when one was given: `registry.k8s.io`, `127.0.0.1:5000`.
    pub registry: String,
    /// Repository path in that registry: `pause`, `library/nginx`.
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

/// Where the `_default` mirror serves an image: the request containerd sends for it is
/// `GET /v2/{repository}/manifests/{reference}?ns={ns}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorPath {
    pub repository: String,
    /// The digest when the reference has one (containerd then asks by digest), else the tag.
    pub reference: String,
    /// The image's own registry, as containerd puts it in `ns`.
    pub ns: String,
}

impl ImageReference {
    /// Parses a reference the way containerd and Docker read one. The first path component
    /// is a registry host when it holds a `.` or a `:` or is `localhost`; otherwise the image
    /// is on Docker Hub, where a one-component name lives under `library/`. A reference
    /// with neither tag nor digest means `latest`.
    pub fn parse(input: &str) -> Result<ImageReference, String> {
        let s = input.trim();
        if s.is_empty() {
            return Err("empty image reference".into());
        }
        let bad = |why: &str| format!("image reference {s:?}: {why}");
        let (name_tag, digest) = match s.split_once('@') {
            Some((n, d)) => {
                let digest: Digest = d
                    .parse()
                    .map_err(|e| bad(&format!("bad digest {d:?}: {e}")))?;
                (n, Some(digest))
            }
            None => (s, None),
        };
        // A tag follows the last ':' after the last '/'; a ':' before that is a port.
        let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_tag[last_slash..].rfind(':') {
            Some(i) => {
                let at = last_slash + i;
                (&name_tag[..at], Some(name_tag[at + 1..].to_string()))
            }
            None => (name_tag, None),
        };
        if let Some(tag) = &tag {
            if !valid_tag(tag) {
                return Err(bad(&format!("bad tag {tag:?}")));
            }
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        if registry.is_empty() || registry.contains(|c: char| c.is_whitespace() || c == '?') {
            return Err(bad("bad registry host"));
        }
        let registry = if registry == "index.docker.io" || registry == DOCKER_HUB_API {
            DOCKER_HUB.to_string()
        } else {
            registry
        };
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        if !valid_repository(&repository) {
            return Err(bad(&format!(
                "bad repository name {repository:?} (lower-case letters, digits and . _ - separators)"
            )));
        }
        let tag = match (&tag, &digest) {
            (None, None) => Some("latest".to_string()),
            _ => tag,
        };
        Ok(ImageReference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The tag, or the digest when there is no tag: what to ask the registry for.
    pub fn reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".into(),
        }
    }

    /// The host whose registry API serves this image (Docker Hub answers elsewhere).
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// Where containerd's `_default` mirror is asked for this image: the same repository
    /// path as on its own registry, with that registry in `ns`. An image must be pushed to
    /// `<mirror>/<repository>` for nodes to find it there.
    pub fn mirror_path(&self) -> MirrorPath {
        MirrorPath {
            repository: self.repository.clone(),
            reference: self.reference(),
            ns: self.registry.clone(),
        }
    }

    /// The same image under another tag (digest dropped).
    pub fn with_tag(&self, tag: &str) -> ImageReference {
        ImageReference {
            tag: Some(tag.to_string()),
            digest: None,
            ..self.clone()
        }
    }
}

impl fmt::Display for ImageReference {
    /// The full, normalised form: `docker.io/library/nginx:1.27`, `registry.k8s.io/pause@sha256:…`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for ImageReference {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ImageReference::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn parse(s: &str) -> ImageReference {
        ImageReference::parse(s).unwrap()
    }

    #[test]
    fn normalises_docker_hub_names() {
        for short in [
            "nginx",
            "nginx:latest",
            "library/nginx",
            "docker.io/nginx",
            "docker.io/library/nginx:latest",
            "index.docker.io/library/nginx",
        ] {
            assert_eq!(
                parse(short).to_string(),
                "docker.io/library/nginx:latest",
                "{short}"
            );
        }
        let r = parse("bitnami/redis:7");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("docker.io", "bitnami/redis")
        );
        assert_eq!(r.api_host(), DOCKER_HUB_API);
    }

    #[test]
    fn registry_hosts_ports_tags_and_digests() {
        let r = parse("registry.k8s.io/pause:3.10");
        assert_eq!(r.registry, "registry.k8s.io");
        assert_eq!(r.repository, "pause");
        assert_eq!(r.tag.as_deref(), Some("3.10"));
        let r = parse("127.0.0.1:5000/team/app");
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "team/app");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        let r = parse("localhost/app:v1");
        assert_eq!(r.registry, "localhost");
        let r = parse(&format!("quay.io/a/b:v1@{D}"));
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.reference(), D);
        let r = parse(&format!("ghcr.io/a/b@{D}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.to_string(), format!("ghcr.io/a/b@{D}"));
        assert_eq!(
            parse("reg:5000/a:v2").with_tag("v3").to_string(),
            "reg:5000/a:v3"
        );
    }

    #[test]
    fn default_mirror_path_rule() {
        // containerd asks the `_default` mirror for registry.k8s.io/pause:3.10 as
        // /v2/pause/manifests/3.10?ns=registry.k8s.io.
        assert_eq!(
            parse("registry.k8s.io/pause:3.10").mirror_path(),
            MirrorPath {
                repository: "pause".into(),
                reference: "3.10".into(),
                ns: "registry.k8s.io".into()
            }
        );
        let p = parse("nginx").mirror_path();
        assert_eq!(
            (p.repository.as_str(), p.ns.as_str()),
            ("library/nginx", "docker.io")
        );
        let p = parse("docker.io/library/nginx:1.27").mirror_path();
        assert_eq!(p.repository, "library/nginx");
        assert_eq!(p.reference, "1.27");
        let p = parse(&format!("registry.k8s.io/coredns/coredns:v1.11.1@{D}")).mirror_path();
        assert_eq!(p.repository, "coredns/coredns");
        assert_eq!(
            p.reference, D,
            "containerd asks by digest when there is one"
        );
    }

    #[test]
    fn refuses_bad_references() {
        for bad in [
            "",
            "  ",
            "Nginx",
            "nginx:",
            "nginx:-x",
            "nginx@sha256:short",
            "nginx@",
            "a//b",
            "reg.io/",
            "reg.io/a b",
            "/a",
        ] {
            assert!(ImageReference::parse(bad).is_err(), "{bad:?} was accepted");
        }
        let err = ImageReference::parse("reg.io/UPPER:1").unwrap_err();
        assert!(
            err.contains("reg.io/UPPER:1") && err.contains("UPPER"),
            "{err}"
        );
    }
}
