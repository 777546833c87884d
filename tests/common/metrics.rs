//! Reading subguard's `/metrics` (the Prometheus text exposition) in tests: the samples of one
//! family, matched by their labels as parsed, not by the order they are written in.

use std::collections::BTreeMap;

/// One sample: its labels and value.
#[derive(Debug)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Every sample of the family `name` (exactly: `name{...} v` or `name v`).
pub fn samples(metrics: &str, name: &str) -> Vec<Sample> {
    metrics
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => r.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            let labels = labels
                .split(',')
                .filter(|kv| !kv.is_empty())
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_string(), v.trim_matches('"').to_string()))
                })
                .collect();
            Some(Sample { labels, value: value.split_whitespace().next()?.parse().ok()? })
        })
        .collect()
}

/// The value of the sample of `name` with exactly these labels, if there is one.
pub fn sample(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let wanted: BTreeMap<String, String> =
        labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    samples(metrics, name).into_iter().find(|s| s.labels == wanted).map(|s| s.value)
}

/// As [`sample`], for a series that must be there: absent fails, showing the whole exposition
/// (0 would hide a metric that is not exported).
#[track_caller]
pub fn required(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(metrics, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?}:\n{metrics}"))
}

/// As [`sample`], 0 when absent (a counter not yet created).
pub fn value(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(metrics, name, labels).unwrap_or(0.0)
}
