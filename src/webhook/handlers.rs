//! The one table of handlers. Discovery is derived from it and requests are routed by it, so
//! the two cannot disagree.

use crate::names::HOOKS_API_VERSION;
use crate::wire::runtime::{ExtensionHandler, FailurePolicy, GroupVersionHook, Hook};

/// One advertised handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandlerSpec {
    pub hook: Hook,
    /// DNS-1123 label, unique; the last path segment of the handler's URL.
    pub name: &'static str,
    pub timeout_seconds: i32,
    pub failure_policy: FailurePolicy,
}

/// Every handler this addon implements. All hooks here exist since CAPI v1.9.
pub const HANDLERS: [HandlerSpec; 7] = [
    HandlerSpec {
        hook: Hook::BeforeClusterCreate,
        name: "before-cluster-create",
        timeout_seconds: 10,
        failure_policy: FailurePolicy::Fail,
    },
    HandlerSpec {
        hook: Hook::AfterControlPlaneInitialized,
        name: "after-control-plane-initialized",
        timeout_seconds: 10,
        failure_policy: FailurePolicy::Fail,
    },
    HandlerSpec {
        hook: Hook::BeforeClusterUpgrade,
        name: "before-cluster-upgrade",
        timeout_seconds: 10,
        failure_policy: FailurePolicy::Fail,
    },
    HandlerSpec {
        hook: Hook::BeforeClusterDelete,
        name: "before-cluster-delete",
        timeout_seconds: 10,
        failure_policy: FailurePolicy::Fail,
    },
    HandlerSpec {
        hook: Hook::GeneratePatches,
        name: "generate-patches",
        timeout_seconds: 10,
        failure_policy: FailurePolicy::Fail,
    },
    HandlerSpec {
        hook: Hook::ValidateTopology,
        name: "validate-topology",
        timeout_seconds: 10,
        failure_policy: FailurePolicy::Fail,
    },
    HandlerSpec {
        hook: Hook::DiscoverVariables,
        name: "discover-variables",
        timeout_seconds: 10,
        failure_policy: FailurePolicy::Fail,
    },
];

/// The handlers advertised for `--hooks` (empty: all of them).
pub fn advertised(hooks: &[Hook]) -> Vec<HandlerSpec> {
    HANDLERS
        .iter()
        .filter(|h| hooks.is_empty() || hooks.contains(&h.hook))
        .copied()
        .collect()
}

/// The discovery entries of `handlers`.
pub fn discovery(handlers: &[HandlerSpec]) -> Vec<ExtensionHandler> {
    handlers
        .iter()
        .map(|h| ExtensionHandler {
            name: h.name.to_string(),
            request_hook: GroupVersionHook {
                api_version: HOOKS_API_VERSION.to_string(),
                hook: h.hook.name().to_string(),
            },
            timeout_seconds: h.timeout_seconds,
            failure_policy: h.failure_policy,
        })
        .collect()
}

/// The handler a request path names (`<lowercase hook>/<handler name>` after the prefix).
pub fn route<'a>(handlers: &'a [HandlerSpec], rest: &str) -> Option<&'a HandlerSpec> {
    let (segment, name) = rest.split_once('/')?;
    handlers
        .iter()
        .find(|h| h.name == name && h.hook.path_segment() == segment)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::cluster::is_dns1123_label;

    #[test]
    fn table_is_valid_for_capi() {
        let mut names = std::collections::HashSet::new();
        for h in HANDLERS {
            assert!(is_dns1123_label(h.name), "{}", h.name);
            assert!(names.insert(h.name), "duplicate handler name {}", h.name);
            assert!((0..=30).contains(&h.timeout_seconds));
        }
        assert_eq!(advertised(&[]).len(), Hook::ALL.len());
    }

    #[test]
    fn routes_by_hook_and_name() {
        let all = advertised(&[]);
        let h = route(&all, "beforeclustercreate/before-cluster-create").unwrap();
        assert_eq!(h.hook, Hook::BeforeClusterCreate);
        assert!(route(&all, "beforeclustercreate/generate-patches").is_none());
        assert!(route(&all, "beforeclustercreate").is_none());
        let some = advertised(&[Hook::GeneratePatches]);
        assert!(route(&some, "beforeclustercreate/before-cluster-create").is_none());
    }
}
