//! A stand-in for an identity provider: serves a JWKS at `/jwks` and an OIDC discovery document at
//! any path ending in `/.well-known/openid-configuration`, with switchable failures, and counts
//! requests per path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use super::http_fixture::{FixtureResponse, Handler, HttpFixture};

/// What `/jwks` answers.
#[derive(Clone, Debug)]
pub enum JwksAnswer {
    /// 200 with this JSON body.
    Jwks(String),
    /// This status with a small text body.
    Status(u16),
    /// 200 `application/json` whose body is not JSON.
    Garbage,
}

#[derive(Debug)]
struct State {
    jwks: JwksAnswer,
    delay: Duration,
    /// `issuer` member of the discovery document; `None`: the server's own base URL.
    issuer: Option<String>,
    counts: HashMap<String, usize>,
}

pub struct JwksServer {
    http: HttpFixture,
    state: Arc<Mutex<State>>,
}

pub const DISCOVERY_SUFFIX: &str = "/.well-known/openid-configuration";

impl JwksServer {
    /// Starts serving `jwks_json` (e.g. `common::jwks_text("issuer-a.jwks.json")`).
    pub fn start(jwks_json: &str) -> Self {
        let state = Arc::new(Mutex::new(State {
            jwks: JwksAnswer::Jwks(jwks_json.to_string()),
            delay: Duration::ZERO,
            issuer: None,
            counts: HashMap::new(),
        }));
        // The discovery document names the server's own address, known only after binding.
        let base = Arc::new(Mutex::new(String::new()));
        let handler: Handler = {
            let state = state.clone();
            let base = base.clone();
            Arc::new(move |req| {
                let state = state.clone();
                let base = base.lock().unwrap().clone();
                Box::pin(async move {
                    let (answer, delay, issuer) = {
                        let mut s = state.lock().unwrap();
                        *s.counts.entry(req.path.clone()).or_default() += 1;
                        (s.jwks.clone(), s.delay, s.issuer.clone())
                    };
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    if req.path == "/jwks" {
                        match answer {
                            JwksAnswer::Jwks(body) => FixtureResponse::json(200, body),
                            JwksAnswer::Status(code) => FixtureResponse::text(code, "fixture failure"),
                            JwksAnswer::Garbage => FixtureResponse::json(200, "<html>not a jwks"),
                        }
                    } else if req.path.ends_with(DISCOVERY_SUFFIX) {
                        let doc = json!({
                            "issuer": issuer.unwrap_or_else(|| base.clone()),
                            "jwks_uri": format!("{base}/jwks"),
                            "id_token_signing_alg_values_supported": ["RS256", "ES256"],
                        });
                        FixtureResponse::json(200, doc.to_string())
                    } else {
                        FixtureResponse::text(404, "not found")
                    }
                })
            })
        };
        let http = HttpFixture::start(handler);
        *base.lock().unwrap() = http.base_url();
        JwksServer { http, state }
    }

    /// `http://127.0.0.1:PORT`: the issuer URL for discovery (no trailing slash).
    pub fn base_url(&self) -> String {
        self.http.base_url()
    }

    /// `http://127.0.0.1:PORT/jwks`
    pub fn jwks_uri(&self) -> String {
        format!("{}/jwks", self.http.base_url())
    }

    pub fn set_jwks(&self, jwks_json: &str) {
        self.state.lock().unwrap().jwks = JwksAnswer::Jwks(jwks_json.to_string());
    }

    pub fn set_status(&self, status: u16) {
        self.state.lock().unwrap().jwks = JwksAnswer::Status(status);
    }

    pub fn set_garbage(&self) {
        self.state.lock().unwrap().jwks = JwksAnswer::Garbage;
    }

    pub fn set_delay(&self, delay: Duration) {
        self.state.lock().unwrap().delay = delay;
    }

    /// The `issuer` the discovery document claims (default: the server's base URL).
    pub fn set_issuer(&self, issuer: &str) {
        self.state.lock().unwrap().issuer = Some(issuer.to_string());
    }

    /// Refuses connections (and drops open ones) until `start_again`.
    pub fn stop(&self) {
        self.http.stop();
    }

    pub fn start_again(&self) {
        self.http.resume();
    }

    /// Requests seen on exactly this path.
    pub fn requests(&self, path: &str) -> usize {
        self.state.lock().unwrap().counts.get(path).copied().unwrap_or(0)
    }

    pub fn jwks_requests(&self) -> usize {
        self.requests("/jwks")
    }

    pub fn discovery_requests(&self) -> usize {
        let s = self.state.lock().unwrap();
        s.counts.iter().filter(|(p, _)| p.ends_with(DISCOVERY_SUFFIX)).map(|(_, n)| n).sum()
    }

    /// Waits (polling) until `/jwks` has been requested at least `n` times.
    pub fn wait_for_jwks_requests(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.jwks_requests() >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.jwks_requests() >= n
    }
}
