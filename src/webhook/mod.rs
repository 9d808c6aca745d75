//! The Runtime SDK server: HTTPS with reloadable certificates, discovery derived from the
//! handler table, and routing of hook requests to `hooks::dispatch`.

pub mod handlers;
pub mod server;
pub mod tls;

pub use server::{Running, serve, start, wait_for_signal};
