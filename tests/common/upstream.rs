//! The application behind Envoy: answers every request with 200 and a JSON object of the request
//! headers it received (lowercase names; repeated headers joined with `,`), and keeps them.

use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};

use super::http_fixture::{FixtureRequest, FixtureResponse, Handler, HttpFixture};

pub struct Upstream {
    http: HttpFixture,
    seen: Arc<Mutex<Vec<FixtureRequest>>>,
}

impl Upstream {
    pub fn start() -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler: Handler = {
            let seen = seen.clone();
            Arc::new(move |req| {
                seen.lock().unwrap().push(req.clone());
                Box::pin(async move { FixtureResponse::json(200, headers_json(&req).to_string()) })
            })
        };
        Upstream { http: HttpFixture::start(handler), seen }
    }

    pub fn port(&self) -> u16 {
        self.http.addr().port()
    }

    pub fn base_url(&self) -> String {
        self.http.base_url()
    }

    /// Every request that reached the application.
    pub fn requests(&self) -> Vec<FixtureRequest> {
        self.seen.lock().unwrap().clone()
    }

    /// The request that reached the application carrying `x-test-marker: <marker>`, if one did.
    pub fn saw(&self, marker: &str) -> Option<FixtureRequest> {
        self.seen.lock().unwrap().iter().find(|r| r.header("x-test-marker") == Some(marker)).cloned()
    }
}

pub fn headers_json(req: &FixtureRequest) -> Value {
    let mut map = Map::new();
    for (k, v) in &req.headers {
        match map.get_mut(k) {
            Some(Value::String(prev)) => {
                prev.push(',');
                prev.push_str(v);
            }
            _ => {
                map.insert(k.clone(), Value::String(v.clone()));
            }
        }
    }
    Value::Object(map)
}
