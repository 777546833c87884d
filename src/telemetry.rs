//! Logs: JSON lines on stdout by default (`--log-format text` for people), level from
//! `SUBGUARD_LOG` in tracing `EnvFilter` syntax (default `info`).

use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

/// Installs the global subscriber. An invalid `SUBGUARD_LOG` falls back to `info` with a warning.
pub fn init(format: LogFormat) {
    let (filter, bad) = match std::env::var("SUBGUARD_LOG") {
        Ok(s) if !s.is_empty() => match EnvFilter::try_new(&s) {
            Ok(f) => (f, None),
            Err(e) => (EnvFilter::new("info"), Some(format!("invalid SUBGUARD_LOG {s:?}: {e}"))),
        },
        _ => (EnvFilter::new("info"), None),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stdout);
    match format {
        LogFormat::Json => builder.json().with_current_span(false).init(),
        LogFormat::Text => builder.init(),
    }
    if let Some(msg) = bad {
        tracing::warn!("{msg}; using info");
    }
}
