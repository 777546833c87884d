//! A fixture HTTP user directory (`directory.kind: http`): answers
//! `GET /tenants/{tenant}/users/{sub}` per sub as the test sets it (404 by default), with an
//! optional delay, and records every raw request path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use super::http_fixture::{FixtureResponse, Handler, HttpFixture};

/// What the directory answers for one sub.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub content_type: &'static str,
    pub delay: Duration,
}

impl Answer {
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
                        match segments.as_slice() {
                            ["tenants", tenant, "users", sub] => {
                                let (tenant, sub) = (percent_decode(tenant), percent_decode(sub));
                                *s.counts.entry((tenant, sub.clone())).or_default() += 1;
                                s.answers.get(&sub).cloned().unwrap_or_else(|| Answer::status(404))
                            }
                            _ => Answer::status(400),
                        }
                    };
                    if !answer.delay.is_zero() {
                        tokio::time::sleep(answer.delay).await;
                    }
                    FixtureResponse {
                        status: answer.status,
                        headers: vec![("content-type".into(), answer.content_type.into())],
                        body: answer.body.into_bytes(),
                    }
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

    pub fn raw_paths(&self) -> Vec<String> {
        self.state.lock().unwrap().paths.clone()
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
