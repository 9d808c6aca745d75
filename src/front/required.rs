//! `front --require-images FILE`: the front reports ready only once the registry behind it
//! holds every image the file lists. During a switch to Local the controller lists there the
//! images in use (ConfigMap `registry-system/registry-images-in-use`, mounted into the pod),
//! so a replica joins the Service's endpoints only when it can serve them all, and the switch
//! completes only once every replica is ready.
//!
//! The file holds one `repository:tag` or `repository@digest` per line, as the `_default`
//! mirror is asked for an image (the registry host dropped); blank lines and `#` comments are
//! skipped. A missing or empty file requires nothing. It is reread when it changes; once every
//! listed image was found, they are not asked for again until it does.

use std::path::PathBuf;

use futures::StreamExt;

use super::proxy::Upstream;

/// At most this many manifest HEADs at once.
const CONCURRENCY: usize = 16;

/// One listed image: repository and tag or digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub repository: String,
    pub reference: String,
}

impl std::fmt::Display for Listed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let separator = if self.reference.contains(':') {
            '@'
        } else {
            ':'
        };
        write!(f, "{}{separator}{}", self.repository, self.reference)
    }
}

/// The images `text` lists, or the first line that is not one.
pub fn parse(text: &str) -> Result<Vec<Listed>, String> {
    let mut images = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let bad = || {
            format!(
                "line {}: {line:?} is not repository:tag or repository@digest",
                number + 1
            )
        };
        let (repository, reference) = match line.split_once('@') {
            Some((repository, digest)) => (repository, digest),
            None => {
                let last_slash = line.rfind('/').map_or(0, |i| i + 1);
                let colon = line[last_slash..].rfind(':').ok_or_else(bad)?;
                (&line[..last_slash + colon], &line[last_slash + colon + 1..])
            }
        };
        if !crate::oci::valid_repository(repository) || reference.is_empty() {
            return Err(bad());
        }
        images.push(Listed {
            repository: repository.to_string(),
            reference: reference.to_string(),
        });
    }
    Ok(images)
}

/// What the registry lacks of the listed images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lacking {
    /// It holds them all (or nothing is listed).
    Nothing,
    /// `missing` of `of` are not there (or could not be asked for).
    Images {
        missing: usize,
        of: usize,
        first: String,
    },
    /// The file cannot be read or parsed.
    BadFile(String),
}

/// The requirement and what was last found.
pub struct Required {
    file: PathBuf,
    /// The file content all of whose images were found.
    satisfied: Option<String>,
    last: Option<Lacking>,
}

impl Required {
    pub fn new(file: PathBuf) -> Required {
        Required {
            file,
            satisfied: None,
            last: None,
        }
    }

    /// Whether `upstream` holds every listed image; logs when that changes.
    pub async fn holds_all(&mut self, upstream: &Upstream) -> bool {
        let text = match std::fs::read_to_string(&self.file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                let found = Lacking::BadFile(format!("{}: {e}", self.file.display()));
                return self.record(found);
            }
        };
        if self.satisfied.as_deref() == Some(text.as_str()) {
            return true;
        }
        let found = match parse(&text) {
            Err(e) => Lacking::BadFile(format!("{}: {e}", self.file.display())),
            Ok(images) => lacking(upstream, &images).await,
        };
        if found == Lacking::Nothing {
            self.satisfied = Some(text);
        }
        self.record(found)
    }

    fn record(&mut self, found: Lacking) -> bool {
        let holds = found == Lacking::Nothing;
        if self.last.as_ref() != Some(&found) {
            match &found {
                Lacking::Nothing => {
                    tracing::info!(file = %self.file.display(), "the registry holds every image the file lists")
                }
                Lacking::Images { missing, of, first } => tracing::warn!(
                    missing, of, %first,
                    "not ready: {missing} of {of} images in use are missing from the registry; first: {first}"
                ),
                Lacking::BadFile(why) => {
                    tracing::warn!("not ready: the images to hold cannot be read: {why}")
                }
            }
            self.last = Some(found);
        }
        holds
    }
}

async fn lacking(upstream: &Upstream, images: &[Listed]) -> Lacking {
    // Owned futures: they run inside the spawned readiness task.
    let checks = images.iter().cloned().map(|image| {
        let upstream = upstream.clone();
        async move {
            upstream
                .has_manifest(&image.repository, &image.reference)
                .await
        }
    });
    let found: Vec<bool> = futures::stream::iter(checks)
        .buffered(CONCURRENCY)
        .collect()
        .await;
    let missing: Vec<&Listed> = images
        .iter()
        .zip(&found)
        .filter(|(_, found)| !**found)
        .map(|(image, _)| image)
        .collect();
    match missing.first() {
        None => Lacking::Nothing,
        Some(first) => Lacking::Images {
            missing: missing.len(),
            of: images.len(),
            first: first.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_tags_or_digests_comments_skipped() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let text = format!("# images in use\npause:3.10\n\nteam/app@{digest}\nlocalhost/x:1 # c\n");
        let images = parse(&text).unwrap();
        assert_eq!(
            images.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "pause:3.10",
                format!("team/app@{digest}").as_str(),
                "localhost/x:1"
            ]
        );
    }

    #[test]
    fn a_bad_line_is_named() {
        let err = parse("pause:3.10\nUPPER:1\n").unwrap_err();
        assert!(err.starts_with("line 2:"), "{err}");
        assert!(parse("no-tag\n").unwrap_err().contains("no-tag"));
    }
}
