//! Certificates: root CA, per-cluster CA copy, registry server certificates (SPEC §5).
