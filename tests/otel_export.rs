//! OpenTelemetry export (cargo feature `otel`): a check's span reaches an OTLP/HTTP collector and
//! joins the caller's W3C trace. Without the feature, a config that asks for export is refused
//! with a clear error rather than silently exporting nothing.
//!
//! `make test` runs this file both ways: `cargo test` and `cargo test --features otel`.

mod common;

use common::ConfigDir;

const USERS: &str = "acme:\n  - sub: alice\n";

fn config(endpoint: &str) -> String {
    format!(
        r#"
listen:
  grpc: "127.0.0.1:0"
  admin: "127.0.0.1:0"
tenant:
  header: x-tenant-id
directory:
  kind: file
  path: users.yaml
tracing:
  otlp_endpoint: "{endpoint}"
  service_name: subguard-test
tenants:
  acme:
    issuers:
      - issuer: "https://idp.acme.test/"
        audiences: [orders]
        jwks_file: keys/issuer-a.jwks.json
"#
    )
}

#[cfg(feature = "otel")]
#[tokio::test(flavor = "multi_thread")]
async fn a_checks_span_is_exported_into_the_callers_trace() {
    use common::check::CheckCall;
    use common::http_fixture::{FixtureRequest, FixtureResponse, Handler, HttpFixture};
    use common::{Algorithm, Subguard, TokenBuilder};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    let received: Arc<Mutex<Vec<FixtureRequest>>> = Arc::default();
    let handler: Handler = {
        let received = received.clone();
        Arc::new(move |req| {
            received.lock().unwrap().push(req);
            Box::pin(async { FixtureResponse { status: 200, headers: vec![], body: vec![] } })
        })
    };
    let collector = HttpFixture::start(handler);
    let sg = Subguard::start_in(ConfigDir::with(&config(&collector.base_url()), USERS));

    let trace_hex = "4bf92f3577b34da6a3ce929d0e0e4736";
    let token = TokenBuilder::new("rsa-1", Algorithm::RS256)
        .iss("https://idp.acme.test/")
        .aud("orders")
        .sub("alice")
        .build();
    let out = sg
        .client()
        .await
        .call(
            &CheckCall::new()
                .tenant("acme")
                .bearer(&token)
                .header("traceparent", &format!("00-{trace_hex}-00f067aa0ba902b7-01")),
        )
        .await;
    assert!(out.allowed, "{out:#?}");

    // The batch exporter sends within its schedule (5 s by default): poll for the span.
    let trace_id: Vec<u8> =
        (0..16).map(|i| u8::from_str_radix(&trace_hex[2 * i..2 * i + 2], 16).unwrap()).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = received.lock().unwrap().clone();
        if got.iter().any(|r| {
            r.path == "/v1/traces"
                && r.body.windows(16).any(|w| w == trace_id.as_slice())
                && r.body.windows(5).any(|w| w == b"check")
        }) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no span of trace {trace_hex} reached the collector: {} posts",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(not(feature = "otel"))]
#[test]
fn without_the_feature_a_tracing_config_is_refused() {
    let dir = ConfigDir::with(&config("http://127.0.0.1:4318"), USERS);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_subguard"))
        .args(["validate", "--config"])
        .arg(dir.config_path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("tracing: this build has no OpenTelemetry export"), "{stdout}");
}
