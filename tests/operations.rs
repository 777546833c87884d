//! What operators rely on (SPEC §1 signals, §4 admin and health): readiness and gRPC health that
//! follow the issuers' keys, a graceful shutdown under traffic through the real Envoy, and a
//! `/metrics` scrape that counts exactly what happened without ever labelling raw request input.
//!
//! Envoy comes from `$SUBGUARD_ENVOY` or `.venv/bin/envoy` (`make venv`); without it the Envoy
//! test fails with that instruction, it is never skipped.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::check::CheckCall;
use common::directory_server::{Answer, DirectoryServer};
use common::envoy::{EnvoyBuilder, shipped_config};
use common::metrics::{samples, value};
use common::{Algorithm, CheckClient, ConfigDir, JwksServer, Subguard, TokenBuilder, Upstream, jwks_text};
use serde_json::json;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const ISS: &str = "https://idp.acme.test/";
const AUTHZ_SERVICE: &str = "envoy.service.auth.v3.Authorization";

fn token(sub: &str) -> String {
    TokenBuilder::new("rsa-1", Algorithm::RS256).iss(ISS).aud("orders").sub(sub).build()
}

/// A config with an HTTP directory at `directory` and `extra` top-level YAML.
fn http_directory_config(directory: &DirectoryServer, timeout_ms: u64, extra: &str) -> String {
    format!(
        r#"
listen:
  grpc: "127.0.0.1:0"
  admin: "127.0.0.1:0"
tenant:
  header: x-tenant-id
{extra}
directory:
  kind: http
  url: "{url}"
  timeout_ms: {timeout_ms}
tenants:
  acme:
    issuers:
      - issuer: "{ISS}"
        audiences: ["orders"]
        algorithms: ["RS256"]
        jwks_file: keys/issuer-a.jwks.json
"#,
        url = directory.url_template()
    )
}

async fn health_status(health: &mut HealthClient<tonic::transport::Channel>, service: &str) -> i32 {
    health
        .check(HealthCheckRequest { service: service.into() })
        .await
        .unwrap_or_else(|e| panic!("health check {service:?}: {e}"))
        .into_inner()
        .status
}

// ---------------------------------------------------------------------------------------------
// Readiness and gRPC health follow the issuers' keys.

#[tokio::test]
async fn not_serving_while_an_issuers_keys_are_unreachable_then_serving_once_they_load() {
    let idp = JwksServer::start(&jwks_text("issuer-a.jwks.json"));
    idp.stop();
    let config = format!(
        r#"
listen:
  grpc: "127.0.0.1:0"
  admin: "127.0.0.1:0"
tenant:
  header: x-tenant-id
directory:
  kind: file
  path: users.yaml
tenants:
  acme:
    issuers:
      - issuer: "{ISS}"
        audiences: ["orders"]
        algorithms: ["RS256"]
        jwks_uri: "{uri}"
"#,
        uri = idp.jwks_uri()
    );
    let sg = Subguard::start_unready(ConfigDir::with(&config, "acme:\n  - sub: u-1\n"));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", sg.grpc_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);

    for service in ["", AUTHZ_SERVICE] {
        assert_eq!(
            health_status(&mut health, service).await,
            ServingStatus::NotServing as i32,
            "{service:?} while the issuer has no keys"
        );
    }
    assert_eq!(sg.admin_get("/readyz").0, 503);
    assert_eq!(sg.admin_get("/healthz").0, 200, "alive, just not ready");

    // The IdP comes up: the keys are retried (with backoff from 1 s) and readiness follows.
    idp.start_again();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let grpc = [health_status(&mut health, "").await, health_status(&mut health, AUTHZ_SERVICE).await];
        let readyz = sg.admin_get("/readyz").0;
        if grpc == [ServingStatus::Serving as i32; 2] && readyz == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not ready after the IdP came back: health {grpc:?}, /readyz {readyz}, jwks requests {}",
            idp.jwks_requests()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = sg.client().await.call(&CheckCall::new().tenant("acme").bearer(&token("u-1"))).await;
    assert!(out.allowed, "{out:#?}");
}

// ---------------------------------------------------------------------------------------------
// Graceful shutdown.

/// The shipped config's ext_authz `timeout: <n>s` (the gRPC service's; not a `connect_timeout`).
fn ext_authz_timeout_line() -> String {
    let path = shipped_config("subguard-sidecar-tcp.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.strip_prefix("timeout: ").is_some_and(|v| v.ends_with('s')))
        .collect();
    assert_eq!(lines.len(), 1, "one ext_authz `timeout:` in {}: {lines:?}", path.display());
    lines[0].to_string()
}

#[tokio::test]
async fn sigterm_under_traffic_through_envoy_lets_every_in_flight_request_finish() {
    // Ten users, each taking the directory 300 ms: ten checks are in flight at once. Eight exist,
    // two do not: every one must still get its own right answer after the signal.
    let directory = DirectoryServer::start();
    let delay = Duration::from_millis(300);
    let subs: Vec<(String, bool)> = (0..10).map(|i| (format!("inflight-{i}"), i < 8)).collect();
    for (sub, exists) in &subs {
        let answer =
            if *exists { Answer::user(json!({"id": format!("id-{sub}")})) } else { Answer::status(404) };
        directory.set(sub, answer.delayed(delay));
    }
    let upstream = Upstream::start();
    let mut sg = Subguard::start(&http_directory_config(&directory, 3000, "shutdown_grace_seconds: 5"), "");
    let envoy = EnvoyBuilder::new(shipped_config("subguard-sidecar-tcp.yaml"))
        .upstream_port(upstream.port())
        .subguard_port(sg.grpc_addr().port())
        // The shipped ext_authz timeout is for warm checks; this directory takes 300 ms.
        .replace(&ext_authz_timeout_line(), "timeout: 2s")
        .start();

    let client = reqwest::Client::builder().timeout(Duration::from_secs(15)).build().unwrap();
    let mut requests = Vec::new();
    for (sub, _) in &subs {
        let req = client
            .get(envoy.url("/orders/1"))
            .header("x-tenant-id", "acme")
            .header("authorization", format!("Bearer {}", token(sub)))
            .header("x-test-marker", sub.as_str());
        requests.push(tokio::spawn(async move {
            let resp = req.send().await.expect("a response through envoy");
            let reason = resp.headers().get("x-subguard-reason").map(|v| v.to_str().unwrap().to_string());
            (resp.status().as_u16(), reason, resp.text().await.unwrap_or_default())
        }));
    }
    // Every check has reached the directory: all ten are in flight inside subguard.
    let deadline = Instant::now() + Duration::from_secs(10);
    while subs.iter().any(|(s, _)| directory.requests("acme", s) == 0) {
        assert!(
            Instant::now() < deadline,
            "the checks never reached the directory: {:?}",
            directory.raw_paths()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sg.signal("TERM");

    for ((sub, exists), request) in subs.iter().zip(requests) {
        let (status, reason, body) = request.await.unwrap();
        if *exists {
            assert_eq!(status, 200, "{sub}: an in-flight request finished with the right answer: {body}");
            let seen = upstream.saw(sub).unwrap_or_else(|| panic!("{sub} never reached the application"));
            assert_eq!(seen.header("x-user-id"), Some(format!("id-{sub}").as_str()));
        } else {
            assert_eq!(
                (status, reason.as_deref()),
                (403, Some("user_not_found")),
                "{sub}: an in-flight request finished with the right answer: {body}"
            );
        }
    }
    assert_eq!(sg.wait_exit(Duration::from_secs(10)), Some(0), "logs:\n{}", sg.logs().join("\n"));
}

#[tokio::test]
async fn readiness_goes_down_during_the_grace_period() {
    // A check that takes the directory 3 s stays in flight across the signal.
    let directory = DirectoryServer::start();
    directory.set("slow-user", Answer::user(json!({"id": "u-slow"})).delayed(Duration::from_secs(3)));
    let mut sg =
        Subguard::start(&http_directory_config(&directory, 10_000, "shutdown_grace_seconds: 10"), "");
    let mut client = sg.client().await;
    let call = CheckCall::new().tenant("acme").bearer(&token("slow-user"));
    let in_flight = tokio::spawn(async move { client.call(&call).await });
    let deadline = Instant::now() + Duration::from_secs(5);
    while directory.requests("acme", "slow-user") == 0 {
        assert!(Instant::now() < deadline, "the check never reached the directory");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(sg.admin_get("/readyz").0, 200);

    sg.signal("TERM");
    // While the check is still in flight, readiness says 503 so no new traffic is sent here.
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut last = None;
    loop {
        let readyz = common::subguard::http_get(sg.admin_addr(), "/readyz").map(|(status, _)| status);
        if matches!(readyz, Ok(503)) {
            break;
        }
        assert!(
            Instant::now() < deadline && !in_flight.is_finished(),
            "/readyz never answered 503 while a check was in flight after SIGTERM (last: {readyz:?}, before: {last:?})"
        );
        last = Some(readyz.map_err(|e| e.kind()));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !in_flight.is_finished(),
        "the 503 was seen during the grace period, with the check still in flight"
    );

    let out = in_flight.await.unwrap();
    assert!(out.allowed, "the in-flight check finished normally: {out:#?}");
    assert_eq!(out.header("x-user-id"), Some("u-slow"));
    assert_eq!(sg.wait_exit(Duration::from_secs(15)), Some(0));
}

// ---------------------------------------------------------------------------------------------
// /metrics

#[tokio::test]
async fn metrics_count_exactly_the_checks_sent_and_never_label_raw_input() {
    let directory = DirectoryServer::start();
    directory.set("m-alice", Answer::user(json!({"id": "u-alice"})));
    let sg = Subguard::start(&http_directory_config(&directory, 1000, ""), "");
    let mut client: CheckClient = sg.client().await;
    let metrics = || sg.admin_get("/metrics").1;
    let lookups = "subguard_directory_lookups_total";

    // allow ×3 for one user: the directory once, then the cache.
    client.call(&CheckCall::new().tenant("acme").bearer(&token("m-alice"))).await;
    let hits_before = value(&metrics(), lookups, &[("tenant", "acme"), ("outcome", "cache_hit")]);
    for _ in 0..2 {
        assert!(client.call(&CheckCall::new().tenant("acme").bearer(&token("m-alice"))).await.allowed);
    }
    let hits_after = value(&metrics(), lookups, &[("tenant", "acme"), ("outcome", "cache_hit")]);
    assert_eq!(hits_after - hits_before, 2.0, "a repeated sub is a cache hit");
    // user_not_found ×3: one sub twice, and a sub made to look like a label value.
    for sub in ["m-ghost", "m-ghost", "evil-sub-xyz"] {
        let out = client.call(&CheckCall::new().tenant("acme").bearer(&token(sub))).await;
        assert_eq!(out.reason(), Some("user_not_found"));
    }
    // missing_token, unknown_tenant (a tenant made to look like a label value), missing_tenant.
    client.call(&CheckCall::new().tenant("acme")).await;
    let out = client.call(&CheckCall::new().tenant("evil-tenant-xyz").bearer(&token("m-alice"))).await;
    assert_eq!(out.reason(), Some("unknown_tenant"));
    let out = client.call(&CheckCall::new().bearer(&token("m-alice"))).await;
    assert_eq!(out.reason(), Some("missing_tenant"));

    let text = metrics();
    let checks = "subguard_checks_total";
    let expected = [
        (("allow", "ok", "acme"), 3.0),
        (("deny", "user_not_found", "acme"), 3.0),
        (("deny", "missing_token", "acme"), 1.0),
        (("deny", "unknown_tenant", ""), 1.0),
        (("deny", "missing_tenant", ""), 1.0),
    ];
    for ((decision, reason, tenant), n) in expected {
        assert_eq!(
            value(&text, checks, &[("decision", decision), ("reason", reason), ("tenant", tenant)]),
            n,
            "{checks}{{decision={decision},reason={reason},tenant={tenant:?}}}\n{text}"
        );
    }
    let counted: f64 = samples(&text, checks).iter().map(|s| s.value).sum();
    assert_eq!(counted, 9.0, "no other checks were counted:\n{text}");
    assert_eq!(
        value(&text, "subguard_check_duration_seconds_count", &[]),
        9.0,
        "one duration observation per check:\n{text}"
    );

    // Directory outcomes: m-alice found then two hits, m-ghost not found then a (negative) hit,
    // evil-sub-xyz not found.
    for (outcome, n) in
        [("found", 1.0), ("not_found", 2.0), ("cache_hit", 3.0), ("error", 0.0), ("stale", 0.0)]
    {
        assert_eq!(
            value(&text, lookups, &[("tenant", "acme"), ("outcome", outcome)]),
            n,
            "{outcome}:\n{text}"
        );
    }

    let build = samples(&text, "subguard_build_info");
    assert!(
        build.iter().any(|s| s.labels.get("version").map(String::as_str) == Some(env!("CARGO_PKG_VERSION"))
            && s.value == 1.0),
        "subguard_build_info{{version=\"{}\"}} 1 missing:\n{text}",
        env!("CARGO_PKG_VERSION")
    );

    for raw in ["evil-tenant-xyz", "evil-sub-xyz"] {
        assert!(!text.contains(raw), "raw request input {raw:?} appears in /metrics:\n{text}");
    }
}

/// `GET /metrics` with an `Accept` header, raw: (content type, body).
fn scrape(sg: &Subguard, accept: Option<&str>) -> (String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(sg.admin_addr()).unwrap();
    let accept = accept.map(|a| format!("Accept: {a}\r\n")).unwrap_or_default();
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: x\r\n{accept}Connection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(!head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "{head}");
    let content_type = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-type")))
        .map(|(_, v)| v.trim().to_string())
        .unwrap();
    (content_type, body.to_string())
}

#[tokio::test]
async fn metrics_speak_openmetrics_to_prometheus_and_text_0_0_4_to_everyone_else() {
    let directory = DirectoryServer::start();
    let sg = Subguard::start(&http_directory_config(&directory, 1000, ""), "");
    let mut client: CheckClient = sg.client().await;
    client.call(&CheckCall::new().tenant("acme").bearer(&token("nobody"))).await;

    // Prometheus's own Accept header: OpenMetrics, counters declared without `_total`.
    let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let (content_type, body) = scrape(&sg, Some(prometheus));
    assert!(content_type.starts_with("application/openmetrics-text"), "{content_type}");
    assert!(body.lines().any(|l| l == "# TYPE subguard_checks counter"), "{body}");
    assert_eq!(body.lines().last(), Some("# EOF"));

    // curl, or a 0.0.4 scraper: every sample belongs to a family its `# TYPE` names exactly (a
    // 0.0.4 parser would otherwise read each counter as an untyped series).
    for accept in [None, Some("*/*"), Some("text/plain;version=0.0.4")] {
        let (content_type, body) = scrape(&sg, accept);
        assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8", "{accept:?}");
        assert!(!body.contains("# EOF") && !body.contains("# UNIT"), "{body}");
        let mut types = BTreeMap::new();
        for line in body.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                types.insert(name.to_string(), kind.to_string());
            } else if !line.starts_with('#') && !line.is_empty() {
                let name = line.split(['{', ' ']).next().unwrap();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| {
                        name.strip_suffix(s).filter(|f| types.get(*f).is_some_and(|k| k == "histogram"))
                    })
                    .unwrap_or(name);
                assert!(types.contains_key(family), "{name} has no # TYPE line before it:\n{body}");
            }
        }
        assert_eq!(types.get("subguard_checks_total").map(String::as_str), Some("counter"), "{body}");
        assert_eq!(types.get("subguard_check_duration_seconds").map(String::as_str), Some("histogram"));
        assert!(
            body.contains(
                r#"subguard_checks_total{decision="deny",reason="user_not_found",tenant="acme"} 1"#
            ),
            "{body}"
        );
    }
}
