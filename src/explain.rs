//! `subguard explain`: why one token is allowed or denied, step by step.
//!
//! Runs the live pipeline ([`Policy::check_with`]) with a step recorder against the real config,
//! then renders the decision with the server's own [`render`], so what it prints is what Envoy
//! would get. On `user_not_found` it adds hints from read-only lookups: the same sub in another
//! tenant, or a sub that differs only in case or surrounding whitespace. It never prints the
//! token's signature or a directory credential.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::HeaderValueOption;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use serde_json::{Value, json};

use crate::check::explain::{Status, Step, Trace};
use crate::check::{Policy, RequestView};
use crate::decision::{Decision, Outcome, Reason};
use crate::directory::{Backend, Lookup};
use crate::server::grpc::render;

/// Remote directories of at most this many other tenants are asked for the same sub.
const MAX_OTHER_TENANT_LOOKUPS: usize = 10;

/// A request assembled from the command line.
#[derive(Debug, Default)]
pub struct ExplainRequest {
    /// Lowercase names.
    pub headers: HashMap<String, String>,
    pub host: Option<String>,
    pub route_tenant: Option<String>,
}

impl ExplainRequest {
    /// Builds the request: `--header` values, the token as `Authorization: Bearer`, and `--tenant`
    /// through the configured tenant header (or as the route's tenant when there is none). A header
    /// given more than once (by `--header` twice, or by `--header` and `--token` or `--tenant`) is
    /// joined with commas, as Envoy joins a repeated header before it asks subguard: what `serve`
    /// would see.
    pub fn build(
        policy: &Policy,
        headers: &[(String, String)],
        token: Option<&str>,
        tenant: Option<&str>,
        host: Option<&str>,
    ) -> ExplainRequest {
        let mut req = ExplainRequest::default();
        let mut add = |name: String, value: String| {
            req.headers
                .entry(name)
                .and_modify(|joined| {
                    joined.push(',');
                    joined.push_str(&value);
                })
                .or_insert(value);
        };
        for (k, v) in headers {
            add(k.to_ascii_lowercase(), v.clone());
        }
        if let Some(t) = token {
            add("authorization".into(), format!("Bearer {t}"));
        }
        if let Some(t) = tenant {
            match &policy.tenant_sources.header {
                Some(h) => add(h.clone(), t.to_string()),
                None => req.route_tenant = Some(t.to_string()),
            }
        }
        req.host = host.map(str::to_string);
        req
    }
}

impl RequestView for ExplainRequest {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    fn host(&self) -> Option<&str> {
        self.host.as_deref().or_else(|| self.header(":authority")).or_else(|| self.header("host"))
    }

    fn route_tenant(&self) -> Option<&str> {
        self.route_tenant.as_deref()
    }
}

/// Everything `explain` found.
#[derive(Debug)]
pub struct Report {
    pub at: i64,
    pub steps: Vec<Step>,
    pub hints: Vec<String>,
    pub decision: Decision,
    /// The decision as Envoy would get it.
    pub response: Value,
}

impl Report {
    /// 0 allow, 1 deny.
    pub fn exit_code(&self) -> u8 {
        if self.decision.is_allow() { 0 } else { 1 }
    }

    pub fn to_json(&self) -> Value {
        let steps: Vec<Value> = self
            .steps
            .iter()
            .map(|s| json!({"stage": s.stage, "status": s.status.name(), "summary": s.summary, "data": s.data}))
            .collect();
        json!({"at": self.at, "steps": steps, "hints": self.hints, "decision": self.response})
    }

    pub fn to_text(&self) -> String {
        let mut out = format!("subguard explain at {} (unix seconds)\n\n", self.at);
        for s in &self.steps {
            out.push_str(&format!("[{:<4}] {:<10} {}\n", s.status.name(), s.stage, s.summary));
            if s.stage == "token" {
                for part in ["header", "claims"] {
                    if let Some(v) = s.data.get(part).filter(|v| !v.is_null()) {
                        out.push_str(&format!("{:18}{part}: {v}\n", ""));
                    }
                }
            }
        }
        if !self.hints.is_empty() {
            out.push_str("\nhints:\n");
            for h in &self.hints {
                out.push_str(&format!("  - {h}\n"));
            }
        }
        let r = &self.response;
        out.push_str("\ndecision: ");
        match r["status"].as_u64() {
            Some(status) => out.push_str(&format!("DENY {status} {}\n", r["reason"].as_str().unwrap_or(""))),
            None => out.push_str("ALLOW\n"),
        }
        if let Some(d) = r["detail"].as_str() {
            out.push_str(&format!("  detail: {d}\n"));
        }
        if r["as_error_response"] == true {
            out.push_str("  sent as error_response (outage_response: error)\n");
        }
        let label = if self.decision.is_allow() { "upstream headers" } else { "response headers" };
        out.push_str(&format!("  {label}:\n"));
        for h in r["headers"].as_array().into_iter().flatten() {
            out.push_str(&format!("    {}: {}\n", h[0].as_str().unwrap_or(""), h[1].as_str().unwrap_or("")));
        }
        for h in r["headers_to_remove"].as_array().into_iter().flatten() {
            out.push_str(&format!("    (removed) {}\n", h.as_str().unwrap_or("")));
        }
        if let Some(body) = r["raw_body"].as_str().filter(|b| !b.is_empty()) {
            out.push_str(&format!("  body: {body}\n"));
        }
        out
    }
}

/// Runs the traced check at `at` and renders its decision. `key_errors` are the failures of the
/// up-front key fetch, shown as a step before the pipeline's.
pub async fn explain(policy: &Policy, req: &ExplainRequest, at: i64, key_errors: Vec<String>) -> Report {
    let mut trace = Trace::default();
    for e in key_errors {
        trace.push("keys", Status::Info, format!("could not fetch keys: {e}"), Value::Null);
    }
    let decision = policy.check_with(req, at, Some(&mut trace)).await;
    let hints = match decision.outcome {
        Outcome::Deny(Reason::UserNotFound) => user_not_found_hints(policy, &decision).await,
        _ => Vec::new(),
    };
    let response = response_json(&decision, policy, req.header("x-request-id"));
    Report { at, steps: trace.steps, hints, decision, response }
}

/// The rendered `CheckResponse`, flattened for people and scripts.
fn response_json(d: &Decision, policy: &Policy, request_id: Option<&str>) -> Value {
    let r = render(d, policy, request_id);
    let pairs = |headers: &[HeaderValueOption]| -> Vec<Value> {
        headers.iter().filter_map(|o| o.header.as_ref()).map(|h| json!([h.key, h.value])).collect()
    };
    let grpc_status = r.status.as_ref().map(|s| s.code).unwrap_or(0);
    let as_error = matches!(&r.http_response, Some(HttpResponse::ErrorResponse(_)));
    let mut out = json!({
        "decision": if d.is_allow() { "allow" } else { "deny" },
        "reason": d.reason_code(),
        "grpc_status": grpc_status,
        "status": null,
        "tenant": d.tenant.as_deref(),
        "issuer": d.issuer.as_deref(),
        "sub": d.sub,
        "detail": d.detail,
    });
    match r.http_response {
        Some(HttpResponse::OkResponse(ok)) => {
            out["headers"] = json!(pairs(&ok.headers));
            out["headers_to_remove"] = json!(ok.headers_to_remove);
        }
        Some(HttpResponse::DeniedResponse(denied)) | Some(HttpResponse::ErrorResponse(denied)) => {
            out["as_error_response"] = json!(as_error);
            out["status"] = json!(denied.status.map(|s| s.code));
            out["headers"] = json!(pairs(&denied.headers));
            out["body"] = serde_json::from_str(&denied.body).unwrap_or(Value::Null);
            out["raw_body"] = json!(denied.body);
        }
        None => {}
    }
    out
}

/// Where a missing user may be instead: the same sub in another tenant, or a sub that differs only
/// in case or surrounding whitespace. Lookups here are read-only and bypass the cache.
async fn user_not_found_hints(policy: &Policy, d: &Decision) -> Vec<String> {
    let (Some(tenant_name), Some(sub)) = (d.tenant.as_deref(), d.sub.as_deref()) else {
        return Vec::new();
    };
    let Some(tenant) = policy.tenants.get(tenant_name) else { return Vec::new() };
    let dir = &tenant.directory;
    let looked_up = dir.normalize(sub).into_owned();
    let mut hints = Vec::new();

    match dir.backend() {
        Backend::File(f) => {
            let users = f.snapshot();
            let mut others: Vec<&str> = users
                .tenants
                .iter()
                .filter(|(t, subs)| t.as_str() != tenant_name && subs.contains_key(looked_up.as_str()))
                .map(|(t, _)| t.as_str())
                .collect();
            others.sort_unstable();
            for other in others {
                hints.push(format!(
                    "sub {sub:?} exists in tenant {other} of {}, not in tenant {tenant_name}: \
                     the request names the wrong tenant, or the user was added to the wrong one",
                    f.path().display()
                ));
            }
            if let Some(subs) = users.tenants.get(tenant_name) {
                let mut near: Vec<&str> = subs
                    .keys()
                    .map(|k| &**k)
                    .filter(|k| *k != looked_up && fold(k) == fold(&looked_up))
                    .collect();
                near.sort_unstable();
                for n in near {
                    hints.push(variant_hint(sub, n, tenant_name));
                }
            }
        }
        Backend::Http(_) | Backend::Scim(_) => {
            let mut variants = vec![looked_up.trim().to_string(), looked_up.to_lowercase(), fold(&looked_up)];
            variants.sort();
            variants.dedup();
            for v in variants.into_iter().filter(|v| *v != looked_up && !v.is_empty()) {
                if let Ok(Lookup::Found(_)) = dir.lookup_uncached(tenant_name, &v).await {
                    hints.push(format!(
                        "{} ({})",
                        variant_hint(sub, &v, tenant_name),
                        dir.describe(tenant_name, &v)
                    ));
                }
            }
        }
    }

    let mut others: Vec<_> = policy.tenants.values().filter(|t| &*t.name != tenant_name).collect();
    others.sort_by(|a, b| a.name.cmp(&b.name));
    let remote = others.into_iter().filter(|t| !matches!(t.directory.backend(), Backend::File(_)));
    for other in remote.take(MAX_OTHER_TENANT_LOOKUPS) {
        let v = other.directory.normalize(sub);
        if let Ok(Lookup::Found(_)) = other.directory.lookup_uncached(&other.name, &v).await {
            hints.push(format!(
                "sub {sub:?} exists in tenant {} ({}), not in tenant {tenant_name}",
                other.name,
                other.directory.describe(&other.name, &v)
            ));
        }
    }
    hints
}

fn fold(s: &str) -> String {
    s.trim().to_lowercase()
}

fn variant_hint(sub: &str, found: &str, tenant: &str) -> String {
    let what = if sub.trim() == found.trim() {
        "surrounding whitespace"
    } else if sub.trim().eq_ignore_ascii_case(found.trim()) && sub.trim() == sub && found.trim() == found {
        "case"
    } else {
        "case and surrounding whitespace"
    };
    format!(
        "tenant {tenant} has {found:?}, which differs from the token's sub {sub:?} only in {what}: \
         fix the directory entry, or set the directory's `normalize` (trim, lowercase)"
    )
}
