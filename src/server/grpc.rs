//! The Envoy side of a check: the `Authorization` gRPC service, which reads a `CheckRequest`
//! through [`EnvoyRequest`] (the pipeline's `RequestView`, in [`wire`]) and answers with a
//! [`Decision`] as a `CheckResponse` (SPEC §3, deny and allow responses, dynamic metadata), which
//! [`Answer`] writes. With [`wire`] and [`super::answer`], the only modules that know the
//! protobuf types.

use std::borrow::Cow;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::service::auth::v3::CheckResponse;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic::codegen::{Body, BoxFuture, Context, Poll, Service, StdError, http};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::State;
use super::answer::Answer;
use super::place::Place;
use super::wire::{self, EnvoyRequest};
use crate::check::{Policy, RequestView};
use crate::decision::{Decision, Reason};

/// The dynamic-metadata namespace Envoy files ext_authz metadata under.
pub const METADATA_NAMESPACE: &str = "envoy.filters.http.ext_authz";

/// The gRPC `Authorization` service: `envoy.service.auth.v3.Authorization/Check`.
///
/// Written out rather than generated (envoy-types' `AuthorizationServer`) for one reason: the
/// request is decoded as [`wire::CheckRequest`], the part of Envoy's message a check reads,
/// borrowing the header values from the message buffer. Everything else is tonic's
/// [`tonic::server::Grpc`], as in generated code: framing, `grpc-timeout`, the 4 MiB message limit,
/// status codes.
#[derive(Clone)]
pub struct AuthorizationService {
    state: Arc<State>,
}

impl AuthorizationService {
    pub fn new(state: Arc<State>) -> Self {
        AuthorizationService { state }
    }
}

const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

impl tonic::server::NamedService for AuthorizationService {
    const NAME: &'static str = "envoy.service.auth.v3.Authorization";
}

/// Bytes of requests received and not yet decoded, over every stream of every connection,
/// at most. A client that starts many requests and never finishes them (each may announce up to
/// the 4 MiB message limit) makes the server hold what it sent; past this, its data fails the
/// stream (`RESOURCE_EXHAUSTED`) instead of growing the process. Envoy's checks are a few
/// kilobytes each: 64 MiB is ten times what `max_in_flight_checks` (4 096) of them hold.
pub const PENDING_REQUEST_BYTES: usize = 64 * 1024 * 1024;

/// Requests being received (their stream open, the request not yet read to its end: a check's
/// or a health call's), over every connection, at most; one more is refused at once with
/// `RESOURCE_EXHAUSTED`. Each holds about 10 KiB (HTTP/2 stream, request, decoder buffer) even
/// when it sends nothing after its headers, so without a bound a client that opens streams and
/// sends no body grows the process without end (40 000 such streams took it from 26 to 400 MiB).
/// Envoy sends a check's headers and message together, so its requests are in this state for
/// microseconds: this is the default `max_in_flight_checks`, about 40 MiB.
pub const RECEIVING_REQUESTS: usize = 4096;

/// How long a request may take to arrive once its stream is open (counted from the first
/// time its body is not ready, which for a stalled stream is as it opens); then it fails with
/// `DEADLINE_EXCEEDED` and gives its place back. Envoy's arrive at once; this frees the places
/// that a stalled or hostile client holds, as the listener closes a connection that has not sent
/// its preface within 10 s.
pub const RECEIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long after shutdown begins a request still arriving is waited for, instead of
/// [`RECEIVE_TIMEOUT`].
pub const ARRIVING_AT_SHUTDOWN: Duration = Duration::from_millis(250);

/// A request body being received, as [`Routes`] hands it on: it counts itself against
/// [`RECEIVING_REQUESTS`] and what it delivers against [`PENDING_REQUEST_BYTES`] while it lives
/// (tonic drops it once the request is read), and fails once [`RECEIVE_TIMEOUT`] has passed
/// without its end.
pub struct Budgeted<B> {
    body: B,
    /// Its place among the [`RECEIVING_REQUESTS`], given back when tonic drops the body.
    _place: Place<Arc<AtomicUsize>>,
    state: Arc<State>,
    held: usize,
    /// Armed the first time the body is not ready (Envoy's are, and never need it), which for a
    /// stalled stream is as it opens: the [`RECEIVE_TIMEOUT`], or shutdown, whichever comes first.
    cut_off: Option<Pin<Box<dyn Future<Output = Status> + Send>>>,
}

impl<B> Budgeted<B> {
    /// `body` counted as a request being received, or `None` when [`RECEIVING_REQUESTS`] are.
    fn take(body: B, state: &Arc<State>) -> Option<Self> {
        let place = Place::take(state.receiving_requests.clone(), RECEIVING_REQUESTS)?;
        Some(Budgeted { body, _place: place, state: state.clone(), held: 0, cut_off: None })
    }
}

impl<B: Body + Unpin> Body for Budgeted<B>
where
    B::Error: Into<StdError>,
{
    type Data = B::Data;
    type Error = StdError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = bytes::Buf::remaining(data);
                    this.held += n;
                    let pending = this.state.pending_request_bytes.fetch_add(n, Ordering::Relaxed) + n;
                    if pending > PENDING_REQUEST_BYTES {
                        return Poll::Ready(Some(Err(Status::resource_exhausted(
                            "too many request bytes pending across all checks",
                        )
                        .into())));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let cut_off = this.cut_off.get_or_insert_with(|| {
                    // A request that has not arrived shortly after shutdown begins is not waited
                    // for: no check has started on it, and the drain would otherwise last until
                    // its deadline, whatever the grace period. The moment's wait is for a check
                    // whose message was on its way (split over reads) as the signal came.
                    let shutdown = this.state.shutdown_begun();
                    Box::pin(async move {
                        tokio::select! {
                            () = tokio::time::sleep(RECEIVE_TIMEOUT) => {
                                Status::deadline_exceeded("the request did not arrive in full within 10 s")
                            }
                            () = async {
                                shutdown.await;
                                tokio::time::sleep(ARRIVING_AT_SHUTDOWN).await;
                            } => {
                                Status::unavailable("subguard is shutting down; the request had not arrived")
                            }
                        }
                    })
                });
                match cut_off.as_mut().poll(cx) {
                    Poll::Ready(status) => Poll::Ready(Some(Err(status.into()))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl<B> Drop for Budgeted<B> {
    fn drop(&mut self) {
        if self.held > 0 {
            self.state.pending_request_bytes.fetch_sub(self.held, Ordering::Relaxed);
        }
    }
}

impl<B> Service<http::Request<B>> for AuthorizationService
where
    B: Body + Send + Unpin + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != CHECK_PATH {
            // Another method of this service.
            return unimplemented();
        }
        let method = CheckMethod(self.state.clone());
        let deadline = req
            .headers()
            .get("grpc-timeout")
            .and_then(|v| grpc_timeout(v.as_bytes()))
            .map(|t| tokio::time::Instant::now() + t);
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(CheckCodec);
            Ok(within(deadline, grpc.unary(method, req)).await.unwrap_or_else(|| {
                Status::deadline_exceeded("the caller's grpc-timeout passed before the check finished")
                    .into_http()
            }))
        })
    }
}

/// A `grpc-timeout` header's duration: at most eight digits and a unit (`H`, `M`, `S`, `m`, `u`,
/// `n`). Anything else is no deadline, as in tonic's server.
fn grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `future`'s output, or `None` once `deadline` has passed first.
///
/// The timer is only armed when the future does not finish at its first poll: a warm check
/// finishes there, and registering a timer it never needs would cost it more than the check's own
/// lookups. Time is still counted from the request's arrival.
async fn within<F: Future>(deadline: Option<tokio::time::Instant>, future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = future.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        let Some(deadline) = deadline else { return Poll::Pending };
        let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        timer.as_mut().poll(cx).map(|()| None)
    })
    .await
}

/// `Check`'s codec: requests decoded as [`wire::CheckRequest`] by prost, answers written by
/// [`Answer`] itself.
struct CheckCodec;

impl Codec for CheckCodec {
    type Encode = Answer;
    type Decode = wire::CheckRequest;
    type Encoder = AnswerEncoder;
    type Decoder = tonic_prost::ProstDecoder<wire::CheckRequest>;

    fn encoder(&mut self) -> AnswerEncoder {
        AnswerEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::new(BufferSettings::default())
    }
}

struct AnswerEncoder;

impl Encoder for AnswerEncoder {
    type Item = Answer;
    type Error = Status;

    fn encode(&mut self, answer: Answer, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        // No reserve up front: it would count the whole answer once more, and the codec's buffer
        // (8 KiB) already holds any answer; a longer one grows as it is written.
        answer.encode(dst);
        Ok(())
    }
}

/// The gRPC listener's services: `Authorization` and `grpc.health.v1.Health`, told apart by the
/// path's service name; any other path is `UNIMPLEMENTED`, as tonic's router answers.
///
/// tonic's router (`Server::add_service`) is an axum router: per request it matches a path
/// pattern, stores the captured parameters in the request's extensions and boxes the service
/// again, ten allocations a check does not need for two fixed service names.
#[derive(Clone)]
pub struct Routes<H> {
    authz: AuthorizationService,
    health: H,
}

impl<H> Routes<H> {
    pub fn new(authz: AuthorizationService, health: H) -> Self {
        Routes { authz, health }
    }
}

/// The `<service>` of a path `/<service>/<method>`, if the path has that shape.
fn service_of(path: &str) -> Option<&str> {
    let rest = path.strip_prefix('/')?;
    let end = rest.find('/')?;
    Some(&rest[..end])
}

impl<B, H> Service<http::Request<B>> for Routes<H>
where
    B: Body + Send + Unpin + 'static,
    B::Error: Into<StdError> + Send + 'static,
    H: Service<
            http::Request<Budgeted<B>>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
            Future = BoxFuture<http::Response<tonic::body::Body>, Infallible>,
        > + tonic::server::NamedService,
{
    type Response = http::Response<Answering>;
    type Error = Infallible;
    type Future = Answered;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        use tonic::server::NamedService;
        let authz = match service_of(req.uri().path()) {
            Some(AuthorizationService::NAME) => true,
            Some(name) if name == H::NAME => false,
            _ => return Answered { inner: unimplemented(), place: None },
        };
        let state = &self.authz.state;
        let (parts, body) = req.into_parts();
        let Some(body) = Budgeted::take(body, state) else {
            return Answered::refused(Status::resource_exhausted("too many requests being received at once"));
        };
        let req = http::Request::from_parts(parts, body);
        if !authz {
            return Answered { inner: self.health.call(req), place: None };
        }
        // One of the `max_in_flight_checks` places, from the request until its answer has been
        // sent or the stream is gone: see `Answering`.
        let limit = state.policy.load().config.max_in_flight;
        let Some(place) = Place::take(state.in_flight.clone(), limit) else {
            state.metrics.check_shed();
            tracing::warn!(limit, "overloaded: check refused at once");
            return Answered::refused(Status::resource_exhausted(
                "subguard is overloaded: too many checks in flight",
            ));
        };
        Answered { inner: self.authz.call(req), place: Some(place) }
    }
}

/// `status` at once: a trailers-only answer, headers only.
fn at_once(status: Status) -> BoxFuture<http::Response<tonic::body::Body>, Infallible> {
    Box::pin(async move { Ok(status.into_http()) })
}

/// The answer to a method or service subguard does not serve: UNIMPLEMENTED, as generated
/// servers answer.
fn unimplemented() -> BoxFuture<http::Response<tonic::body::Body>, Infallible> {
    at_once(Status::unimplemented(""))
}

/// The future of [`Routes`]: the service's answer, its body made an [`Answering`].
pub struct Answered {
    inner: BoxFuture<http::Response<tonic::body::Body>, Infallible>,
    place: Option<Place<Arc<AtomicUsize>>>,
}

impl Answered {
    /// `status` at once, holding no place.
    fn refused(status: Status) -> Answered {
        Answered { inner: at_once(status), place: None }
    }
}

impl std::future::Future for Answered {
    type Output = Result<http::Response<Answering>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let response = std::task::ready!(this.inner.as_mut().poll(cx))?;
        let place = this.place.take();
        Poll::Ready(Ok(response.map(|body| Answering { body, _place: place })))
    }
}

/// An answer's body on its way out, holding its check's place among `max_in_flight_checks` until
/// hyper has sent it or the stream is gone. hyper sends a message only as far as the client's
/// HTTP/2 window allows, so a client that never grants one (Envoy always does) keeps its checks'
/// places: past the limit, further checks are refused with a trailers-only `RESOURCE_EXHAUSTED`,
/// headers only, which flow control does not hold back. Without this, every check answered into
/// a closed window kept its stream in memory without bound (870 MB in 4 s from a local peer).
pub struct Answering {
    body: tonic::body::Body,
    _place: Option<Place<Arc<AtomicUsize>>>,
}

impl Body for Answering {
    type Data = <tonic::body::Body as Body>::Data;
    type Error = <tonic::body::Body as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

struct CheckMethod(Arc<State>);

impl tonic::server::UnaryService<wire::CheckRequest> for CheckMethod {
    type Response = Answer;
    type Future = BoxFuture<Response<Answer>, Status>;

    fn call(&mut self, request: Request<wire::CheckRequest>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move { check(&state, request.into_inner()).await.map(Response::new) })
    }
}

pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// One check: the decision for `req` and its `CheckResponse`.
async fn check(state: &State, req: wire::CheckRequest) -> Result<Answer, Status> {
    let started = Instant::now();
    let metrics = &state.metrics;
    let policy = state.policy.load_full();
    // Its place among `max_in_flight_checks` was taken by `Routes::call`.
    let _in_flight = metrics.check_started();
    let view = EnvoyRequest::new(&req);
    let request_id = view.request_id();
    // One span per check; it joins the caller's W3C trace when the request carries one, so
    // every log line of the check (directory, keys) can be found by trace or request id.
    let span = tracing::info_span!(
        "check",
        request_id = request_id.unwrap_or(""),
        trace_id = view.header("traceparent").and_then(trace_id).unwrap_or(""),
        tenant = tracing::field::Empty,
        reason = tracing::field::Empty,
    );
    #[cfg(feature = "otel")]
    crate::telemetry::otel::join_trace(&span, view.header("traceparent"));
    let decision = policy.check(&view, unix_now()).instrument(span.clone()).await;
    // The outcome joins the span for the check's own log line (and the exported trace). With
    // JSON logs every `record` re-reads and re-writes the span's formatted fields, so it is
    // skipped when that line is filtered out (allows at the default level): the span then has
    // no reader left.
    if cfg!(feature = "otel") || span.in_scope(|| crate::telemetry::check_logged(&decision)) {
        span.record("tenant", decision.tenant.as_deref().unwrap_or(""));
        span.record("reason", decision.reason_code());
    }
    span.in_scope(|| metrics.check_finished(&decision, request_id, started.elapsed()));
    Ok(Answer::new(decision, &policy, request_id))
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), if well-formed and not
/// all zeros.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && hex(parent, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && (version != "00" || parts.next().is_none());
    valid.then_some(trace)
}

/// `s` with control characters written as `\u000a` escapes. A signed token's `sub` is still text
/// its holder may have chosen; Envoy's text access log prints metadata as is, so a raw newline
/// there would let it forge log lines.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if c.is_control() {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// The body of a deny: `{"code","message","tenant","request_id"}`. Never contains the token.
pub fn deny_body(reason: Reason, tenant: Option<&str>, request_id: Option<&str>) -> String {
    serde_json::json!({
        "code": reason.code(),
        "message": reason.message(tenant),
        "tenant": tenant,
        "request_id": request_id,
    })
    .to_string()
}

/// The response headers of a deny.
pub fn deny_headers(reason: Reason, tenant: Option<&str>) -> Vec<(&'static str, String)> {
    let mut h = vec![
        ("content-type", "application/json".to_string()),
        ("x-subguard-reason", reason.code().to_string()),
    ];
    if reason.http_status() == 401 {
        let realm = tenant.unwrap_or("");
        let v = if reason == Reason::MissingToken {
            format!("Bearer realm=\"{realm}\"")
        } else {
            format!(
                "Bearer realm=\"{realm}\", error=\"invalid_token\", error_description=\"{}\"",
                reason.message(tenant)
            )
        };
        h.push(("www-authenticate", v));
    }
    if let Some(s) = reason.retry_after_seconds() {
        h.push(("retry-after", s.to_string()));
    }
    h
}

/// A decision as the `CheckResponse` Envoy receives (decoded from the bytes the server writes).
pub fn render(d: &Decision, policy: &Policy, request_id: Option<&str>) -> CheckResponse {
    Answer::new(d.clone(), policy, request_id).to_message().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::trace_id;

    #[test]
    fn grpc_timeouts_are_read_as_the_spec_writes_them() {
        use super::grpc_timeout;
        use std::time::Duration;
        assert_eq!(grpc_timeout(b"250m"), Some(Duration::from_millis(250)));
        assert_eq!(grpc_timeout(b"1S"), Some(Duration::from_secs(1)));
        assert_eq!(grpc_timeout(b"2M"), Some(Duration::from_secs(120)));
        assert_eq!(grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(grpc_timeout(b"99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(grpc_timeout(b"5n"), Some(Duration::from_nanos(5)));
        for bad in [&b""[..], b"m", b"100", b"123456789m", b"1.5S", b"-1S", b"10x", b" 10m"] {
            assert_eq!(grpc_timeout(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn services_are_told_apart_by_the_path() {
        use super::service_of;
        assert_eq!(
            service_of("/envoy.service.auth.v3.Authorization/Check"),
            Some("envoy.service.auth.v3.Authorization")
        );
        assert_eq!(service_of("/grpc.health.v1.Health/Watch"), Some("grpc.health.v1.Health"));
        assert_eq!(service_of("/envoy.service.auth.v3.Authorization"), None);
        assert_eq!(service_of("envoy.service.auth.v3.Authorization/Check"), None);
        assert_eq!(service_of("/"), None);
        assert_eq!(service_of("//Check"), Some(""));
    }

    #[test]
    fn control_characters_never_reach_metadata_raw() {
        use super::printable;
        assert_eq!(printable("alice"), "alice");
        assert_eq!(printable("a\nb\r\u{7f}c\u{85}"), "a\\u000ab\\u000d\\u007fc\\u0085");
        assert_eq!(printable("jörg"), "jörg");
    }

    #[test]
    fn traceparent_parsing() {
        let t = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id(t), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(trace_id("00-00000000000000000000000000000000-00f067aa0ba902b7-01"), None);
        assert_eq!(trace_id("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"), None);
        assert_eq!(trace_id("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7"), None);
        assert_eq!(trace_id("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x"), None);
        assert_eq!(trace_id("garbage"), None);
    }
}
