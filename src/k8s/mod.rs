//! Thin Kubernetes access: server-side apply, reads, workload-cluster clients.
