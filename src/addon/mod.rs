//! What makes a cluster's registry match its variable, shared by the lifecycle hooks, `render`
//! and the controller.

pub mod converge;
pub mod modes;
pub mod reconcile;
pub mod rollout;
pub mod switch;
pub mod users;
