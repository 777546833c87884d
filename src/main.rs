//! The `subguard` command line: parse arguments, load the config, run, wait for a signal.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use subguard::telemetry::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "subguard",
    version,
    about = "Envoy ext_authz sidecar: tenant-aware JWT and user-directory checks with precise deny reasons"
)]
struct Cli {
    /// Log format on stdout.
    #[arg(long, global = true, value_enum, default_value = "json")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar.
    Serve {
        /// The config file.
        #[arg(long, env = "SUBGUARD_CONFIG")]
        config: PathBuf,
    },
    /// Check a config offline: prints `ok`, or one error per line naming its YAML path.
    Validate {
        #[arg(long, env = "SUBGUARD_CONFIG")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { config } => match subguard::config::load(&config) {
            Ok(cfg) => {
                for w in &cfg.warnings {
                    eprintln!("warning: {w}");
                }
                println!("ok");
                ExitCode::SUCCESS
            }
            Err(errors) => {
                for e in errors {
                    println!("{e}");
                }
                ExitCode::FAILURE
            }
        },
        Command::Serve { config } => {
            let cfg = match subguard::config::load(&config) {
                Ok(c) => c,
                Err(errors) => {
                    eprintln!("subguard: invalid config {}:", config.display());
                    for e in errors {
                        eprintln!("  {e}");
                    }
                    return ExitCode::FAILURE;
                }
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("subguard: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run(cfg, cli.log_format)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "subguard failed");
                    eprintln!("subguard: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn run(cfg: subguard::config::Config, log_format: LogFormat) -> anyhow::Result<()> {
    let _telemetry = telemetry::init(log_format, cfg.tracing.as_ref());
    subguard::keys::self_test()?;
    tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %cfg.path.display(), tenants = cfg.tenants.len(), "starting");
    for w in &cfg.warnings {
        tracing::warn!(warning = %w, "config warning");
    }
    subguard::server::serve(cfg, shutdown_signal()).await
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "signal received"),
        _ = tokio::signal::ctrl_c() => tracing::info!(signal = "SIGINT", "signal received"),
    }
}
