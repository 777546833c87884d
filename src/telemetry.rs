//! Logs: JSON lines on stdout by default (`--log-format text` for people), level from
//! `SUBGUARD_LOG` in tracing `EnvFilter` syntax (default `info`).

use tracing_subscriber::EnvFilter;

mod span_fields;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

/// Keeps the trace exporter alive; flushes pending spans when dropped.
#[must_use]
pub struct TelemetryGuard {
    #[cfg(feature = "otel")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        #[cfg(feature = "otel")]
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Installs the global subscriber: logs on stdout, and with `tracing` configured (cargo feature
/// `otel`) spans exported over OTLP/HTTP. An invalid `SUBGUARD_LOG` falls back to `info` with a
/// warning. Must run inside the tokio runtime when export is configured.
pub fn init(format: LogFormat, tracing_settings: Option<&crate::config::TracingSettings>) -> TelemetryGuard {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let (filter, bad) = match std::env::var("SUBGUARD_LOG") {
        Ok(s) if !s.is_empty() => match EnvFilter::try_new(&s) {
            Ok(f) => (f, None),
            Err(e) => (EnvFilter::new("info"), Some(format!("invalid SUBGUARD_LOG {s:?}: {e}"))),
        },
        _ => (EnvFilter::new("info"), None),
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let (json, text) = match format {
        // The current span (a check's request_id, trace_id, tenant, reason) rides on every line.
        LogFormat::Json => (
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false)
                    .fmt_fields(span_fields::JsonSpanFields)
                    .with_writer(std::io::stdout),
            ),
            None,
        ),
        LogFormat::Text => {
            (None, Some(tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(std::io::stdout)))
        }
    };
    let registry = tracing_subscriber::registry().with(filter).with(json).with(text);

    #[cfg(feature = "otel")]
    let guard = {
        let (layer, provider, failed) = match tracing_settings.map(otel::provider) {
            Some(Ok(p)) => {
                use opentelemetry::trace::TracerProvider as _;
                let tracer = p.tracer("subguard");
                (Some(tracing_opentelemetry::layer().with_tracer(tracer)), Some(p), None)
            }
            Some(Err(e)) => (None, None, Some(e)),
            None => (None, None, None),
        };
        registry.with(layer).init();
        // Logged once the log itself is set up: a JSON line like every other.
        if let Some(e) = failed {
            tracing::error!(error = %e, "cannot start OTLP trace export; checks go on without traces");
        }
        TelemetryGuard { provider }
    };
    #[cfg(not(feature = "otel"))]
    let guard = {
        let _ = tracing_settings;
        registry.init();
        TelemetryGuard {}
    };

    if let Some(msg) = bad {
        tracing::warn!("{msg}; using info");
    }
    guard
}

#[cfg(feature = "otel")]
pub mod otel {
    //! OTLP/HTTP export and W3C trace-context propagation (cargo feature `otel`).

    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};

    use crate::config::TracingSettings;

    pub fn provider(s: &TracingSettings) -> Result<SdkTracerProvider, String> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(s.otlp_endpoint.clone())
            .with_timeout(std::time::Duration::from_secs(5))
            .with_headers(Default::default())
            .build()
            .map_err(|e| e.to_string())?;
        let resource =
            opentelemetry_sdk::Resource::builder_empty().with_service_name(s.service_name.clone()).build();
        Ok(SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(s.sample_ratio))))
            .with_resource(resource)
            .build())
    }

    /// Makes `span` a child of the caller's trace named by a `traceparent` header.
    pub fn join_trace(span: &tracing::Span, traceparent: Option<&str>) {
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let Some(tp) = traceparent else { return };
        let mut carrier = std::collections::HashMap::new();
        carrier.insert("traceparent".to_string(), tp.to_string());
        let cx = TraceContextPropagator::new().extract(&carrier);
        let _ = span.set_parent(cx);
    }
}

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use std::fmt::Write as _;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::decision::Decision;

/// Decision latency buckets: a warm check is microseconds, a cold one (signature + directory
/// round trip) milliseconds; anything past 250 ms is already an Envoy timeout.
const CHECK_BUCKETS: [f64; 14] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// A label value from the config (a tenant, issuer or directory name), shared rather than copied:
/// counting a check must not allocate.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct Name(pub Arc<str>);

impl EncodeLabelValue for Name {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(&self.0)
    }
}

fn name(s: Option<&Arc<str>>) -> Name {
    static EMPTY: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(""));
    Name(s.unwrap_or(&EMPTY).clone())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabels {
    pub decision: &'static str,
    pub reason: &'static str,
    /// A configured tenant, or `""` (never raw request input).
    pub tenant: Name,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectoryLabels {
    pub tenant: Name,
    /// `found`, `not_found`, `error`, `cache_hit`, `stale`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JwksLabels {
    /// A configured issuer.
    pub issuer: Name,
    /// `ok` or `error`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BreakerLabels {
    /// `default` or the tenant whose own directory it is.
    pub directory: Name,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenCacheLabels {
    /// `hit` (signature verification skipped) or `miss`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConfigLabels {
    /// 16 hex digits of the watched files' SHA-256 fingerprint.
    pub fingerprint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    /// The event `type` (`invalid` for a message that is not an event).
    pub r#type: &'static str,
    /// `applied`, `ignored` (a tenant not served here) or `invalid`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// A config version as metrics and logs name it: the first 8 bytes of the watched files'
/// fingerprint, in hex. Pods reading the same files at the same paths show the same value, so a
/// fleet's convergence on a new version can be counted, and a log line matched to the metric.
fn config_version(fingerprint: &[u8; 32]) -> String {
    let mut hex = String::with_capacity(16);
    for byte in &fingerprint[..8] {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

/// Every metric family subguard exports (SPEC §4). Label values come from the config and the
/// fixed reason table only, so a client cannot create series.
#[derive(Debug)]
pub struct Metrics {
    checks: Family<CheckLabels, Counter>,
    check_duration: Histogram,
    in_flight: Gauge,
    shed: Counter,
    token_cache: Family<TokenCacheLabels, Counter>,
    /// The two series of `token_cache`, held so that counting a lookup (every check) needs no
    /// family lookup.
    token_cache_hit: Counter,
    token_cache_miss: Counter,
    /// Verified tokens dropped from a full token cache while still valid.
    token_cache_evictions: Counter,
    directory_lookups: Family<DirectoryLabels, Counter>,
    jwks_fetches: Family<JwksLabels, Counter>,
    breaker_state: Family<BreakerLabels, Gauge>,
    config_reloads: Family<ReloadLabels, Counter>,
    /// 1 while the last version read was applied (or is the one started with), 0 while it was
    /// refused and the previous one keeps serving.
    config_last_reload_ok: Gauge,
    config_last_success: Gauge<f64, AtomicU64>,
    /// One series: the fingerprint of the version serving.
    config_info: Family<ConfigLabels, Gauge>,
    revocation_lookups: Family<OutcomeLabels, Counter>,
    revocation_events: Family<EventLabels, Counter>,
    revocation_connected: Gauge,
    revocation_reconnects: Counter,
}

impl Metrics {
    /// Creates the families and registers them (with the `subguard_` prefix) in `registry`.
    pub fn register(registry: &mut Registry) -> Arc<Metrics> {
        let m = Metrics::unregistered();
        let r = registry.sub_registry_with_prefix("subguard");
        r.register("checks", "Authorization checks by decision, reason code and tenant", m.checks.clone());
        r.register_with_unit(
            "check_duration",
            "Time to decide one check",
            Unit::Seconds,
            m.check_duration.clone(),
        );
        r.register("checks_in_flight", "Checks being decided right now", m.in_flight.clone());
        r.register(
            "checks_shed",
            "Checks refused at once because max_in_flight_checks were already in flight",
            m.shed.clone(),
        );
        r.register(
            "directory_lookups",
            "User directory lookups by tenant and outcome",
            m.directory_lookups.clone(),
        );
        r.register("jwks_fetches", "Issuer key (JWKS) fetches by issuer and outcome", m.jwks_fetches.clone());
        r.register(
            "directory_breaker_state",
            "Circuit breaker of each remote directory: 0 closed, 1 open, 2 half-open",
            m.breaker_state.clone(),
        );
        r.register(
            "token_cache_lookups",
            "Verified-token cache lookups: hit skips signature verification",
            m.token_cache.clone(),
        );
        r.register(
            "token_cache_evictions",
            "Verified tokens dropped from a full token cache while still valid (raise token.cache_max_entries if this keeps rising)",
            m.token_cache_evictions.clone(),
        );
        r.register("config_reloads", "Configuration reloads by outcome", m.config_reloads.clone());
        for outcome in ["ok", "error"] {
            let _ = m.config_reloads.get_or_create(&ReloadLabels { outcome });
        }
        r.register(
            "config_last_reload_successful",
            "1 when the last config version read was applied, 0 when it was refused and the previous one keeps serving",
            m.config_last_reload_ok.clone(),
        );
        r.register_with_unit(
            "config_last_reload_success_timestamp",
            "When the config version serving was applied (Unix time): at start or at its reload",
            Unit::Seconds,
            m.config_last_success.clone(),
        );
        r.register(
            "config_info",
            "The config version serving: a fingerprint of the config file and every file it names",
            m.config_info.clone(),
        );
        r.register(
            "revocation_lookups",
            "Revoked-jti lookups: revoked, not_revoked, cache_hit (answered locally), unavailable (Redis not asked or failed)",
            m.revocation_lookups.clone(),
        );
        r.register(
            "revocation_events",
            "Revocation channel messages by event type and outcome (applied, ignored, invalid)",
            m.revocation_events.clone(),
        );
        r.register(
            "revocation_redis_connected",
            "1 while the revocation subscriber is subscribed to Redis, else 0",
            m.revocation_connected.clone(),
        );
        r.register(
            "revocation_reconnects",
            "Times the revocation subscriber lost or could not reach Redis and retried",
            m.revocation_reconnects.clone(),
        );
        let build: Family<BuildLabels, Gauge> = Family::default();
        build.get_or_create(&BuildLabels { version: env!("CARGO_PKG_VERSION") }).set(1);
        r.register("build_info", "The running subguard version", build);
        Arc::new(m)
    }

    /// Metrics that go nowhere (for `explain`-style tools and unit tests).
    pub fn detached() -> Arc<Metrics> {
        Arc::new(Metrics::unregistered())
    }

    fn unregistered() -> Metrics {
        let token_cache: Family<TokenCacheLabels, Counter> = Family::default();
        let token_cache_hit = token_cache.get_or_create(&TokenCacheLabels { outcome: "hit" }).clone();
        let token_cache_miss = token_cache.get_or_create(&TokenCacheLabels { outcome: "miss" }).clone();
        Metrics {
            checks: Family::default(),
            check_duration: Histogram::new(CHECK_BUCKETS),
            in_flight: Gauge::default(),
            shed: Counter::default(),
            token_cache,
            token_cache_hit,
            token_cache_miss,
            token_cache_evictions: Counter::default(),
            directory_lookups: Family::default(),
            jwks_fetches: Family::default(),
            breaker_state: Family::default(),
            config_reloads: Family::default(),
            config_last_reload_ok: Gauge::default(),
            config_last_success: Gauge::default(),
            config_info: Family::default(),
            revocation_lookups: Family::default(),
            revocation_events: Family::default(),
            revocation_connected: Gauge::default(),
            revocation_reconnects: Counter::default(),
        }
    }

    pub fn token_cache_lookup(&self, hit: bool) {
        if hit { &self.token_cache_hit } else { &self.token_cache_miss }.inc();
    }

    /// The counter of tokens evicted from a full token cache; every policy's cache adds to the
    /// same one, so the count runs on across reloads.
    pub fn token_cache_evictions(&self) -> Counter {
        self.token_cache_evictions.clone()
    }

    pub fn revocation_lookup(&self, outcome: &'static str) {
        self.revocation_lookups.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    pub fn revocation_event(&self, r#type: &'static str, outcome: &'static str) {
        self.revocation_events.get_or_create(&EventLabels { r#type, outcome }).inc();
    }

    pub fn revocation_connected(&self, up: bool) {
        self.revocation_connected.set(i64::from(up));
    }

    pub fn revocation_reconnect(&self) {
        self.revocation_reconnects.inc();
    }

    pub fn check_shed(&self) {
        self.shed.inc();
    }

    /// Marks a check in flight until the guard drops.
    pub fn check_started(&self) -> InFlight<'_> {
        self.in_flight.inc();
        InFlight(&self.in_flight)
    }

    /// Creates the zero-valued series of a configured tenant and its issuers, so dashboards and
    /// alerts see `0` rather than an absent series before the first event.
    pub fn declare_tenant<'a>(&self, tenant: &Arc<str>, issuers: impl Iterator<Item = &'a Arc<str>>) {
        for outcome in ["found", "not_found", "error", "cache_hit", "stale"] {
            let _ = self
                .directory_lookups
                .get_or_create(&DirectoryLabels { tenant: Name(tenant.clone()), outcome });
        }
        for issuer in issuers {
            for outcome in ["ok", "error"] {
                let _ =
                    self.jwks_fetches.get_or_create(&JwksLabels { issuer: Name(issuer.clone()), outcome });
            }
        }
    }

    /// Drops the series of a tenant a reload removed (its checks, its directory lookups), so
    /// dashboards stop listing it; a tenant added again starts from zero, which Prometheus reads
    /// as a counter reset.
    pub fn forget_tenant(&self, tenant: &Arc<str>) {
        for outcome in ["found", "not_found", "error", "cache_hit", "stale"] {
            self.directory_lookups.remove(&DirectoryLabels { tenant: Name(tenant.clone()), outcome });
        }
        let decisions = crate::decision::Reason::ALL
            .iter()
            .map(|r| ("deny", r.code()))
            .chain(std::iter::once(("allow", "ok")));
        for (decision, reason) in decisions {
            self.checks.remove(&CheckLabels { decision, reason, tenant: Name(tenant.clone()) });
        }
    }

    /// Drops the series of an issuer no tenant trusts any more, and of a directory that is gone.
    pub fn forget_issuer(&self, issuer: &Arc<str>) {
        for outcome in ["ok", "error"] {
            self.jwks_fetches.remove(&JwksLabels { issuer: Name(issuer.clone()), outcome });
        }
    }

    pub fn forget_directory(&self, directory: &Arc<str>) {
        self.breaker_state.remove(&BreakerLabels { directory: Name(directory.clone()) });
    }

    pub fn breaker_changed(&self, directory: &Arc<str>, state: crate::directory::breaker::BreakerState) {
        use crate::directory::breaker::BreakerState;
        let v = match state {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        };
        self.breaker_state.get_or_create(&BreakerLabels { directory: Name(directory.clone()) }).set(v);
    }

    /// A changed config version was read: applied (`ok`), or refused while the previous one keeps
    /// serving.
    pub fn config_reloaded(&self, ok: bool) {
        self.config_reloads.get_or_create(&ReloadLabels { outcome: if ok { "ok" } else { "error" } }).inc();
        self.config_last_reload_ok.set(i64::from(ok));
    }

    /// The version with this fingerprint serves now: at start, and after each applied reload.
    /// Returns its [`config_version`], which labels `subguard_config_info`, for the log line.
    pub fn config_serving(&self, fingerprint: &[u8; 32]) -> String {
        self.config_last_reload_ok.set(1);
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        self.config_last_success.set(now.as_secs_f64());
        let version = config_version(fingerprint);
        self.config_info.clear();
        self.config_info.get_or_create(&ConfigLabels { fingerprint: version.clone() }).set(1);
        version
    }

    pub fn directory_lookup(&self, tenant: &Arc<str>, outcome: &'static str) {
        self.directory_lookups
            .get_or_create(&DirectoryLabels { tenant: Name(tenant.clone()), outcome })
            .inc();
    }

    pub fn jwks_fetch(&self, issuer: &Arc<str>, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        self.jwks_fetches.get_or_create(&JwksLabels { issuer: Name(issuer.clone()), outcome }).inc();
    }

    /// The one place a finished check is observed: it is counted, timed and logged together, so
    /// logs and metrics never disagree.
    pub fn check_finished(&self, d: &Decision, request_id: Option<&str>, elapsed: Duration) {
        self.checks
            .get_or_create(&CheckLabels {
                decision: if d.is_allow() { "allow" } else { "deny" },
                reason: d.reason_code(),
                tenant: name(d.tenant.as_ref()),
            })
            .inc();
        self.check_duration.observe(elapsed.as_secs_f64());
        log_decision(d, request_id);
    }
}

/// Decrements the in-flight gauge when dropped (also when a check is cancelled).
pub struct InFlight<'a>(&'a Gauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Whether [`Metrics::check_finished`] will log a line for `d` under the current filter.
pub fn check_logged(d: &Decision) -> bool {
    use crate::decision::Outcome;
    match d.outcome {
        Outcome::Allow(_) => tracing::enabled!(tracing::Level::DEBUG),
        Outcome::Deny(r) if r.is_outage() => tracing::enabled!(tracing::Level::WARN),
        Outcome::Deny(_) => tracing::enabled!(tracing::Level::INFO),
    }
}

/// One line per deny at info (warn for outages), allows at debug. Never the token.
fn log_decision(d: &Decision, request_id: Option<&str>) {
    use crate::decision::Outcome;
    let tenant = d.tenant.as_deref().unwrap_or("");
    let sub = d.sub.as_deref().unwrap_or("");
    let issuer = d.issuer.as_deref().unwrap_or("");
    let detail = d.detail.as_deref().unwrap_or("");
    let request_id = request_id.unwrap_or("");
    match d.outcome {
        Outcome::Allow(_) => {
            tracing::debug!(
                decision = "allow",
                reason = "ok",
                tenant,
                sub,
                issuer,
                request_id,
                "check allowed"
            )
        }
        Outcome::Deny(r) if r.is_outage() => {
            tracing::warn!(
                decision = "deny",
                reason = r.code(),
                tenant,
                sub,
                issuer,
                request_id,
                detail,
                "check denied"
            )
        }
        Outcome::Deny(r) => {
            tracing::info!(
                decision = "deny",
                reason = r.code(),
                tenant,
                sub,
                issuer,
                request_id,
                detail,
                "check denied"
            )
        }
    }
}

/// The OpenMetrics text exposition of a registry (what Prometheus asks for first).
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
        out.clear();
    }
    out
}

/// The same exposition in the Prometheus text format 0.0.4, for scrapers and tools that do not
/// ask for OpenMetrics (a plain `curl`, older agents). The two differ only in the family names
/// of counters (OpenMetrics names the family without `_total`, 0.0.4 names it as its sample),
/// the `# UNIT` lines and the closing `# EOF`, which 0.0.4 does not have.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> =
        openmetrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(openmetrics.len() + 8 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "].into_iter().find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                if !tail.is_empty() {
                    out.push(' ');
                    out.push_str(tail);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}
