//! Load shedding: beyond `max_in_flight_checks`, a check is refused at once with gRPC
//! `RESOURCE_EXHAUSTED` (Envoy then applies its `status_on_error`) instead of queueing without
//! bound behind a slow directory; it is counted in `subguard_checks_shed_total`.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use common::check::CheckCall;
use common::directory_server::{Answer, DirectoryServer};
use common::{Algorithm, ConfigDir, Subguard, TokenBuilder};
use http_body_util::StreamBody;
use hyper::body::{Bytes, Frame};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::sync::mpsc;

/// A request body fed through a channel: it ends when the sender is dropped, never while it is kept.
type Fed = StreamBody<tokio_stream::wrappers::ReceiverStream<Result<Frame<Bytes>, Infallible>>>;
type Sender = hyper::client::conn::http2::SendRequest<Fed>;

/// An HTTP/2 connection of its own to subguard's gRPC listener.
async fn connect(sg: &Subguard) -> Sender {
    let tcp = tokio::net::TcpStream::connect(sg.grpc_addr()).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(connection);
    sender
}

/// Starts a gRPC request at `path` whose body is what is sent into the returned feed (after
/// `first`, if given), and the task that gives its answer's `grpc-status`.
async fn open_stream(
    sender: &Sender,
    path: &str,
    first: Option<Vec<u8>>,
) -> (mpsc::Sender<Result<Frame<Bytes>, Infallible>>, tokio::task::JoinHandle<Option<String>>) {
    let (feed, rx) = mpsc::channel(2);
    if let Some(first) = first {
        feed.send(Ok(Frame::data(Bytes::from(first)))).await.unwrap();
    }
    let request = hyper::Request::post(path)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .unwrap();
    let mut sender = sender.clone();
    let answer = tokio::spawn(async move {
        let response = sender.send_request(request).await.ok()?;
        response.headers().get("grpc-status").map(|v| v.to_str().unwrap_or("").to_string())
    });
    (feed, answer)
}

const CHECK: &str = "/envoy.service.auth.v3.Authorization/Check";

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
    let metrics = sg.metrics();
    assert_eq!(common::metrics::value(&metrics, "subguard_checks_shed_total", &[]), shed as f64, "{metrics}");

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
    // Each answer takes 4 s (under the directory timeout of 5 s): long enough that a loaded
    // machine still starts all the checks before the first answer could free a stream.
    directory.set_default(Answer::user(json!({"id": "u"})).delayed(Duration::from_secs(4)));
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
    // Before the first answer (4 s), every check has reached the directory.
    let deadline = std::time::Instant::now() + Duration::from_millis(3600);
    while directory.total_requests() < CHECKS && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(directory.total_requests(), CHECKS, "checks waited for a stream of the connection");
    for c in calls {
        assert!(c.await.unwrap().allowed);
    }
}

/// Requests started and never finished hold what they sent. Across all of them subguard holds
/// at most 64 MiB: past that, a stream's data fails it with `RESOURCE_EXHAUSTED`, and checks go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_bytes_pending_across_unfinished_checks_are_bounded() {
    let directory = DirectoryServer::start();
    let sg = subguard_with(4096, &directory);
    let sender = connect(&sg).await;

    const MIB: usize = 1024 * 1024;
    const STREAMS: usize = 80;
    let mut feeds = Vec::new();
    let mut answers = Vec::new();
    for _ in 0..STREAMS {
        // A gRPC message announced at 4 MiB - 1, of which 1 MiB is sent, and then nothing.
        let mut first = vec![0u8, 0x00, 0x3f, 0xff, 0xff];
        first.resize(5 + MIB, 0);
        let (feed, answer) = open_stream(&sender, CHECK, Some(first)).await;
        feeds.push(feed);
        answers.push(answer);
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut refused = 0;
    let mut waiting = 0;
    for answer in answers {
        if answer.is_finished() {
            if answer.await.unwrap().as_deref() == Some("8") {
                refused += 1;
            }
        } else {
            waiting += 1;
            answer.abort();
        }
    }
    assert!(refused >= STREAMS - 64, "{refused} of {STREAMS} streams of 1 MiB refused, {waiting} held");
    assert!(waiting <= 64, "{waiting} streams of 1 MiB are held: more than 64 MiB");
    // Checks go on meanwhile.
    let out = sg.client().await.call(&CheckCall::new().tenant("acme").bearer(&token("u"))).await;
    assert_eq!(
        out.header("x-subguard-reason"),
        Some("user_not_found"),
        "the directory knows no one: {out:#?}"
    );
    drop(feeds);
}

/// Streams that open a check (or a health check) and send nothing after its headers hold about
/// 10 KiB each: at most
/// 4 096 are held at a time (one more is refused with `RESOURCE_EXHAUSTED` at once), and each held
/// one fails with `DEADLINE_EXCEEDED` 10 s after it opened, giving its place back. Without the
/// bound, 40 000 of them took subguard from 26 to 400 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_that_never_arrive_are_bounded_and_time_out() {
    let directory = DirectoryServer::start();
    let sg = subguard_with(4096, &directory);
    const STREAMS: usize = 4800;
    let mut feeds = Vec::new();
    let mut answers = Vec::new();
    let opened = std::time::Instant::now();
    // Three connections open checks, the fourth health checks: both are requests being received.
    for path in [CHECK, CHECK, CHECK, "/grpc.health.v1.Health/Check"] {
        let sender = connect(&sg).await;
        for _ in 0..STREAMS / 4 {
            // Headers, and a body that never comes (the feed is kept, so the stream stays open).
            let (feed, answer) = open_stream(&sender, path, None).await;
            feeds.push(feed);
            answers.push(answer);
        }
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (mut refused, mut held) = (0, Vec::new());
    for answer in answers {
        if answer.is_finished() {
            assert_eq!(answer.await.unwrap().as_deref(), Some("8"), "answered before the deadline: refused");
            refused += 1;
        } else {
            held.push(answer);
        }
    }
    assert!(held.len() <= 4096, "{} streams without a request are held: more than 4 096", held.len());
    assert!(refused >= STREAMS - 4096, "{refused} of {STREAMS} refused, {} held", held.len());
    // While every place is held, a check is refused too: the bound keeps the process alive, not
    // its service to whoever else can reach the listener (loopback or a Unix socket in a pod).
    let call = CheckCall::new().tenant("acme").bearer(&token("u"));
    let mut client = sg.client().await;
    let refused_check = client.try_call(&call).await.expect_err("all places are held");
    assert_eq!(refused_check.code(), tonic::Code::ResourceExhausted, "{refused_check:?}");

    // Each held stream ends 10 s after it opened, and checks are answered again.
    for answer in held {
        let status = tokio::time::timeout(Duration::from_secs(20), answer)
            .await
            .expect("a stream without its request is held past its deadline")
            .unwrap();
        assert_eq!(status.as_deref(), Some("4"), "DEADLINE_EXCEEDED");
    }
    assert!(opened.elapsed() >= Duration::from_secs(9), "ended before the 10 s: {:?}", opened.elapsed());
    let out = client.call(&call).await;
    assert_eq!(
        out.header("x-subguard-reason"),
        Some("user_not_found"),
        "the directory knows no one: {out:#?}"
    );
    drop(feeds);
}

/// A client that never grants an HTTP/2 stream a window (Envoy always does) never lets subguard
/// send an answer's message. Each such answer keeps its check's place among
/// `max_in_flight_checks` until it is sent, so past the limit further checks are refused with a
/// trailers-only `RESOURCE_EXHAUSTED` (headers only, which flow control does not hold back).
/// Without that, a local peer grew subguard by 870 MB in 4 s with 150 000 such checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answers_a_client_never_takes_hold_places_among_the_checks_in_flight() {
    use http_body_util::Full;
    let directory = DirectoryServer::start();
    let sg = subguard_with(20, &directory);
    let tcp = tokio::net::TcpStream::connect(sg.grpc_addr()).await.unwrap();
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(0)
        .handshake::<_, Full<Bytes>>(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(connection);
    // Kept, not dropped: dropping a response resets its stream, which frees it.
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..60 {
        // An empty CheckRequest: missing_tenant, an answer with a message like any other.
        let request = hyper::Request::post(CHECK)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
            .unwrap();
        let response = sender.clone().send_request(request).await.unwrap();
        match response.headers().get("grpc-status").map(|v| v.to_str().unwrap().to_string()) {
            None => held.push(response),
            Some(status) => {
                assert_eq!(status, "8", "RESOURCE_EXHAUSTED");
                refused += 1;
            }
        }
    }
    assert_eq!((held.len(), refused), (20, 40), "answers waiting for a window: held, refused");
    let call = CheckCall::new().tenant("acme").bearer(&token("u"));
    let mut client = sg.client().await;
    let status = client.try_call(&call).await.expect_err("every place is held");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");

    // Streams given up free their places.
    drop(held);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match client.try_call(&call).await {
            Ok(out) => {
                assert_eq!(out.header("x-subguard-reason"), Some("user_not_found"), "{out:#?}");
                break;
            }
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                assert!(std::time::Instant::now() < deadline, "places never given back");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A request still arriving when shutdown begins (headers sent, the message not) is answered
/// `UNAVAILABLE` a moment later (250 ms), not held until its 10 s receive deadline: no check has started on it,
/// and the drain would otherwise last those 10 s whatever the grace period (found by an audit: a
/// client that can reach the listener stretched every pod's termination so).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_still_arriving_at_shutdown_does_not_hold_the_drain() {
    let directory = DirectoryServer::start();
    let mut sg = subguard_with(4096, &directory);
    let sender = connect(&sg).await;
    let (feed, answer) = open_stream(&sender, CHECK, None).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!answer.is_finished(), "the stream waits for its message");
    let signalled = std::time::Instant::now();
    sg.signal("TERM");
    let status = tokio::time::timeout(Duration::from_secs(5), answer)
        .await
        .expect("the stream was held past shutdown")
        .unwrap();
    assert_eq!(status.as_deref(), Some("14"), "UNAVAILABLE");
    assert_eq!(sg.wait_exit(Duration::from_secs(5)), Some(0), "exit well before the 10 s receive deadline");
    assert!(signalled.elapsed() < Duration::from_secs(5));
    drop(feed);
}
