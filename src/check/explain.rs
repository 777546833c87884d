//! The step recorder of `subguard explain`: what each stage of the pipeline saw and concluded.
//!
//! [`Policy::check_with`](super::Policy::check_with) records into a [`Trace`] only when it is
//! given one; the live server passes `None`, so nothing here is built on the hot path. Recording
//! never changes a decision: the same code decides, the trace only watches. It never holds the
//! token's signature or a directory credential.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;

/// How one step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The step passed.
    Pass,
    /// The step decided the deny.
    Fail,
    /// Context: neither passed nor failed (a bypassed cache, a key fetch report, a hint).
    Info,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Fail => "fail",
            Status::Info => "info",
        }
    }
}

/// One stage's observation.
#[derive(Debug, Clone)]
pub struct Step {
    /// `tenant`, `token`, `issuer`, `key`, `signature`, `time`, `audience`, `subject`, `directory`, ...
    pub stage: &'static str,
    pub status: Status,
    /// One line for people.
    pub summary: String,
    /// The facts behind the summary, for scripts (`Null` when there are none).
    pub data: Value,
}

/// The steps of one traced check, in pipeline order.
#[derive(Debug, Default)]
pub struct Trace {
    pub steps: Vec<Step>,
}

impl Trace {
    pub fn push(&mut self, stage: &'static str, status: Status, summary: impl Into<String>, data: Value) {
        self.steps.push(Step { stage, status, summary: summary.into(), data });
    }
}

/// Records a step when tracing; `step` is only called then, so the live path allocates nothing.
pub(super) fn note(trace: &mut Option<&mut Trace>, step: impl FnOnce() -> Step) {
    if let Some(t) = trace.as_deref_mut() {
        t.steps.push(step());
    }
}

pub(super) fn step(stage: &'static str, status: Status, summary: impl Into<String>, data: Value) -> Step {
    Step { stage, status, summary: summary.into(), data }
}

/// The decoded header and claims of a compact token, for display only (the decision reads
/// [`super::token::parse`]). The signature segment is never decoded or returned.
pub fn decode_for_display(token: &str) -> (Option<Value>, Option<Value>) {
    let mut parts = token.split('.');
    let decode = |part: Option<&str>| {
        part.and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
            .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
    };
    let header = decode(parts.next());
    let claims = decode(parts.next());
    (header, claims)
}

/// `3m12s`, `1h0m5s`, `45s`.
pub fn human_duration(secs: i64) -> String {
    let s = secs.unsigned_abs();
    let (h, m, s) = (s / 3600, (s % 3600) / 60, s % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(human_duration(0), "0s");
        assert_eq!(human_duration(45), "45s");
        assert_eq!(human_duration(192), "3m12s");
        assert_eq!(human_duration(-192), "3m12s");
        assert_eq!(human_duration(3605), "1h0m5s");
    }

    #[test]
    fn display_decoding_never_touches_the_signature() {
        let t = format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256"}"#),
            URL_SAFE_NO_PAD.encode(r#"{"sub":"s"}"#),
            "c2ln"
        );
        let (h, c) = decode_for_display(&t);
        assert_eq!(h.unwrap()["alg"], "RS256");
        assert_eq!(c.unwrap()["sub"], "s");
        assert_eq!(decode_for_display("x"), (None, None));
    }
}
