//! Fleet-wide revocation through Redis (SPEC §5; the operator's view is docs/revocation.md).
//!
//! Two things travel through one Redis that every sidecar of the fleet shares:
//!
//! - **Revoked tokens**: a key `<key_prefix>revoked:<jti>` per revoked token, expiring with the
//!   token. Every allowed decision for a token with a `jti` asks whether its key exists; the answer
//!   "not revoked" is reused locally for `jti_cache_ms`, a "revoked" answer until the token expires.
//! - **User events** on the pub/sub channel (see [`event`]): every sidecar evicts the user's cached
//!   directory answer at once and holds the event's verdict (deleted, disabled, tokens revoked) for
//!   `event_hold_seconds`, long enough for the directory itself to catch up.
//!
//! Redis is never on the critical path of availability: when it cannot be asked, checks go on with
//! what is known (revoked tokens and events seen so far) and allow, or deny with
//! `revocation_unavailable` when `fail_closed` is set. The subscriber reconnects with exponential
//! backoff and, once subscribed again, drops every cached directory answer, since it may have missed
//! events while it was away.

pub mod event;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use moka::Expiry;
use redis::aio::ConnectionManager;
use tokio_stream::StreamExt;

use crate::check::Policy;
use crate::config::RevocationSettings;
use crate::directory::Directory;
use crate::telemetry::Metrics;
pub use event::Event;

/// After a failed Redis command, checks stop asking Redis for this long (they use what is known);
/// then one check at a time asks whether it is back, so an outage costs one timeout per second,
/// not one per request.
const DOWN_FOR: Duration = Duration::from_secs(1);

/// A revoked `jti` is remembered locally this long past its `exp` (covers any clock leeway).
const REVOKED_MARGIN: Duration = Duration::from_secs(3600);

/// Longest a revoked `jti` is remembered locally, whatever its `exp`.
const REVOKED_MAX: Duration = Duration::from_secs(30 * 24 * 3600);

/// Revoked `jti`s and held user verdicts remembered locally (each bounded).
const LOCAL_MAX_ENTRIES: u64 = 1_000_000;

/// Builds the Redis client for `settings` without connecting (so `validate` can use it offline).
pub fn redis_client(settings: &RevocationSettings) -> Result<redis::Client, String> {
    use redis::IntoConnectionInfo;
    let mut info = settings.url.0.as_str().into_connection_info().map_err(|e| format!("{e}"))?;
    let mut redis_settings = info.redis_settings().clone();
    if let Some(user) = &settings.username {
        redis_settings = redis_settings.set_username(user);
    }
    if let Some(password) = &settings.password {
        redis_settings = redis_settings.set_password(&password.0);
    }
    info = info.set_redis_settings(redis_settings);
    match &settings.ca_pem {
        Some(pem) => {
            // redis-rs reads the bundle only when it connects: check it now, so `validate` and a
            // reload refuse a bad file instead of every connection failing later.
            let certs =
                reqwest::Certificate::from_pem_bundle(pem).map_err(|e| format!("invalid CA bundle: {e}"))?;
            if certs.is_empty() {
                return Err("the CA bundle holds no PEM certificate".into());
            }
            redis::Client::build_with_tls(
                info,
                redis::TlsCertificates { client_tls: None, root_cert: Some(pem.clone()) },
            )
            .map_err(|e| format!("cannot use the CA bundle: {e}"))
        }
        None => redis::Client::open(info).map_err(|e| format!("{e}")),
    }
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// What events said about one user, held for `event_hold_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserMark {
    pub deleted: bool,
    pub disabled: bool,
    /// Tokens issued before this (unix seconds) are revoked.
    pub tokens_valid_after: Option<i64>,
    until: Instant,
}

struct UntilExpiry;

impl Expiry<(Arc<str>, Arc<str>), UserMark> for UntilExpiry {
    fn expire_after_create(&self, _: &(Arc<str>, Arc<str>), m: &UserMark, now: Instant) -> Option<Duration> {
        Some(m.until.saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _: &(Arc<str>, Arc<str>),
        m: &UserMark,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(m.until.saturating_duration_since(now))
    }
}

struct ExpExpiry;

impl Expiry<Arc<str>, i64> for ExpExpiry {
    fn expire_after_create(&self, _: &Arc<str>, exp: &i64, _: Instant) -> Option<Duration> {
        Some(remembered_for(*exp, unix_now()))
    }
}

/// How long a `jti` revoked until `exp` is remembered from `now`: until `exp` plus the margin (no
/// leeway accepts its token after that), at most [`REVOKED_MAX`]. A token that expired more than
/// the margin ago is not remembered at all; before, every revoked `jti` was kept at least the
/// margin from when it arrived, so a backlog of old revocations held memory for an hour.
fn remembered_for(exp: i64, now: i64) -> Duration {
    let until = exp.saturating_add(REVOKED_MARGIN.as_secs() as i64);
    Duration::from_secs(until.saturating_sub(now).max(0) as u64).min(REVOKED_MAX)
}

/// What this sidecar knows, independent of how it reaches Redis: survives a reload that changes
/// the `revocation` settings.
pub struct Known {
    /// Revoked `jti` → its `exp`, until then (plus a margin).
    revoked: moka::sync::Cache<Arc<str>, i64>,
    /// (tenant, normalised sub) → what events said.
    marks: moka::sync::Cache<(Arc<str>, Arc<str>), UserMark>,
    /// Set once the first user event is held.
    any_marks: AtomicBool,
}

impl Default for Known {
    fn default() -> Self {
        Known {
            revoked: moka::sync::Cache::builder()
                .max_capacity(LOCAL_MAX_ENTRIES)
                .expire_after(ExpExpiry)
                .build(),
            marks: moka::sync::Cache::builder()
                .max_capacity(LOCAL_MAX_ENTRIES)
                .expire_after(UntilExpiry)
                .build(),
            any_marks: AtomicBool::new(false),
        }
    }
}

/// The answer for one `jti`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JtiStatus {
    Revoked,
    NotRevoked,
    /// Redis could not be asked and nothing is known about this `jti`.
    Unavailable(String),
}

/// Where the subscriber finds the policy that is serving now (to evict its directory caches).
pub type CurrentPolicy = Arc<dyn Fn() -> Option<Arc<Policy>> + Send + Sync>;

struct Shared {
    settings: RevocationSettings,
    client: redis::Client,
    conn: OnceLock<Result<ConnectionManager, String>>,
    known: Arc<Known>,
    /// `jti` → revoked, reused for `jti_cache`; concurrent misses of one `jti` share one request.
    answers: moka::future::Cache<Arc<str>, bool>,
    metrics: Arc<Metrics>,
    epoch: Instant,
    /// Milliseconds after `epoch` until which Redis is not asked (after a failure); 0 once an
    /// answer came after the last failure.
    down_until_ms: AtomicU64,
    /// Set while one check asks a Redis that failed last whether it is back.
    probing: AtomicBool,
    subscribed: AtomicBool,
    /// Built by a reload in place of another subscriber: events published between the two (the
    /// old one may have been disconnected for long) are lost, so the first subscription drops
    /// what is cached, as a reconnect does.
    replaces: bool,
}

/// The runtime side of `revocation:`. Owned by the [`Policy`]; a reload with the same settings
/// keeps it (and its connections), a reload with new settings builds a new one that inherits what
/// is [`Known`].
pub struct Revocation {
    shared: Arc<Shared>,
    subscriber: Mutex<Option<tokio::task::AbortHandle>>,
}

impl std::fmt::Debug for Revocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocation").field("redis", &self.shared.settings.display_url).finish()
    }
}

impl Drop for Revocation {
    fn drop(&mut self) {
        if let Ok(mut task) = self.subscriber.lock()
            && let Some(task) = task.take()
        {
            task.abort();
        }
    }
}

impl Revocation {
    /// Builds the client; connects nothing until first used. `known` is what the subscriber this
    /// one replaces (a reload) had learnt, `None` for the first.
    pub fn new(
        settings: RevocationSettings,
        known: Option<Arc<Known>>,
        metrics: Arc<Metrics>,
    ) -> Result<Revocation, String> {
        let client = redis_client(&settings)?;
        let answers = moka::future::Cache::builder()
            .max_capacity(LOCAL_MAX_ENTRIES)
            .time_to_live(settings.jti_cache.max(Duration::from_millis(1)))
            .build();
        let replaces = known.is_some();
        Ok(Revocation {
            shared: Arc::new(Shared {
                settings,
                client,
                conn: OnceLock::new(),
                replaces,
                known: known.unwrap_or_default(),
                answers,
                metrics,
                epoch: Instant::now(),
                down_until_ms: AtomicU64::new(0),
                probing: AtomicBool::new(false),
                subscribed: AtomicBool::new(false),
            }),
            subscriber: Mutex::new(None),
        })
    }

    pub fn settings(&self) -> &RevocationSettings {
        &self.shared.settings
    }

    pub fn known(&self) -> Arc<Known> {
        self.shared.known.clone()
    }

    /// Whether the subscriber is connected and subscribed right now.
    pub fn is_subscribed(&self) -> bool {
        self.shared.subscribed.load(Ordering::Acquire)
    }

    /// Starts the event subscriber (once; later calls do nothing). Needs a tokio runtime.
    pub fn start_subscriber(&self, current: CurrentPolicy) {
        let Ok(mut slot) = self.subscriber.lock() else { return };
        if slot.is_none() {
            let shared = self.shared.clone();
            *slot = Some(tokio::spawn(subscribe_forever(shared, current)).abort_handle());
        }
    }

    /// What events said about this user of `tenant`, if anything. `sub` is the token's; it is
    /// compared as `directory` compares it (its `normalize`).
    pub fn user_mark(&self, tenant: &Arc<str>, directory: &Directory, sub: &str) -> Option<UserMark> {
        // Most fleets go long without user events: skip normalising and the key allocation until
        // one arrives (moka's entry_count lags behind inserts, so it cannot serve as this flag).
        if !self.shared.known.any_marks.load(Ordering::Relaxed) {
            return None;
        }
        self.shared.known.marks.get(&(tenant.clone(), Arc::from(directory.normalize(sub).as_ref())))
    }

    /// Whether `jti` is revoked, from what is known locally or from Redis.
    pub async fn jti_status(&self, jti: &str) -> JtiStatus {
        let s = &self.shared;
        let metrics = &s.metrics;
        if s.known.revoked.contains_key(jti) {
            metrics.revocation_lookup("cache_hit");
            return JtiStatus::Revoked;
        }
        let cache = !s.settings.jti_cache.is_zero();
        if cache && let Some(revoked) = s.answers.get(jti).await {
            metrics.revocation_lookup("cache_hit");
            return if revoked { JtiStatus::Revoked } else { JtiStatus::NotRevoked };
        }
        if s.is_down() {
            metrics.revocation_lookup("unavailable");
            return JtiStatus::Unavailable("Redis failed within the last second; not asked".into());
        }
        // Redis failed last and its second is over: one check asks whether it is back. The others
        // use what is known meanwhile, instead of each waiting up to `timeout_ms` for a Redis
        // that is likely still down (with a stopped Redis every check of an unseen jti did).
        let Some(_probe) = s.probe() else {
            metrics.revocation_lookup("unavailable");
            return JtiStatus::Unavailable("Redis failed; another check is asking whether it is back".into());
        };
        let key: Arc<str> = Arc::from(jti);
        let asked = if cache {
            let shared = s.clone();
            let k = key.clone();
            s.answers.try_get_with(key, async move { shared.ask(&k).await }).await.map_err(|e| (*e).clone())
        } else {
            s.ask(&key).await
        };
        match asked {
            Ok(true) => {
                metrics.revocation_lookup("revoked");
                JtiStatus::Revoked
            }
            Ok(false) => {
                metrics.revocation_lookup("not_revoked");
                JtiStatus::NotRevoked
            }
            Err(e) => {
                metrics.revocation_lookup("unavailable");
                JtiStatus::Unavailable(e)
            }
        }
    }

    /// Applies one event to what is known and to `policy`'s directory caches. Returns `false` when
    /// the event names a tenant this sidecar does not serve.
    pub async fn apply(&self, event: &Event, policy: &Policy) -> bool {
        self.shared.apply(event, policy).await
    }

    /// Publishes `event` on the channel (for `subguard revoke` / `evict`). For `token.revoked`,
    /// first stores the revoked `jti` until `exp + leeway`. Returns how many subscribers got it.
    pub async fn publish(&self, event: &Event, leeway_seconds: u64) -> Result<usize, String> {
        let s = &self.shared;
        let mut conn = s.connection()?;
        let timeout = s.settings.timeout;
        if let Event::TokenRevoked { jti, exp } = event {
            let until = exp.saturating_add(leeway_seconds as i64);
            if until <= unix_now() {
                return Err(format!(
                    "the token expired at {exp} (plus {leeway_seconds}s leeway): nothing to revoke"
                ));
            }
            let mut set = redis::cmd("SET");
            set.arg(s.settings.jti_key(jti)).arg(exp).arg("EXAT").arg(until);
            tokio::time::timeout(timeout, set.query_async::<()>(&mut conn))
                .await
                .map_err(|_| "timed out storing the revoked jti".to_string())?
                .map_err(|e| format!("storing the revoked jti: {e}"))?;
        }
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(&s.settings.channel).arg(event.to_json());
        tokio::time::timeout(timeout, publish.query_async::<usize>(&mut conn))
            .await
            .map_err(|_| "timed out publishing the event".to_string())?
            .map_err(|e| format!("publishing the event: {e}"))
    }
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn is_down(&self) -> bool {
        self.now_ms() < self.down_until_ms.load(Ordering::Relaxed)
    }

    fn mark_down(&self) {
        self.down_until_ms.store(self.now_ms() + DOWN_FOR.as_millis() as u64, Ordering::Relaxed);
    }

    /// Whether this check may ask Redis: always while it answers; after a failure, one check at a
    /// time (`None` for the others), until one gets an answer.
    fn probe(&self) -> Option<Probe<'_>> {
        if self.down_until_ms.load(Ordering::Relaxed) == 0 {
            return Some(Probe(None));
        }
        // Not `then_some`: a `Probe` built and dropped for the losers would clear the winner's flag.
        (!self.probing.swap(true, Ordering::AcqRel)).then(|| Probe(Some(&self.probing)))
    }

    fn mark_up(&self) {
        if self.down_until_ms.load(Ordering::Relaxed) != 0 {
            self.down_until_ms.store(0, Ordering::Relaxed);
        }
    }

    fn connection(&self) -> Result<ConnectionManager, String> {
        self.conn
            .get_or_init(|| {
                // Connecting (TCP and TLS handshakes) may take longer than one command: each
                // check still waits at most `timeout`, while the connection finishes for the next.
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.settings.timeout.max(Duration::from_secs(1))))
                    .set_response_timeout(Some(self.settings.timeout))
                    .set_number_of_retries(1)
                    .set_min_delay(self.settings.reconnect_min)
                    .set_max_delay(self.settings.reconnect_max);
                ConnectionManager::new_lazy_with_config(self.client.clone(), config)
                    .map_err(|e| format!("Redis client: {e}"))
            })
            .clone()
    }

    /// Asks Redis whether `jti` is revoked (one GET, bounded by `timeout`).
    async fn ask(&self, jti: &str) -> Result<bool, String> {
        let result = async {
            let mut conn = self.connection()?;
            let mut get = redis::cmd("GET");
            get.arg(self.settings.jti_key(jti));
            let attempts = async {
                match get.query_async::<Option<String>>(&mut conn).await {
                    // A connection that broke while idle (Redis restarted) fails the first command
                    // and reconnects: one retry, within the same timeout.
                    Err(e) if e.is_connection_dropped() || e.is_io_error() => {
                        get.query_async::<Option<String>>(&mut conn).await
                    }
                    other => other,
                }
            };
            match tokio::time::timeout(self.settings.timeout, attempts).await {
                Err(_) => Err(format!("Redis did not answer within {:?}", self.settings.timeout)),
                Ok(Err(e)) => Err(format!("Redis: {e}")),
                Ok(Ok(v)) => Ok(v),
            }
        }
        .await;
        if result.is_ok() {
            self.mark_up();
        }
        match result {
            Ok(None) => Ok(false),
            Ok(Some(value)) => {
                // The value is the token's exp; anything else still means revoked.
                let exp = value.trim().parse::<i64>().unwrap_or_else(|_| unix_now());
                self.known.revoked.insert(Arc::from(jti), exp);
                Ok(true)
            }
            Err(e) => {
                if !self.is_down() {
                    tracing::warn!(error = %e, "revocation store lookup failed; using what is known for 1s");
                }
                self.mark_down();
                Err(e)
            }
        }
    }

    async fn apply(&self, event: &Event, policy: &Policy) -> bool {
        if let Event::TokenRevoked { jti, exp } = event {
            let jti: Arc<str> = Arc::from(jti.as_str());
            self.known.revoked.insert(jti.clone(), *exp);
            self.answers.invalidate(&jti).await;
            return true;
        }
        let Some((tenant, sub)) = event.user() else { return false };
        let Some(t) = policy.tenants.get(tenant) else { return false };
        let normalized = t.directory.normalize(sub);
        let key = (t.name.clone(), Arc::from(normalized.as_ref()));
        t.directory.evict(&t.name, sub).await;
        let hold = Instant::now() + self.settings.event_hold;
        let blank = UserMark { deleted: false, disabled: false, tokens_valid_after: None, until: hold };
        let marks = &self.known.marks;
        self.known.any_marks.store(true, Ordering::Relaxed);
        match event {
            Event::UserUpdated { .. } => marks.invalidate(&key),
            Event::UserDeleted { .. } => {
                let mut m = marks.get(&key).unwrap_or(blank);
                m.deleted = true;
                m.until = hold;
                marks.insert(key, m);
            }
            Event::UserDisabled { .. } => {
                let mut m = marks.get(&key).unwrap_or(blank);
                m.disabled = true;
                m.until = hold;
                marks.insert(key, m);
            }
            Event::UserTokensRevoked { tokens_valid_after, .. } => {
                let mut m = marks.get(&key).unwrap_or(blank);
                m.tokens_valid_after =
                    Some(m.tokens_valid_after.unwrap_or(i64::MIN).max(*tokens_valid_after));
                m.until = hold;
                marks.insert(key, m);
            }
            Event::TokenRevoked { .. } => {}
        }
        true
    }

    /// Everything cached from Redis or the directories may be out of date (events were missed).
    async fn forget_cached(&self, policy: Option<&Policy>) {
        self.answers.invalidate_all();
        if let Some(p) = policy {
            for t in p.tenants.values() {
                t.directory.evict_all();
            }
        }
    }
}

/// The right to ask Redis after a failure, held by one check; given back when dropped (also when
/// the check is cancelled).
struct Probe<'a>(Option<&'a AtomicBool>);

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        if let Some(flag) = self.0 {
            flag.store(false, Ordering::Release);
        }
    }
}

/// Connects, subscribes and applies events; on any failure waits (exponential backoff with
/// jitter, `reconnect_min_ms` to `reconnect_max_ms`) and starts again. Runs until aborted.
async fn subscribe_forever(shared: Arc<Shared>, current: CurrentPolicy) {
    let settings = &shared.settings;
    let mut delay = settings.reconnect_min;
    let mut failures: u64 = 0;
    let mut ever_subscribed = shared.replaces;
    loop {
        let result = subscribe_once(&shared, &current, &mut ever_subscribed, &mut failures).await;
        let was_up = shared.subscribed.swap(false, Ordering::AcqRel);
        shared.metrics.revocation_connected(false);
        if was_up {
            delay = settings.reconnect_min;
            tracing::warn!(
                redis = %settings.display_url,
                error = %result,
                "revocation subscriber lost Redis; checks go on with what is known, reconnecting"
            );
        } else {
            failures += 1;
            if failures == 1 || failures.is_multiple_of(20) {
                tracing::warn!(
                    redis = %settings.display_url,
                    error = %result,
                    attempts = failures,
                    retry_in_ms = delay.as_millis() as u64,
                    "revocation subscriber cannot reach Redis"
                );
            }
        }
        shared.metrics.revocation_reconnect();
        tokio::time::sleep(jitter(delay)).await;
        delay = (delay * 2).min(settings.reconnect_max);
    }
}

/// Between 50% and 100% of `d`, so a fleet does not reconnect in lockstep.
fn jitter(d: Duration) -> Duration {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|t| t.subsec_nanos()).unwrap_or(0);
    let share = 0.5 + (nanos % 1000) as f64 / 2000.0;
    d.mul_f64(share)
}

/// One connection's life. Returns why it ended.
async fn subscribe_once(
    shared: &Arc<Shared>,
    current: &CurrentPolicy,
    ever_subscribed: &mut bool,
    failures: &mut u64,
) -> String {
    let settings = &shared.settings;
    let connect_timeout = settings.timeout.max(Duration::from_secs(1));
    let pubsub = match tokio::time::timeout(connect_timeout, shared.client.get_async_pubsub()).await {
        Err(_) => return format!("connecting timed out after {connect_timeout:?}"),
        Ok(Err(e)) => return format!("connecting: {e}"),
        Ok(Ok(p)) => p,
    };
    let (mut sink, mut stream) = pubsub.split();
    match tokio::time::timeout(connect_timeout, sink.subscribe(&settings.channel)).await {
        Err(_) => return "SUBSCRIBE timed out".into(),
        Ok(Err(e)) => return format!("SUBSCRIBE: {e}"),
        Ok(Ok(())) => {}
    }
    if *ever_subscribed {
        // Events published while we were away are lost: every cached answer may be stale.
        shared.forget_cached(current().as_deref()).await;
    }
    // Redis answers again: checks may ask it at once.
    shared.down_until_ms.store(0, Ordering::Relaxed);
    shared.subscribed.store(true, Ordering::Release);
    shared.metrics.revocation_connected(true);
    if *ever_subscribed {
        tracing::info!(
            redis = %settings.display_url,
            channel = %settings.channel,
            "revocation subscriber reconnected; dropped cached users and jti answers (events may have been missed)"
        );
    } else {
        tracing::info!(redis = %settings.display_url, channel = %settings.channel, "revocation subscriber subscribed");
    }
    *ever_subscribed = true;
    *failures = 0;
    let mut ping = tokio::time::interval(settings.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    loop {
        tokio::select! {
            msg = stream.next() => {
                let Some(msg) = msg else { return "the connection closed".into() };
                handle_message(shared, current, msg.get_payload_bytes()).await;
            }
            _ = ping.tick() => {
                match tokio::time::timeout(connect_timeout, sink.ping::<redis::Value>()).await {
                    Err(_) => return format!("PING not answered within {connect_timeout:?}"),
                    Ok(Err(e)) => return format!("PING: {e}"),
                    Ok(Ok(_)) => {}
                }
            }
        }
    }
}

async fn handle_message(shared: &Arc<Shared>, current: &CurrentPolicy, payload: &[u8]) {
    let event = match Event::parse(payload) {
        Ok(e) => e,
        Err(e) => {
            shared.metrics.revocation_event("invalid", "invalid");
            tracing::warn!(error = %e, bytes = payload.len(), "revocation event ignored: not a valid event");
            return;
        }
    };
    let Some(policy) = current() else { return };
    let applied = shared.apply(&event, &policy).await;
    let outcome = if applied { "applied" } else { "ignored" };
    shared.metrics.revocation_event(event.kind(), outcome);
    match (&event, applied) {
        (Event::TokenRevoked { exp, .. }, _) => {
            tracing::info!(event = event.kind(), exp, "revocation event applied")
        }
        (_, true) => {
            let (tenant, sub) = event.user().unwrap_or_default();
            tracing::info!(event = event.kind(), tenant, sub, "revocation event applied")
        }
        (_, false) => {
            let (tenant, _) = event.user().unwrap_or_default();
            tracing::debug!(event = event.kind(), tenant, "revocation event for a tenant not served here")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revoked_jti_is_remembered_until_its_exp_plus_the_margin() {
        let now = 1_800_000_000;
        let margin = REVOKED_MARGIN.as_secs() as i64;
        assert_eq!(remembered_for(now + 300, now), Duration::from_secs(300 + 3600));
        // Expired, but a leeway of up to an hour may still accept it: kept for what is left.
        assert_eq!(remembered_for(now - margin + 120, now), Duration::from_secs(120));
        // Past any leeway: nothing to remember.
        assert_eq!(remembered_for(now - margin - 1, now), Duration::ZERO);
        assert_eq!(remembered_for(i64::MIN, now), Duration::ZERO);
        assert_eq!(remembered_for(i64::MAX, now), REVOKED_MAX);
    }
}
