//! The `subguard` command line: parse arguments, load the config, run, wait for a signal.

// The command line prints its answers (`validate`'s lines, `explain`'s JSON), but never panics on
// what a user gives it: a bad flag or config is an error message and a non-zero exit code.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::todo,
        clippy::unimplemented,
        clippy::dbg_macro
    )
)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use subguard::check::Policy;
use subguard::config::read;
use subguard::explain::{self, ExplainRequest};
use subguard::telemetry::{self, LogFormat, Metrics};

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
    /// Explain the decision for one token, step by step. Exit code 0 allow, 1 deny, 2 usage or
    /// config error. The token comes from --token, --token-file or stdin.
    Explain {
        #[arg(long, env = "SUBGUARD_CONFIG")]
        config: PathBuf,
        /// The bearer token (without `Bearer `).
        #[arg(long, conflicts_with = "token_file")]
        token: Option<String>,
        /// A file holding the token.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// The tenant, sent in the configured tenant header (or as the route's tenant).
        #[arg(long, conflicts_with = "host")]
        tenant: Option<String>,
        /// The request's host (`:authority`).
        #[arg(long)]
        host: Option<String>,
        /// A request header `NAME:VALUE`; repeatable.
        #[arg(long = "header", value_parser = parse_header)]
        headers: Vec<(String, String)>,
        /// Decide as of this unix time (default: now).
        #[arg(long)]
        at: Option<i64>,
        #[arg(long, value_enum, default_value = "text")]
        format: ExplainFormat,
    },
    /// Revoke one token in every sidecar that shares the config's Redis (`revocation:`): stores
    /// its jti until exp (plus the config's leeway) and publishes a `token.revoked` event.
    /// Exit code 0 done (an already expired token included: nothing to revoke), 1 Redis failed, 2
    /// usage or config error.
    Revoke {
        #[arg(long, env = "SUBGUARD_CONFIG")]
        config: PathBuf,
        /// The token's `jti` claim.
        #[arg(long)]
        jti: String,
        /// The token's `exp` claim (unix seconds): the revocation lasts as long as the token.
        #[arg(long)]
        exp: i64,
    },
    /// Publish a user event to every sidecar that shares the config's Redis: each drops the user's
    /// cached directory answer, and holds a deleted / disabled / tokens-revoked verdict for
    /// `event_hold_seconds`. Exit code 0 done, 1 Redis failed, 2 usage or config error.
    Evict {
        #[arg(long, env = "SUBGUARD_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        sub: String,
        /// What happened to the user.
        #[arg(long, value_enum, default_value = "user.updated")]
        event: UserEvent,
        /// With `--event user.tokens_revoked`: tokens issued before this unix time are revoked
        /// (default: now).
        #[arg(long)]
        tokens_valid_after: Option<i64>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum UserEvent {
    #[value(name = "user.updated")]
    Updated,
    #[value(name = "user.deleted")]
    Deleted,
    #[value(name = "user.disabled")]
    Disabled,
    #[value(name = "user.tokens_revoked")]
    TokensRevoked,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ExplainFormat {
    Text,
    Json,
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once(':') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_ascii_lowercase(), v.trim().to_string())),
        _ => Err(format!("`{s}` is not NAME:VALUE")),
    }
}

/// A usage or config error of `explain`.
const EXPLAIN_USAGE: u8 = 2;

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
        Command::Explain { config, token, token_file, tenant, host, headers, at, format } => {
            let token = match read_token(token, token_file.as_deref(), &headers) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("subguard explain: {e}");
                    return ExitCode::from(EXPLAIN_USAGE);
                }
            };
            let cfg = match load_config(" explain", &config, ExitCode::from(EXPLAIN_USAGE)) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let runtime = match runtime(" explain", false, ExitCode::from(EXPLAIN_USAGE)) {
                Ok(r) => r,
                Err(code) => return code,
            };
            let policy = match Policy::build(cfg, Metrics::detached()) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("subguard explain: {e}");
                    return ExitCode::from(EXPLAIN_USAGE);
                }
            };
            let req = ExplainRequest::build(
                &policy,
                &headers,
                token.as_deref(),
                tenant.as_deref(),
                host.as_deref(),
            );
            let at = at.unwrap_or_else(subguard::server::grpc::unix_now);
            let report = runtime.block_on(async {
                // The keys of the request's tenant only: the others cannot matter to it.
                let tenant = policy.resolve_tenant(&policy.tenant_candidates(&req)).ok();
                let wanted = |name: &str| tenant.as_ref().is_some_and(|t| &*t.name == name);
                let key_errors = match policy.fetch_missing_keys_of(None, wanted).await {
                    Ok(()) => Vec::new(),
                    Err(errors) => errors.iter().map(ToString::to_string).collect(),
                };
                explain::explain(&policy, &req, at, key_errors).await
            });
            match format {
                ExplainFormat::Json => println!("{}", report.to_json()),
                ExplainFormat::Text => print!("{}", report.to_text()),
            }
            ExitCode::from(report.exit_code())
        }
        Command::Revoke { config, jti, exp } => {
            publish(&config, subguard::revocation::Event::TokenRevoked { jti, exp })
        }
        Command::Evict { config, tenant, sub, event, tokens_valid_after } => {
            use subguard::revocation::Event;
            if tokens_valid_after.is_some() && event != UserEvent::TokensRevoked {
                eprintln!("subguard evict: --tokens-valid-after goes with --event user.tokens_revoked");
                return ExitCode::from(EXPLAIN_USAGE);
            }
            let event = match event {
                UserEvent::Updated => Event::UserUpdated { tenant, sub },
                UserEvent::Deleted => Event::UserDeleted { tenant, sub },
                UserEvent::Disabled => Event::UserDisabled { tenant, sub },
                UserEvent::TokensRevoked => Event::UserTokensRevoked {
                    tenant,
                    sub,
                    tokens_valid_after: tokens_valid_after.unwrap_or_else(subguard::server::grpc::unix_now),
                },
            };
            publish(&config, event)
        }
        Command::Serve { config } => {
            let runtime = match runtime("", true, ExitCode::FAILURE) {
                Ok(r) => r,
                Err(code) => return code,
            };
            // Before anything slow (a large users file takes a while to read): until handlers are
            // in place, SIGHUP and SIGTERM would kill the process with their default action.
            let signals = {
                let _context = runtime.enter();
                Signals::register()
            };
            let cfg = match subguard::config::load(&config) {
                Ok(c) => c,
                Err(errors) => {
                    // In the log too: a log pipeline is where a crash-looping pod is looked at.
                    let _telemetry = telemetry::init(cli.log_format, None);
                    for e in &errors {
                        tracing::error!(config = %config.display(), error = %e, "invalid config; not starting");
                    }
                    print_config_errors("", &config, &errors);
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run(cfg, cli.log_format, signals)) {
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

/// Loads the config for command `name` ("" for serve); on errors prints them one per line on
/// stderr and returns `code`.
fn load_config(
    name: &str,
    path: &std::path::Path,
    code: ExitCode,
) -> Result<subguard::config::Config, ExitCode> {
    subguard::config::load(path).map_err(|errors| {
        print_config_errors(name, path, &errors);
        code
    })
}

/// A config's errors for a person, one per line on stderr, under the command that refused it.
fn print_config_errors(name: &str, path: &std::path::Path, errors: &[subguard::config::ConfigError]) {
    eprintln!("subguard{name}: invalid config {}:", path.display());
    for e in errors {
        eprintln!("  {e}");
    }
}

/// A tokio runtime for command `name` (`serve`'s own, else a current-thread one); on failure prints
/// why and returns `code`.
fn runtime(name: &str, serve: bool, code: ExitCode) -> Result<tokio::runtime::Runtime, ExitCode> {
    let built = if serve {
        subguard::server::runtime()
    } else {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    };
    built.map_err(|e| {
        eprintln!("subguard{name}: cannot start the runtime: {e}");
        code
    })
}

/// `revoke` and `evict`: validate the event, publish it through the config's Redis.
fn publish(config: &std::path::Path, event: subguard::revocation::Event) -> ExitCode {
    let name =
        if matches!(event, subguard::revocation::Event::TokenRevoked { .. }) { "revoke" } else { "evict" };
    if let Err(e) = event.validate() {
        eprintln!("subguard {name}: {e}");
        return ExitCode::from(EXPLAIN_USAGE);
    }
    let cfg = match load_config(&format!(" {name}"), config, ExitCode::from(EXPLAIN_USAGE)) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(mut settings) = cfg.revocation.clone() else {
        eprintln!(
            "subguard {name}: {} has no `revocation:` section (no Redis to publish to)",
            config.display()
        );
        return ExitCode::from(EXPLAIN_USAGE);
    };
    if let Some((tenant, _)) = event.user()
        && !cfg.tenants.contains_key(tenant)
    {
        eprintln!("subguard {name}: warning: tenant `{tenant}` is not configured in {}", config.display());
    }
    // A person or a script is waiting, not a request: allow a slow link its handshakes.
    settings.timeout = settings.timeout.max(std::time::Duration::from_secs(5));
    let channel = settings.channel.clone();
    let revocation = match subguard::revocation::Revocation::new(settings, None, Metrics::detached()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("subguard {name}: {e}");
            return ExitCode::from(EXPLAIN_USAGE);
        }
    };
    // Nothing to do is not a failure: a script revoking in bulk must not take it for Redis down.
    if let subguard::revocation::Event::TokenRevoked { exp, .. } = &event {
        let leeway = cfg.token.leeway_seconds;
        if exp.saturating_add(leeway as i64) <= subguard::server::grpc::unix_now() {
            println!(
                "nothing to revoke: the token expired at {exp} (plus {leeway}s leeway); every check already \
                 refuses it as token_expired"
            );
            return ExitCode::SUCCESS;
        }
    }
    let runtime = match runtime(&format!(" {name}"), false, ExitCode::FAILURE) {
        Ok(r) => r,
        Err(code) => return code,
    };
    match runtime.block_on(revocation.publish(&event, cfg.token.leeway_seconds)) {
        Ok(receivers) => {
            println!("{} published on {channel}: {receivers} subscriber(s) received it", event.to_json());
            if receivers == 0 {
                eprintln!(
                    "subguard {name}: warning: no sidecar is subscribed to {channel} right now{}",
                    if name == "revoke" {
                        " (the revoked jti is stored and every check will see it)"
                    } else {
                        ""
                    }
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("subguard {name}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The token of `explain`: `--token`, `--token-file`, or stdin unless an Authorization header
/// was given with `--header`. Surrounding whitespace is dropped; an empty token means none.
fn read_token(
    token: Option<String>,
    file: Option<&std::path::Path>,
    headers: &[(String, String)],
) -> Result<Option<String>, String> {
    let text = match (token, file) {
        (Some(t), _) => t,
        (None, Some(f)) => read::any_text(f, read::SMALL_FILE_MAX_BYTES)
            .map_err(|e| format!("--token-file {}: {e}", f.display()))?,
        (None, None) if headers.iter().any(|(k, _)| k == "authorization") => return Ok(None),
        (None, None) => read::reader_text(std::io::stdin(), read::SMALL_FILE_MAX_BYTES)
            .map_err(|e| format!("stdin: {e}"))?,
    };
    let t = text.trim();
    Ok((!t.is_empty()).then(|| t.to_string()))
}

async fn run(cfg: subguard::config::Config, log_format: LogFormat, signals: Signals) -> anyhow::Result<()> {
    let _telemetry = telemetry::init(log_format, cfg.tracing.as_ref());
    subguard::keys::self_test()?;
    tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %cfg.path.display(), tenants = cfg.tenants.len(), "starting");
    for w in &cfg.warnings {
        tracing::warn!(warning = %w, "config warning");
    }
    subguard::server::serve(cfg, signals.shutdown()).await
}

/// The signals `serve` answers, registered as the process starts. SIGHUP is only registered here,
/// so that it no longer kills the process; the reloader listens for it once it runs (a SIGHUP
/// before that finds the files as they are when the reloader first looks).
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn register() -> Signals {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("subguard: cannot listen for {name}: {e}");
                None
            }
        };
        drop(listen(SignalKind::hangup(), "SIGHUP"));
        Signals {
            term: listen(SignalKind::terminate(), "SIGTERM"),
            int: listen(SignalKind::interrupt(), "SIGINT"),
        }
    }

    /// Resolves at the first SIGTERM or SIGINT (one that arrived while the config was read
    /// included). Later ones are logged: the drain goes on until it ends or the grace period does.
    async fn shutdown(self) {
        let Signals { mut term, mut int } = self;
        async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        let first = tokio::select! {
            _ = next(&mut term) => "SIGTERM",
            _ = next(&mut int) => "SIGINT",
        };
        tracing::info!(signal = first, "signal received");
        tokio::spawn(async move {
            loop {
                let again = tokio::select! {
                    _ = next(&mut term) => "SIGTERM",
                    _ = next(&mut int) => "SIGINT",
                };
                tracing::info!(
                    signal = again,
                    "signal received again; still draining until the checks in flight finish or the grace period ends"
                );
            }
        });
    }
}
