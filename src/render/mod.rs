//! The registry objects for one cluster, rendered once for `render`, the direct deployer and
//! the Helm values.

pub mod objects;
pub mod registry;

use crate::cli::RenderArgs;

pub async fn run_cli(_args: RenderArgs) -> anyhow::Result<()> {
    anyhow::bail!("render is not implemented yet")
}
