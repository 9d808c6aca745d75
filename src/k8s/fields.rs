//! The fields server-side apply says a manager owns (`metadata.managedFields`), compared with
//! the object the addon wants now.
//!
//! Server-side apply prunes a field a manager stopped setting only when that manager applies
//! again. An object can therefore hold every field the addon sets, with the right values, and
//! still need an apply: when an earlier version of the addon set a field (an env var, a label,
//! a port) that this one no longer does.
//!
//! kube-apiserver records each manager's fields as a `FieldsV1` tree: `f:<name>` for a map key
//! or struct field, `k:<json>` for an element of an associative list identified by its key
//! fields (`k:{"containerPort":5000,"protocol":"TCP"}`), `v:<json>` for an element of a set,
//! `i:<n>` for a list index, and `.` for "the element itself" beside its children; a leaf is
//! `{}`. What the server owns for everyone (`apiVersion`, `kind`, `metadata.name`,
//! `metadata.namespace`, `metadata.managedFields`…) is never recorded, so it needs no special
//! case here. Anything this module cannot read counts as "apply": an extra write is cheap,
//! a missed prune is not.

use serde_json::{Map, Value};

/// Key fields kube-apiserver defaults when an applied list element omits them, so the key it
/// records can name a field the desired element does not set: container and Service ports
/// are keyed by port and `protocol`, which defaults to TCP.
const KEY_DEFAULTS: &[(&str, &str)] = &[("protocol", "TCP")];

/// Whether applying `desired` would prune something: `current`'s `Apply` entry for `manager`
/// (main resource, not a subresource) owns a field `desired` does not set, was recorded for
/// another apiVersion, or cannot be read. `false` when the manager has no such entry (the
/// object was created by someone else, or by a create): nothing of ours to prune.
pub fn apply_would_prune(current: &Value, desired: &Value, manager: &str) -> bool {
    let entries = match current.get("metadata").and_then(|m| m.get("managedFields")) {
        None | Some(Value::Null) => return false,
        Some(Value::Array(entries)) => entries,
        Some(_) => return true,
    };
    for entry in entries {
        let Some(entry) = entry.as_object() else {
            return true;
        };
        let (Some(name), Some(operation)) = (text(entry, "manager"), text(entry, "operation"))
        else {
            return true;
        };
        if name != manager || operation != "Apply" {
            continue;
        }
        match entry.get("subresource") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s.is_empty() => {}
            // e.g. `status`: fields of another resource.
            Some(Value::String(_)) => continue,
            Some(_) => return true,
        }
        // Field paths can differ between versions of a kind.
        if text(entry, "apiVersion") != desired.get("apiVersion").and_then(Value::as_str) {
            return true;
        }
        if text(entry, "fieldsType") != Some("FieldsV1") {
            return true;
        }
        match entry.get("fieldsV1") {
            Some(fields) if !owns_more_than(fields, desired) => {}
            _ => return true,
        }
    }
    false
}

fn text<'a>(entry: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    entry.get(key).and_then(Value::as_str)
}

/// Whether the `FieldsV1` set `fields_v1` holds a field `desired` does not set. A field that
/// `desired` mentions, even as `null`, counts as set: pruning is about fields dropped from the
/// applied configuration, and value differences are `contains`' business.
pub fn owns_more_than(fields_v1: &Value, desired: &Value) -> bool {
    let Some(set) = fields_v1.as_object() else {
        return true;
    };
    set.iter()
        .any(|(path, children)| match step(path, desired) {
            Some(value) => owns_more_than(children, value),
            None => true,
        })
}

/// The part of `desired` one path element of a field set addresses; `None` when `desired`
/// has no such part or the element cannot be read.
fn step<'a>(path: &str, desired: &'a Value) -> Option<&'a Value> {
    if path == "." {
        return Some(desired);
    }
    if let Some(name) = path.strip_prefix("f:") {
        return desired.as_object()?.get(name);
    }
    if let Some(key) = path.strip_prefix("k:") {
        let Ok(Value::Object(key)) = serde_json::from_str::<Value>(key) else {
            return None;
        };
        if key.is_empty() {
            return None;
        }
        return desired.as_array()?.iter().find(|element| {
            key.iter()
                .all(|(field, want)| key_field_matches(element, field, want))
        });
    }
    if let Some(value) = path.strip_prefix("v:") {
        let value: Value = serde_json::from_str(value).ok()?;
        return desired.as_array()?.iter().find(|e| same(e, &value));
    }
    if let Some(index) = path.strip_prefix("i:") {
        return desired.as_array()?.get(index.parse::<usize>().ok()?);
    }
    None
}

fn key_field_matches(element: &Value, field: &str, want: &Value) -> bool {
    let Some(element) = element.as_object() else {
        return false;
    };
    match element.get(field) {
        Some(have) => same(have, want),
        None => KEY_DEFAULTS
            .iter()
            .any(|(name, default)| *name == field && want.as_str() == Some(default)),
    }
}

/// Equality with numbers compared by value (`5000` and `5000.0` are the same port).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(a, b)| same(a, b))
        }
        (Value::Object(a), Value::Object(b)) => {
            a.len() == b.len()
                && a.iter()
                    .all(|(k, v)| b.get(k).is_some_and(|other| same(v, other)))
        }
        (a, b) => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The registry StatefulSet as the addon applies it.
    fn statefulset() -> Value {
        json!({
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {
                "name": "registry",
                "namespace": "registry-system",
                "labels": {"app.kubernetes.io/name": "registry"},
                "finalizers": ["example.com/keep"],
            },
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app.kubernetes.io/name": "registry"}},
                "template": {
                    "metadata": {"labels": {"app.kubernetes.io/name": "registry"}},
                    "spec": {
                        "containers": [
                            {
                                "name": "registry",
                                "image": "registry:2.8.3",
                                "args": ["serve", "/etc/distribution/config.yml"],
                                "env": [
                                    {"name": "REGISTRY_HTTP_ADDR", "value": ":5000"},
                                ],
                                "ports": [
                                    {"name": "registry", "containerPort": 5000, "protocol": "TCP"},
                                ],
                                "resources": {"limits": null},
                            },
                            {
                                "name": "sync",
                                "image": "registry-addon:dev",
                                "ports": [{"name": "sync-metrics", "containerPort": 9090}],
                            },
                        ],
                        "tolerations": [{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}],
                    },
                },
            },
        })
    }

    /// What kube-apiserver records for the manager that applied `statefulset()`: containers
    /// keyed by name, ports by containerPort and protocol (defaulted), finalizers as a set,
    /// the label selector and tolerations atomic.
    fn statefulset_fields() -> Value {
        json!({
            "f:metadata": {
                "f:labels": {"f:app.kubernetes.io/name": {}},
                "f:finalizers": {"v:\"example.com/keep\"": {}},
            },
            "f:spec": {
                "f:replicas": {},
                "f:selector": {},
                "f:template": {
                    "f:metadata": {"f:labels": {"f:app.kubernetes.io/name": {}}},
                    "f:spec": {
                        "f:containers": {
                            "k:{\"name\":\"registry\"}": {
                                ".": {},
                                "f:name": {},
                                "f:image": {},
                                "f:args": {},
                                "f:env": {
                                    "k:{\"name\":\"REGISTRY_HTTP_ADDR\"}": {
                                        ".": {}, "f:name": {}, "f:value": {},
                                    },
                                },
                                "f:ports": {
                                    "k:{\"containerPort\":5000,\"protocol\":\"TCP\"}": {
                                        ".": {}, "f:containerPort": {}, "f:name": {}, "f:protocol": {},
                                    },
                                },
                                "f:resources": {"f:limits": {}},
                            },
                            "k:{\"name\":\"sync\"}": {
                                ".": {},
                                "f:name": {},
                                "f:image": {},
                                "f:ports": {
                                    "k:{\"containerPort\":9090,\"protocol\":\"TCP\"}": {
                                        ".": {}, "f:containerPort": {}, "f:name": {},
                                    },
                                },
                            },
                        },
                        "f:tolerations": {},
                    },
                },
            },
        })
    }

    fn object_with(fields: Value, manager: &str, operation: &str) -> Value {
        let mut object = statefulset();
        object["metadata"]["managedFields"] = json!([{
            "manager": manager,
            "operation": operation,
            "apiVersion": "apps/v1",
            "time": "2026-01-01T00:00:00Z",
            "fieldsType": "FieldsV1",
            "fieldsV1": fields,
        }]);
        object
    }

    #[test]
    fn the_applied_object_owns_nothing_more() {
        assert!(!owns_more_than(&statefulset_fields(), &statefulset()));
        assert!(!owns_more_than(&json!({}), &statefulset()));
    }

    #[test]
    fn a_dropped_field_is_found_at_any_depth() {
        let drop = |change: fn(&mut Value)| {
            let mut desired = statefulset();
            change(&mut desired);
            owns_more_than(&statefulset_fields(), &desired)
        };
        assert!(drop(|d| {
            d["metadata"]["labels"] = json!({});
        }));
        assert!(drop(|d| {
            d["spec"]["template"]["spec"]["containers"][0]["env"] = json!([]);
        }));
        assert!(drop(|d| {
            d["spec"]["template"]["spec"]["containers"][0]["env"][0]["name"] = json!("OTHER");
        }));
        // A port keyed by number and protocol: another number or protocol is another port.
        assert!(drop(|d| {
            d["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] =
                json!(5001);
        }));
        assert!(drop(|d| {
            d["spec"]["template"]["spec"]["containers"][0]["ports"][0]["protocol"] = json!("UDP");
        }));
        assert!(drop(|d| {
            d["metadata"]["finalizers"] = json!(["example.com/other"]);
        }));
        assert!(drop(|d| {
            d["spec"]["template"]["spec"]
                .as_object_mut()
                .unwrap()
                .remove("tolerations");
        }));
        assert!(drop(|d| {
            d["spec"]["template"]["spec"]["containers"]
                .as_array_mut()
                .unwrap()
                .pop();
        }));
        // Reordering a keyed list or changing values drops nothing.
        assert!(!drop(|d| {
            d["spec"]["template"]["spec"]["containers"]
                .as_array_mut()
                .unwrap()
                .reverse();
            d["spec"]["replicas"] = json!(3);
        }));
    }

    #[test]
    fn indices_sets_and_the_element_itself() {
        let fields = json!({"f:list": {"i:0": {".": {}, "f:a": {}}, "i:1": {}}, "f:set": {".": {}, "v:2": {}, "v:{\"x\":1}": {}}});
        let desired = json!({"list": [{"a": 1}, "b"], "set": [{"x": 1.0}, 2]});
        assert!(!owns_more_than(&fields, &desired));
        assert!(owns_more_than(
            &fields,
            &json!({"list": [{"a": 1}], "set": [{"x": 1}, 2]})
        ));
        assert!(owns_more_than(
            &fields,
            &json!({"list": [{"b": 1}, "b"], "set": [{"x": 1}, 2]})
        ));
        assert!(owns_more_than(
            &fields,
            &json!({"list": [{"a": 1}, "b"], "set": [{"x": 1}, 3]})
        ));
    }

    #[test]
    fn what_cannot_be_read_means_apply() {
        let desired = json!({"list": [{"name": "a"}], "map": {"a": 1}});
        for fields in [
            json!({"x:list": {}}),
            json!({"list": {}}),
            json!({"f:list": {"k:not json": {}}}),
            json!({"f:list": {"k:[1]": {}}}),
            json!({"f:list": {"k:{}": {}}}),
            json!({"f:list": {"i:-1": {}}}),
            json!({"f:list": {"v:": {}}}),
            json!({"f:map": {"k:{\"name\":\"a\"}": {}}}),
            json!({"f:list": {"f:name": {}}}),
            json!({"f:map": []}),
            json!({"f:map": {"f:a": "leaf"}}),
            json!("f:map"),
            json!(null),
        ] {
            assert!(owns_more_than(&fields, &desired), "{fields}");
        }
    }

    #[test]
    fn only_our_apply_entry_of_the_same_version_counts() {
        let mut desired = statefulset();
        desired["spec"]["template"]["spec"]["containers"][0]["env"] = json!([]);
        let ours = object_with(statefulset_fields(), "registry-addon", "Apply");
        assert!(apply_would_prune(&ours, &desired, "registry-addon"));
        assert!(!apply_would_prune(&ours, &statefulset(), "registry-addon"));
        // Another manager's fields, or our fields from a create or update: nothing to prune.
        let other = object_with(statefulset_fields(), "kubectl", "Apply");
        assert!(!apply_would_prune(&other, &desired, "registry-addon"));
        let update = object_with(statefulset_fields(), "registry-addon", "Update");
        assert!(!apply_would_prune(&update, &desired, "registry-addon"));
        let mut status = ours.clone();
        status["metadata"]["managedFields"][0]["subresource"] = json!("status");
        assert!(!apply_would_prune(&status, &desired, "registry-addon"));
        assert!(!apply_would_prune(
            &statefulset(),
            &desired,
            "registry-addon"
        ));
        // Recorded for another version: the paths may differ.
        let mut old = ours.clone();
        old["metadata"]["managedFields"][0]["apiVersion"] = json!("apps/v1beta2");
        assert!(apply_would_prune(&old, &statefulset(), "registry-addon"));
    }

    #[test]
    fn odd_managed_fields_mean_apply() {
        let desired = statefulset();
        let with = |managed: Value| {
            let mut object = statefulset();
            object["metadata"]["managedFields"] = managed;
            apply_would_prune(&object, &desired, "registry-addon")
        };
        let entry = |change: fn(&mut Value)| {
            let mut object = object_with(statefulset_fields(), "registry-addon", "Apply");
            change(&mut object["metadata"]["managedFields"][0]);
            apply_would_prune(&object, &desired, "registry-addon")
        };
        assert!(!with(json!(null)));
        assert!(!with(json!([])));
        assert!(with(json!({})));
        assert!(with(json!(["registry-addon"])));
        assert!(with(json!([{"operation": "Apply"}])));
        assert!(entry(|e| e["fieldsType"] = json!("FieldsV2")));
        assert!(entry(|e| {
            e.as_object_mut().unwrap().remove("fieldsV1");
        }));
        assert!(entry(|e| e["fieldsV1"] = json!("f:spec")));
        assert!(entry(|e| e["subresource"] = json!(1)));
        assert!(entry(|e| {
            e.as_object_mut().unwrap().remove("apiVersion");
        }));
        assert!(!entry(|e| e["subresource"] = json!("")));
    }
}
