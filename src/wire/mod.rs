//! Wire types: the Runtime SDK requests and responses, the embedded Cluster (read leniently)
//! and the `addons.registry` topology variable.

pub mod cluster;
pub mod runtime;
pub mod variable;
