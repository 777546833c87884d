//! The issuer-key metrics, read from the serving policy at each scrape: how many usable keys each
//! tenant's issuer has, and when they were last fetched (or their file last read).
//!
//! Computed at scrape time rather than set when keys load: a reload that removes an issuer removes
//! its series with it, so an alert on the keys' age never fires for an issuer no longer served, and
//! a key store shared by a reload needs no bookkeeping.

use std::collections::BTreeMap;
use std::sync::Weak;
use std::time::UNIX_EPOCH;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

use super::State;
use crate::telemetry::Name;

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct KeyLabels {
    tenant: Name,
    issuer: Name,
}

/// Registered in the admin registry; holds the state weakly (the state owns the registry).
#[derive(Debug)]
pub struct KeyMetrics(pub Weak<State>);

impl Collector for KeyMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(state) = self.0.upgrade() else { return Ok(()) };
        let policy = state.policy.load();
        // Sorted, and one series per (tenant, issuer) however the config repeats itself.
        let mut seen: BTreeMap<KeyLabels, (i64, Option<f64>)> = BTreeMap::new();
        for tenant in policy.tenants.values() {
            for issuer in &tenant.issuers {
                let labels =
                    KeyLabels { tenant: Name(tenant.name.clone()), issuer: Name(issuer.iss.clone()) };
                let set = issuer.keys.current();
                // Usable: able to verify a token this tenant accepts from the issuer. A set of RSA
                // keys for an ES256-only issuer reads 0, as it verifies nothing.
                let keys = set
                    .as_ref()
                    .map_or(0, |s| i64::try_from(s.fitting(&issuer.algorithms)).unwrap_or(i64::MAX));
                let fetched = set
                    .as_ref()
                    .and_then(|s| s.fetched_at.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_secs_f64());
                seen.insert(labels, (keys, fetched));
            }
        }
        let mut family = encoder.encode_descriptor(
            "jwks_keys",
            "Usable signing keys of each tenant's issuer (of a type one of its algorithms verifies), as serving now (0 before any loaded)",
            None,
            MetricType::Gauge,
        )?;
        for (labels, (keys, _)) in &seen {
            ConstGauge::new(*keys).encode(family.encode_family(labels)?)?;
        }
        let seconds = Unit::Seconds;
        let mut family = encoder.encode_descriptor(
            "jwks_last_success_timestamp",
            "When the serving keys of each tenant's issuer were fetched, or their file read (Unix time)",
            Some(&seconds),
            MetricType::Gauge,
        )?;
        for (labels, (_, fetched)) in &seen {
            if let Some(at) = fetched {
                ConstGauge::new(*at).encode(family.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
}
