//! Fixture user directories.
//!
//! [`DirectoryServer`] (`directory.kind: http`) answers `GET /tenants/{tenant}/users/{sub}` per sub
//! as the test sets it (404 by default, or the answer given to `set_default`), with an optional
//! delay, and records every raw request path and every request (headers included).
//!
//! [`ScimServer`] (`directory.kind: scim`) is a small SCIM 2.0 service provider (RFC 7644): per
//! tenant it holds User resources and answers `GET {base}/Users?filter=<attr> eq "<value>"` with a
//! `ListResponse` and `GET {base}/Users/{id}` with the resource (404 with a SCIM error when there
//! is none). A filter that is not exactly one `eq` comparison with a string literal is answered
//! `400 invalidFilter`, as a provider that does not support the expression would. Answers can be
//! forced per filter or id (status, garbage, delay); every request is recorded as received.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use super::http_fixture::{FixtureRequest, FixtureResponse, Handler, HttpFixture};

/// What the directory answers for one sub.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub content_type: &'static str,
    pub delay: Duration,
}

impl Answer {
    /// The fixture's response, after the answer's delay.
    async fn send(self) -> FixtureResponse {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        FixtureResponse {
            status: self.status,
            headers: vec![("content-type".into(), self.content_type.into())],
            body: self.body.into_bytes(),
        }
    }

    /// 200 with this user document (`{"id"?, "roles"?, "disabled"?, "tokens_valid_after"?}`).
    pub fn user(doc: Value) -> Self {
        Answer { status: 200, body: doc.to_string(), content_type: "application/json", delay: Duration::ZERO }
    }

    pub fn status(status: u16) -> Self {
        Answer { status, body: "{}".into(), content_type: "application/json", delay: Duration::ZERO }
    }

    /// 200 `application/json` whose body is not JSON.
    pub fn garbage() -> Self {
        Answer {
            status: 200,
            body: "<html>oops".into(),
            content_type: "application/json",
            delay: Duration::ZERO,
        }
    }

    pub fn delayed(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

#[derive(Default)]
struct State {
    answers: HashMap<String, Answer>,
    /// Raw request paths (percent-encoding as received).
    paths: Vec<String>,
    /// Requests per decoded (tenant, sub).
    counts: HashMap<(String, String), usize>,
    /// Every request as received (method, raw path and query, headers).
    received: Vec<FixtureRequest>,
    /// The answer for subs without their own (`None`: 404).
    default: Option<Answer>,
}

pub struct DirectoryServer {
    http: HttpFixture,
    state: Arc<Mutex<State>>,
}

impl DirectoryServer {
    pub fn start() -> Self {
        let state = Arc::new(Mutex::new(State::default()));
        let handler: Handler = {
            let state = state.clone();
            Arc::new(move |req| {
                let state = state.clone();
                Box::pin(async move {
                    let segments: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
                    let answer = {
                        let mut s = state.lock().unwrap();
                        s.paths.push(match &req.query {
                            Some(q) => format!("{}?{q}", req.path),
                            None => req.path.clone(),
                        });
                        s.received.push(req.clone());
                        match segments.as_slice() {
                            ["tenants", tenant, "users", sub] => {
                                let (tenant, sub) = (percent_decode(tenant), percent_decode(sub));
                                *s.counts.entry((tenant, sub.clone())).or_default() += 1;
                                s.answers
                                    .get(&sub)
                                    .or(s.default.as_ref())
                                    .cloned()
                                    .unwrap_or_else(|| Answer::status(404))
                            }
                            _ => Answer::status(400),
                        }
                    };
                    answer.send().await
                })
            })
        };
        DirectoryServer { http: HttpFixture::start(handler), state }
    }

    /// `http://127.0.0.1:PORT/tenants/{tenant}/users/{sub}` for `directory.url`.
    pub fn url_template(&self) -> String {
        format!("{}/tenants/{{tenant}}/users/{{sub}}", self.http.base_url())
    }

    pub fn set(&self, sub: &str, answer: Answer) {
        self.state.lock().unwrap().answers.insert(sub.to_string(), answer);
    }

    /// Requests for this (tenant, sub), decoded.
    pub fn requests(&self, tenant: &str, sub: &str) -> usize {
        let s = self.state.lock().unwrap();
        s.counts.get(&(tenant.to_string(), sub.to_string())).copied().unwrap_or(0)
    }

    /// The answer for every sub that has none of its own (instead of 404).
    pub fn set_default(&self, answer: Answer) {
        self.state.lock().unwrap().default = Some(answer);
    }

    pub fn raw_paths(&self) -> Vec<String> {
        self.state.lock().unwrap().paths.clone()
    }

    /// Every request received so far, in order.
    pub fn received(&self) -> Vec<FixtureRequest> {
        self.state.lock().unwrap().received.clone()
    }

    /// How many requests reached the server, whatever their path.
    pub fn total_requests(&self) -> usize {
        self.state.lock().unwrap().paths.len()
    }

    pub fn stop(&self) {
        self.http.stop();
    }

    pub fn start_again(&self) {
        self.http.resume();
    }
}

pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------------------------
// SCIM 2.0

pub const LIST_RESPONSE: &str = "urn:ietf:params:scim:api:messages:2.0:ListResponse";
pub const SCIM_ERROR: &str = "urn:ietf:params:scim:api:messages:2.0:Error";
pub const USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:User";

/// A SCIM error document (RFC 7644 §3.12).
pub fn scim_error(status: u16, scim_type: Option<&str>, detail: &str) -> Value {
    let mut doc =
        serde_json::json!({"schemas": [SCIM_ERROR], "status": status.to_string(), "detail": detail});
    if let Some(t) = scim_type {
        doc["scimType"] = Value::String(t.to_string());
    }
    doc
}

#[derive(Default)]
struct ScimState {
    /// User resources per tenant (the first path segment of the request).
    users: HashMap<String, Vec<Value>>,
    /// Forced answers per (tenant, decoded filter) or (tenant, "id:<decoded id>").
    forced: HashMap<(String, String), Answer>,
    received: Vec<FixtureRequest>,
}

/// A SCIM 2.0 service provider for `directory.kind: scim`, rooted at
/// `http://127.0.0.1:PORT/{tenant}/scim/v2` (see the module comment).
pub struct ScimServer {
    http: HttpFixture,
    state: Arc<Mutex<ScimState>>,
}

impl ScimServer {
    pub fn start() -> Self {
        let state = Arc::new(Mutex::new(ScimState::default()));
        let handler: Handler = {
            let state = state.clone();
            Arc::new(move |req| {
                let state = state.clone();
                Box::pin(async move {
                    let answer = {
                        let mut s = state.lock().unwrap();
                        s.received.push(req.clone());
                        scim_answer(&s, &req)
                    };
                    answer.send().await
                })
            })
        };
        ScimServer { http: HttpFixture::start(handler), state }
    }

    /// `http://127.0.0.1:PORT/{tenant}/scim/v2` for `directory.url` (`{tenant}` left in place).
    pub fn base_template(&self) -> String {
        format!("{}/{{tenant}}/scim/v2", self.http.base_url())
    }

    /// Adds a User resource to a tenant (`schemas` is added when missing).
    pub fn add_user(&self, tenant: &str, mut user: Value) {
        if user.get("schemas").is_none() {
            user["schemas"] = serde_json::json!([USER_SCHEMA]);
        }
        self.state.lock().unwrap().users.entry(tenant.to_string()).or_default().push(user);
    }

    /// Forces the answer to `GET .../Users?filter=<filter>` (the decoded filter text).
    pub fn force_filter(&self, tenant: &str, filter: &str, answer: Answer) {
        self.state.lock().unwrap().forced.insert((tenant.to_string(), filter.to_string()), answer);
    }

    /// Forces the answer to `GET .../Users/<id>` (the decoded id).
    pub fn force_id(&self, tenant: &str, id: &str, answer: Answer) {
        self.state.lock().unwrap().forced.insert((tenant.to_string(), format!("id:{id}")), answer);
    }

    /// Every request received so far, in order.
    pub fn received(&self) -> Vec<FixtureRequest> {
        self.state.lock().unwrap().received.clone()
    }

    /// `path?query` of every request, exactly as received.
    pub fn raw_requests(&self) -> Vec<String> {
        self.received()
            .iter()
            .map(|r| match &r.query {
                Some(q) => format!("{}?{q}", r.path),
                None => r.path.clone(),
            })
            .collect()
    }
}

/// The value of the `filter` query parameter, decoded.
fn filter_param(query: &str) -> Option<String> {
    query.split('&').find_map(|pair| pair.strip_prefix("filter=")).map(percent_decode)
}

fn scim_json(status: u16, doc: Value) -> Answer {
    Answer { status, body: doc.to_string(), content_type: "application/scim+json", delay: Duration::ZERO }
}

fn scim_answer(s: &ScimState, req: &FixtureRequest) -> Answer {
    let segments: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    let (tenant, rest) = match segments.as_slice() {
        [tenant, "scim", "v2", rest @ ..] => (percent_decode(tenant), rest),
        _ => return scim_json(404, scim_error(404, None, "no such endpoint")),
    };
    let users = s.users.get(&tenant).map(Vec::as_slice).unwrap_or(&[]);
    match rest {
        ["Users"] => {
            let Some(filter) = req.query.as_deref().and_then(filter_param) else {
                return scim_json(400, scim_error(400, Some("invalidFilter"), "a filter is required"));
            };
            if let Some(forced) = s.forced.get(&(tenant.clone(), filter.clone())) {
                return forced.clone();
            }
            // Exactly `<attr> eq <JSON string literal>`; anything else is not supported here.
            let parsed = filter.split_once(" eq ").and_then(|(attr, literal)| {
                let value: String = serde_json::from_str(literal).ok()?;
                attr.chars().all(|c| c.is_ascii_alphanumeric()).then(|| (attr.to_string(), value))
            });
            let Some((attr, value)) = parsed else {
                return scim_json(400, scim_error(400, Some("invalidFilter"), "unsupported filter"));
            };
            let matches: Vec<Value> = users
                .iter()
                .filter(|u| u.get(&attr).and_then(Value::as_str) == Some(&value))
                .cloned()
                .collect();
            let mut doc = serde_json::json!({
                "schemas": [LIST_RESPONSE],
                "totalResults": matches.len(),
                "startIndex": 1,
                "itemsPerPage": matches.len(),
            });
            // RFC 7644 §3.4.2: `Resources` is required only when totalResults is non-zero.
            if !matches.is_empty() {
                doc["Resources"] = Value::Array(matches);
            }
            scim_json(200, doc)
        }
        ["Users", id] => {
            let id = percent_decode(id);
            if let Some(forced) = s.forced.get(&(tenant.clone(), format!("id:{id}"))) {
                return forced.clone();
            }
            match users.iter().find(|u| u.get("id").and_then(Value::as_str) == Some(&id)) {
                Some(user) => scim_json(200, user.clone()),
                None => scim_json(404, scim_error(404, None, &format!("Resource {id} not found"))),
            }
        }
        _ => scim_json(404, scim_error(404, None, "no such endpoint")),
    }
}
