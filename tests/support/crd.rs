//! The ClusterRegistry CRD as the chart installs it: its schema and printer columns, for
//! checking written objects against them.

use serde_json::{Value, json};

pub fn crd() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/helm/registry-addon/templates/crd-clusterregistries.yaml"
    );
    serde_yaml::from_str(&std::fs::read_to_string(path).expect("CRD file")).expect("CRD YAML")
}

/// The object against the CRD's schema, unknown fields refused as the API server prunes them.
pub fn validate_against_crd(object: &Value) {
    fn strict(schema: &Value) -> Value {
        match schema {
            Value::Object(map) => {
                let mut out: serde_json::Map<String, Value> = map
                    .iter()
                    .filter(|(k, _)| !k.starts_with("x-kubernetes-"))
                    .map(|(k, v)| (k.clone(), strict(v)))
                    .collect();
                if out.get("type") == Some(&json!("object")) && out.contains_key("properties") {
                    out.entry("additionalProperties").or_insert(json!(false));
                }
                Value::Object(out)
            }
            Value::Array(items) => Value::Array(items.iter().map(strict).collect()),
            other => other.clone(),
        }
    }
    let crd = crd();
    let mut schema = strict(&crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]);
    schema["properties"]["metadata"] = json!({"type": "object"});
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("schema compiles");
    let errors: Vec<String> = validator
        .iter_errors(object)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{errors:?}\n{object:#}");
}

/// What `kubectl get creg` prints after NAME, from the CRD's printer columns (the JSONPath
/// forms the CRD uses: plain paths and one `[?(@.type=="…")]` filter).
pub fn printed_columns(object: &Value) -> Vec<String> {
    let crd = crd();
    let columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array()
        .unwrap();
    let names: Vec<&str> = columns
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["Mode", "Ready", "Replicas", "Nodes", "Cert-Expires", "Age"]
    );
    columns
        .iter()
        .map(|c| {
            let path = c["jsonPath"].as_str().unwrap();
            let mut value = object.clone();
            // The filter's own `.` is not a path separator.
            let path = path.replace("[?(@.type==", "[?(@type==");
            for part in path.trim_start_matches('.').split('.') {
                value = match part.split_once("[?(@type==\"") {
                    Some((field, rest)) => {
                        let wanted = rest.trim_end_matches("\")]");
                        value[field]
                            .as_array()
                            .and_then(|items| items.iter().find(|i| i["type"] == wanted).cloned())
                            .unwrap_or(Value::Null)
                    }
                    None => value[part].clone(),
                };
            }
            match value {
                Value::String(s) => s,
                Value::Null => String::new(),
                other => other.to_string(),
            }
        })
        .collect()
}
