//! Errors of the registry client. Every variant names the registry and, where there is one,
//! the repository and reference, so a log line alone says what failed where.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum OciError {
    #[error("registry {registry}: {what}: {source}")]
    Transport {
        registry: String,
        what: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("registry {registry}: {what}: HTTP {status}{}", detail_suffix(.detail))]
    Status {
        registry: String,
        what: String,
        status: u16,
        detail: String,
    },
    #[error("registry {registry}: {what}: authentication failed: {reason}")]
    Auth {
        registry: String,
        what: String,
        reason: String,
    },
    /// Authenticated, and not allowed: the user may not do this (a pull-only user pushing).
    #[error("registry {registry}: {what}: refused (HTTP 403): these credentials do not allow it{}", detail_suffix(.detail))]
    Denied {
        registry: String,
        what: String,
        detail: String,
    },
    #[error("registry {registry}: {what}: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        registry: String,
        what: String,
        expected: String,
        actual: String,
    },
    #[error("registry {registry}: {what}: invalid response: {reason}")]
    Invalid {
        registry: String,
        what: String,
        reason: String,
    },
    #[error(
        "registry {registry}: {what}: the registry refused a monolithic upload (HTTP {status})"
    )]
    MonolithicRefused {
        registry: String,
        what: String,
        status: u16,
    },
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

impl OciError {
    /// Worth trying again: the network, the server's temporary trouble, or a throttle.
    pub fn is_transient(&self) -> bool {
        match self {
            OciError::Transport { .. } => true,
            OciError::Status { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            // A corrupt transfer may be a flaky link; a fresh copy may well succeed.
            OciError::DigestMismatch { .. } => true,
            _ => false,
        }
    }

    /// HTTP status of the failure, when the registry answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            OciError::Status { status, .. } | OciError::MonolithicRefused { status, .. } => {
                Some(*status)
            }
            _ => None,
        }
    }
}
