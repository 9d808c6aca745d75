//! The Runtime SDK server: HTTPS with reloadable certificates, discovery derived from the
//! handler table, and routing of hook requests to `hooks::dispatch`.

use crate::cli::ServeArgs;

pub async fn serve(_args: ServeArgs) -> anyhow::Result<()> {
    anyhow::bail!("serve is not implemented yet")
}
