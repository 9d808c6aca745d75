//! Checks a Runtime SDK response against the Runtime SDK OpenAPI of CAPI main and of v1.12
//! (`../shared/capi/`). Every response a test produces goes through `assert_valid_response`.
#![allow(dead_code)]

use std::sync::OnceLock;

use serde_json::{Value, json};

const SCHEMA_PREFIX: &str = "sigs.k8s.io.cluster-api.api.runtime.hooks.v1alpha1.";

struct Spec {
    name: &'static str,
    document: Value,
}

fn specs() -> &'static [Spec] {
    static SPECS: OnceLock<Vec<Spec>> = OnceLock::new();
    SPECS.get_or_init(|| {
        [
            "runtime-sdk-openapi.main.yaml",
            "runtime-sdk-openapi.v1.12.yaml",
        ]
        .into_iter()
        .map(|name| {
            let path = format!("{}/../shared/capi/{name}", env!("CARGO_MANIFEST_DIR"));
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
            let document: Value =
                serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("cannot parse {path}: {e}"));
            Spec { name, document }
        })
        .collect()
    })
}

/// Asserts that `response` is a valid `<kind>` (e.g. `BeforeClusterCreateResponse`) in both
/// schemas, that it sets no property the schema does not know, and that it carries the
/// fields every response must carry.
pub fn assert_valid_response(response: &Value) {
    let kind = response["kind"]
        .as_str()
        .unwrap_or_else(|| panic!("response has no kind: {response}"));
    assert_eq!(
        response["apiVersion"], "hooks.runtime.cluster.x-k8s.io/v1alpha1",
        "{response}"
    );
    assert!(response["status"].is_string(), "no status: {response}");
    assert!(response["message"].is_string(), "no message: {response}");
    for spec in specs() {
        let components = &spec.document["components"];
        let schema_name = format!("{SCHEMA_PREFIX}{kind}");
        let schema = &components["schemas"][&schema_name];
        assert!(schema.is_object(), "{}: no schema {schema_name}", spec.name);
        let root = json!({
            "$ref": format!("#/components/schemas/{schema_name}"),
            "components": components,
        });
        let validator = jsonschema::draft7::new(&root).unwrap_or_else(|e| {
            panic!("{}: schema {schema_name} does not compile: {e}", spec.name)
        });
        let errors: Vec<String> = validator
            .iter_errors(response)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{} rejects {kind}: {errors:?}\n{response}",
            spec.name
        );
        let known = schema["properties"].as_object().expect("properties");
        for key in response.as_object().expect("object").keys() {
            assert!(
                known.contains_key(key),
                "{}: {kind} has no property {key}: {response}",
                spec.name
            );
        }
        if schema["required"]
            .as_array()
            .is_some_and(|r| r.iter().any(|f| f == "retryAfterSeconds"))
        {
            assert!(response["retryAfterSeconds"].is_i64(), "{response}");
        }
    }
}
