//! How full subguard's caches are, read from the serving policy at each scrape: the verified-token
//! cache, each remote directory's cache of answers, and the users each tenant's users file lists.
//!
//! What an operator sizes `token.cache_max_entries` and `directory.cache.max_entries` by, beside
//! the hit and eviction counters; and a users file that a bad deploy emptied shows as a tenant
//! with 0 users although the file was valid. Read at scrape time like the key metrics
//! (`key_metrics.rs`): a reload's new caches and files are what the next scrape shows, and a
//! tenant or directory no longer served loses its series.

use std::collections::BTreeMap;
use std::sync::Weak;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;

use super::State;
use crate::directory::Backend;
use crate::telemetry::Name;

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct DirectoryLabels {
    directory: Name,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct TenantLabels {
    tenant: Name,
}

fn gauge(n: u64) -> ConstGauge {
    ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX))
}

/// Registered in the admin registry; holds the state weakly (the state owns the registry).
#[derive(Debug)]
pub struct CacheMetrics(pub Weak<State>);

impl Collector for CacheMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(state) = self.0.upgrade() else { return Ok(()) };
        let policy = state.policy.load();
        // Sorted by label, so the exposition is stable from scrape to scrape.
        let cached: BTreeMap<DirectoryLabels, u64> = policy
            .directories()
            .filter_map(|d| {
                Some((DirectoryLabels { directory: Name(d.name().into()) }, d.cache()?.entry_count()))
            })
            .collect();
        let mut users: BTreeMap<TenantLabels, u64> = BTreeMap::new();
        for tenant in policy.tenants.values() {
            if let Backend::File(file) = tenant.directory.backend() {
                let listed = file.snapshot().tenants.get(tenant.name.as_ref()).map_or(0, |u| u.len() as u64);
                users.insert(TenantLabels { tenant: Name(tenant.name.clone()) }, listed);
            }
        }
        let family = encoder.encode_descriptor(
            "token_cache_entries",
            "Verified tokens in the token cache of the config version serving",
            None,
            MetricType::Gauge,
        )?;
        gauge(policy.token_cache_entries()).encode(family)?;
        let mut family = encoder.encode_descriptor(
            "directory_cache_entries",
            "Cached answers of each remote directory (approximate: the cache counts as it does its housekeeping)",
            None,
            MetricType::Gauge,
        )?;
        for (labels, n) in &cached {
            gauge(*n).encode(family.encode_family(labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "directory_file_users",
            "Users the serving users file lists for each tenant whose directory is a users file",
            None,
            MetricType::Gauge,
        )?;
        for (labels, n) in &users {
            gauge(*n).encode(family.encode_family(labels)?)?;
        }
        Ok(())
    }
}
