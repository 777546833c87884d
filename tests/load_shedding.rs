//! Load shedding: beyond `max_in_flight_checks`, a check is refused at once with gRPC
//! `RESOURCE_EXHAUSTED` (Envoy then applies its `status_on_error`) instead of queueing without
//! bound behind a slow directory; it is counted in `subguard_checks_shed_total`.

mod common;

use std::time::Duration;

use common::check::CheckCall;
use common::directory_server::{Answer, DirectoryServer};
use common::{Algorithm, ConfigDir, Subguard, TokenBuilder};
use serde_json::json;

/// A subguard for tenant `acme` with `directory` as its HTTP directory and the given
/// `max_in_flight_checks`.
fn subguard_with(max_in_flight: usize, directory: &DirectoryServer) -> Subguard {
    let config = format!(
        r#"
listen:
  grpc: "127.0.0.1:0"
  admin: "127.0.0.1:0"
tenant:
  header: x-tenant-id
max_in_flight_checks: {max_in_flight}
directory:
  kind: http
  url: "{url}"
  timeout_ms: 5000
tenants:
  acme:
    issuers:
      - issuer: "https://idp.acme.test/"
        audiences: [orders]
        jwks_file: keys/issuer-a.jwks.json
"#,
        url = directory.url_template()
    );
    Subguard::start_in(ConfigDir::with(&config, ""))
}

/// A token of `acme`'s issuer for `sub`.
fn token(sub: &str) -> String {
    TokenBuilder::new("rsa-1", Algorithm::RS256).iss("https://idp.acme.test/").aud("orders").sub(sub).build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn checks_beyond_the_limit_are_refused_at_once_and_counted() {
    let directory = DirectoryServer::start();
    directory.set_default(Answer::user(json!({"id": "u"})).delayed(Duration::from_millis(800)));
    let sg = subguard_with(2, &directory);
    let client = sg.client().await;

    let mut calls = Vec::new();
    for i in 0..8 {
        let mut client = client.clone();
        // Distinct subs: no cache or coalescing can make the slow lookups cheap.
        let token = token(&format!("user-{i}"));
        calls.push(tokio::spawn(async move {
            client.try_call(&CheckCall::new().tenant("acme").bearer(&token)).await
        }));
    }
    let (mut allowed, mut shed) = (0, 0);
    for c in calls {
        match c.await.unwrap() {
            Ok(out) if out.allowed => allowed += 1,
            Ok(out) => panic!("unexpected deny: {out:#?}"),
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                shed += 1;
            }
        }
    }
    assert!(allowed >= 2, "the first checks within the limit are decided: {allowed}");
    assert!(shed >= 1, "checks beyond the limit are refused: allowed {allowed}, shed {shed}");
    assert_eq!(allowed + shed, 8);
    assert!(directory.total_requests() <= allowed, "refused checks never reached the directory");
    let (_, metrics) = sg.admin_get("/metrics");
    let counted: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("subguard_checks_shed_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert_eq!(counted, shed as f64, "{metrics}");

    // Once the load is gone, checks are decided again.
    let token = token("later");
    assert!(client.clone().call(&CheckCall::new().tenant("acme").bearer(&token)).await.allowed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_connection_carries_checks_up_to_the_limit_at_once() {
    // Envoy sends a worker's checks over one HTTP/2 connection. Within max_in_flight_checks they
    // all run at once: the listener sets no lower cap on concurrent streams (HTTP/2 servers
    // commonly allow 100 or 200, beyond which the client has to queue them).
    let directory = DirectoryServer::start();
    directory.set_default(Answer::user(json!({"id": "u"})).delayed(Duration::from_millis(1500)));
    let sg = subguard_with(400, &directory);
    let client = sg.client().await;
    const CHECKS: usize = 300;
    let tokens: Vec<String> = (0..CHECKS).map(|i| token(&format!("user-{i}"))).collect();
    let calls: Vec<_> = tokens
        .into_iter()
        .map(|token| {
            let mut client = client.clone();
            tokio::spawn(async move { client.call(&CheckCall::new().tenant("acme").bearer(&token)).await })
        })
        .collect();
    // Well before the first answer (1.5 s), every check has reached the directory.
    let deadline = std::time::Instant::now() + Duration::from_millis(1200);
    while directory.total_requests() < CHECKS && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(directory.total_requests(), CHECKS, "checks waited for a stream of the connection");
    for c in calls {
        assert!(c.await.unwrap().allowed);
    }
}
