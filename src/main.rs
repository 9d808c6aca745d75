use clap::Parser;
use registry_addon::cli::{Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    registry_addon::telemetry::init(&cli.log_format);
    // One process-wide rustls provider: ring, also used by the Kubernetes and registry clients.
    let _ = rustls::crypto::ring::default_provider().install_default();

    // The node agent runs on every node: one thread keeps its memory small.
    let mut builder = if matches!(cli.command, Command::NodeAgent(_) | Command::Wait(_)) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => registry_addon::webhook::serve(args).await,
            Command::Sync(args) => registry_addon::sync::run(args).await,
            Command::Front(args) => registry_addon::front::run(args).await,
            Command::Render(args) => registry_addon::render::run_cli(args).await,
            Command::Mirror(args) => registry_addon::mirror::run(args).await,
            Command::NodeAgent(args) => registry_addon::agent::run(args).await,
            Command::Wait(args) => registry_addon::cli::wait(args).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
