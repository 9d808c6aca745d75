//! registry-addon: a Cluster API Runtime Extension that gives every workload cluster its own
//! highly-available in-cluster OCI registry mirror.
//!
//! Layout: `webhook` serves the Runtime SDK over HTTPS and routes to `hooks`; `wire` holds the
//! Runtime SDK types and the topology variable; `certs` issues and inspects certificates;
//! `k8s` is the thin Kubernetes access layer; `render` produces the registry objects; `oci`
//! and `sync` are the registry client and the replica syncer; `controller` is the day-2
//! controller in `serve` (Cluster watch, Lease, work queue, `ClusterRegistry` status);
//! `front` authorizes requests to a replica; `mirror` fills a mirror from OCI layouts and
//! archives; `agent` is the node agent keeping each node's containerd mirror files current.

pub mod addon;
pub mod agent;
pub mod certs;
pub mod cli;
pub mod controller;
pub mod duration;
pub mod front;
pub mod hooks;
pub mod k8s;
pub mod metrics;
pub mod mirror;
pub mod names;
pub mod oci;
pub mod render;
pub mod sync;
pub mod telemetry;
pub mod webhook;
pub mod wire;
