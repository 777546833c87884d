//! A small `Check` client: builds the `CheckRequest` Envoy would send and flattens the
//! `CheckResponse` into what the tests assert on.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use envoy_types::pb::google::protobuf::{Struct, Value as PbValue, value::Kind};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tonic::codegen::http::Uri;
use tonic::transport::{Channel, Endpoint};

/// What a test sends: headers (names are lowercased), host, route context extensions.
#[derive(Clone, Debug, Default)]
pub struct CheckCall {
    headers: Vec<(String, String)>,
    host: Option<String>,
    context_extensions: Vec<(String, String)>,
    /// Put headers only into `header_map` with `raw_value` bytes (Envoy's `encode_raw_headers: true`).
    raw: bool,
}

impl CheckCall {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a header. A name given twice is joined with `,` in `headers` (as Envoy does), and
    /// kept as two entries in `header_map`.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_ascii_lowercase(), value.to_string()));
        self
    }

    pub fn headers(mut self, headers: &[(&str, &str)]) -> Self {
        for (k, v) in headers {
            self = self.header(k, v);
        }
        self
    }

    /// `authorization: Bearer <token>`
    pub fn bearer(self, token: &str) -> Self {
        self.header("authorization", &format!("Bearer {token}"))
    }

    /// `x-tenant-id: <tenant>`
    pub fn tenant(self, tenant: &str) -> Self {
        self.header("x-tenant-id", tenant)
    }

    pub fn request_id(self, id: &str) -> Self {
        self.header("x-request-id", id)
    }

    /// Sets `attributes.request.http.host` and the `:authority` header.
    pub fn host(mut self, host: &str) -> Self {
        self.host = Some(host.to_string());
        self
    }

    /// A route's ext_authz `context_extensions` entry (e.g. `("tenant", "acme")`).
    pub fn context(mut self, key: &str, value: &str) -> Self {
        self.context_extensions.push((key.to_string(), value.to_string()));
        self
    }

    pub fn route_tenant(self, tenant: &str) -> Self {
        self.context("tenant", tenant)
    }

    /// Headers go only to `header_map` as `raw_value` bytes, as with `encode_raw_headers: true`.
    pub fn raw_headers(mut self) -> Self {
        self.raw = true;
        self
    }

    pub fn to_request(&self) -> CheckRequest {
        let mut all: Vec<(String, String)> = self.headers.clone();
        if let Some(host) = &self.host {
            all.push((":authority".into(), host.clone()));
        }
        if !self.raw {
            let mut joined: Vec<(String, String)> = Vec::new();
            for (k, v) in all {
                match joined.iter_mut().find(|(name, _)| *name == k) {
                    Some((_, prev)) => {
                        prev.push(',');
                        prev.push_str(&v);
                    }
                    None => joined.push((k, v)),
                }
            }
            all = joined;
        }
        let mut http = HttpRequest {
            id: "1".into(),
            method: "GET".into(),
            path: "/orders/42".into(),
            host: self.host.clone().unwrap_or_default(),
            scheme: "http".into(),
            protocol: "HTTP/1.1".into(),
            ..Default::default()
        };
        if self.raw {
            http.header_map = Some(HeaderMap {
                headers: all
                    .iter()
                    .map(|(k, v)| HeaderValue {
                        key: k.clone(),
                        raw_value: v.as_bytes().to_vec(),
                        ..Default::default()
                    })
                    .collect(),
            });
        } else {
            http.headers = all.into_iter().collect();
        }
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request { http: Some(http), ..Default::default() }),
                context_extensions: self.context_extensions.iter().cloned().collect(),
                ..Default::default()
            }),
        }
    }
}

/// One response header as sent in a `HeaderValueOption`.
#[derive(Clone, Debug)]
pub struct ResponseHeader {
    pub name: String,
    pub value: String,
    /// The deprecated `append` BoolValue, when set.
    pub append: Option<bool>,
    pub append_action: i32,
}

/// The `CheckResponse`, flattened.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// `status.code == OK` (what Envoy uses to allow).
    pub allowed: bool,
    /// The gRPC status code of `CheckResponse.status`.
    pub grpc_code: i32,
    /// `denied_response.status.code` (HTTP); `None` on allow.
    pub status: Option<u16>,
    /// Denied: headers to the client; allowed: headers to the upstream. Lowercase names.
    pub headers: Vec<(String, String)>,
    pub header_options: Vec<ResponseHeader>,
    /// `ok_response.headers_to_remove`.
    pub headers_to_remove: Vec<String>,
    /// The denied body as text and parsed as JSON (`Null` when empty or not JSON).
    pub raw_body: String,
    pub body: Value,
    /// `dynamic_metadata` flattened: nested structs as dotted keys, numbers and bools as text.
    pub metadata: HashMap<String, String>,
    /// Which oneof `http_response` held: `ok`, `denied`, `error` or `none`.
    pub http_response: &'static str,
}

impl Outcome {
    fn from_response(r: CheckResponse) -> Self {
        let grpc_code = r.status.as_ref().map(|s| s.code).unwrap_or(0);
        let mut out = Outcome {
            allowed: grpc_code == 0,
            grpc_code,
            status: None,
            headers: vec![],
            header_options: vec![],
            headers_to_remove: vec![],
            raw_body: String::new(),
            body: Value::Null,
            metadata: HashMap::new(),
            http_response: "none",
        };
        if let Some(md) = &r.dynamic_metadata {
            flatten("", md, &mut out.metadata);
        }
        match r.http_response {
            Some(HttpResponse::OkResponse(ok)) => {
                out.http_response = "ok";
                out.set_headers(&ok.headers);
                out.headers_to_remove = ok.headers_to_remove.iter().map(|h| h.to_ascii_lowercase()).collect();
                #[allow(deprecated)] // Envoy still honours the old field; read both.
                if let Some(md) = &ok.dynamic_metadata {
                    flatten("", md, &mut out.metadata);
                }
            }
            Some(HttpResponse::DeniedResponse(denied)) => {
                out.http_response = "denied";
                out.status = denied.status.map(|s| s.code as u16);
                out.set_headers(&denied.headers);
                out.raw_body = denied.body.clone();
                out.body = serde_json::from_str(&denied.body).unwrap_or(Value::Null);
            }
            Some(HttpResponse::ErrorResponse(_)) => out.http_response = "error",
            None => {}
        }
        out
    }

    fn set_headers(&mut self, headers: &[HeaderValueOption]) {
        for option in headers {
            let Some(h) = &option.header else { continue };
            let value = if h.value.is_empty() {
                String::from_utf8_lossy(&h.raw_value).into_owned()
            } else {
                h.value.clone()
            };
            let name = h.key.to_ascii_lowercase();
            self.headers.push((name.clone(), value.clone()));
            #[allow(deprecated)]
            self.header_options.push(ResponseHeader {
                name,
                value,
                append: option.append.map(|b| b.value),
                append_action: option.append_action,
            });
        }
    }

    /// The first value of a header (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }

    /// Every value of a header.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().filter(|(k, _)| *k == name).map(|(_, v)| v.as_str()).collect()
    }

    pub fn removes(&self, name: &str) -> bool {
        self.headers_to_remove.iter().any(|h| h.eq_ignore_ascii_case(name))
    }

    pub fn meta(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }

    /// `x-subguard-reason`, else the metadata `reason`.
    pub fn reason(&self) -> Option<&str> {
        self.header("x-subguard-reason").or_else(|| self.meta("reason"))
    }

    /// Whether this is the answer `reason` names: allowed with metadata reason `ok`, or denied
    /// with that reason.
    pub fn answers(&self, reason: &str) -> bool {
        self.meta("reason") == Some(reason) && self.allowed == (reason == "ok")
    }
}

fn flatten(prefix: &str, s: &Struct, out: &mut HashMap<String, String>) {
    for (k, v) in &s.fields {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        flatten_value(&key, v, out);
    }
}

fn flatten_value(key: &str, v: &PbValue, out: &mut HashMap<String, String>) {
    match &v.kind {
        Some(Kind::StringValue(s)) => {
            out.insert(key.to_string(), s.clone());
        }
        Some(Kind::NumberValue(n)) => {
            out.insert(key.to_string(), n.to_string());
        }
        Some(Kind::BoolValue(b)) => {
            out.insert(key.to_string(), b.to_string());
        }
        Some(Kind::NullValue(_)) | None => {
            out.insert(key.to_string(), String::new());
        }
        Some(Kind::StructValue(s)) => flatten(key, s, out),
        Some(Kind::ListValue(l)) => {
            let items: Vec<String> = l
                .values
                .iter()
                .map(|v| match &v.kind {
                    Some(Kind::StringValue(s)) => s.clone(),
                    other => format!("{other:?}"),
                })
                .collect();
            out.insert(key.to_string(), items.join(","));
        }
    }
}

/// A gRPC `Authorization` client.
#[derive(Clone)]
pub struct CheckClient {
    inner: AuthorizationClient<Channel>,
    channel: Channel,
}

impl CheckClient {
    pub async fn connect_tcp(addr: std::net::SocketAddr) -> Self {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connecting to subguard at {addr}: {e}"));
        CheckClient { inner: AuthorizationClient::new(channel.clone()), channel }
    }

    pub async fn connect_unix(path: &Path) -> Self {
        // The URI is required by the API but unused: the connector dials the socket.
        let channel = Endpoint::from_static("http://[::1]:50051")
            .connect_with_connector(UnixConnector(path.to_path_buf()))
            .await
            .unwrap_or_else(|e| panic!("connecting to subguard at unix://{}: {e}", path.display()));
        CheckClient { inner: AuthorizationClient::new(channel.clone()), channel }
    }

    pub fn channel_client(&self) -> AuthorizationClient<Channel> {
        self.inner.clone()
    }

    /// Sends a call; panics on a gRPC error (subguard answers every check with a response).
    pub async fn call(&mut self, call: &CheckCall) -> Outcome {
        self.try_call(call)
            .await
            .unwrap_or_else(|status| panic!("Check failed at the gRPC level: {status:?}"))
    }

    pub async fn try_call(&mut self, call: &CheckCall) -> Result<Outcome, tonic::Status> {
        self.send(call.to_request()).await
    }

    /// [`CheckClient::try_call`] with a `grpc-timeout` header of `timeout`, as Envoy sends its
    /// ext_authz `timeout` (the client itself does not enforce it).
    pub async fn try_call_within(
        &mut self,
        call: &CheckCall,
        timeout: std::time::Duration,
    ) -> Result<Outcome, tonic::Status> {
        let mut request = tonic::Request::new(call.to_request());
        request.set_timeout(timeout);
        let response = self.inner.check(request).await?;
        Ok(Outcome::from_response(response.into_inner()))
    }

    pub async fn send(&mut self, request: CheckRequest) -> Result<Outcome, tonic::Status> {
        let response = self.inner.check(request).await?;
        Ok(Outcome::from_response(response.into_inner()))
    }

    /// Sends `message` as the encoded `CheckRequest` as it is: bytes no `CheckRequest` value can
    /// hold (strings that are not UTF-8) reach subguard as Envoy could send them.
    #[allow(dead_code)]
    pub async fn send_encoded(&mut self, message: Vec<u8>) -> Result<Outcome, tonic::Status> {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(
            "/envoy.service.auth.v3.Authorization/Check",
        );
        let response = grpc.unary(tonic::Request::new(message), path, EncodedCodec).await?;
        Ok(Outcome::from_response(response.into_inner()))
    }

    /// `check(headers, host, context_extensions)`: headers in `attributes.request.http.headers`.
    pub async fn check(&mut self, headers: &[(&str, &str)], host: &str, context: &[(&str, &str)]) -> Outcome {
        self.call(&build(headers, host, context, false)).await
    }

    /// Like `check`, with headers only in `header_map` (`encode_raw_headers: true`).
    pub async fn check_raw(
        &mut self,
        headers: &[(&str, &str)],
        host: &str,
        context: &[(&str, &str)],
    ) -> Outcome {
        self.call(&build(headers, host, context, true)).await
    }
}

fn build(headers: &[(&str, &str)], host: &str, context: &[(&str, &str)], raw: bool) -> CheckCall {
    let mut call = CheckCall::new();
    if raw {
        call = call.raw_headers();
    }
    call = call.headers(headers);
    if !host.is_empty() {
        call = call.host(host);
    }
    for (k, v) in context {
        call = call.context(k, v);
    }
    call
}

/// Sends bytes already encoded; reads a `CheckResponse`.
#[derive(Clone, Copy, Default)]
struct EncodedCodec;

impl tonic::codec::Codec for EncodedCodec {
    type Encode = Vec<u8>;
    type Decode = CheckResponse;
    type Encoder = EncodedCodec;
    type Decoder = <tonic_prost::ProstCodec<CheckResponse, CheckResponse> as tonic::codec::Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        EncodedCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic::codec::Codec::decoder(&mut tonic_prost::ProstCodec::<CheckResponse, CheckResponse>::default())
    }
}

impl tonic::codec::Encoder for EncodedCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        prost::bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

/// Dials a Unix socket for tonic (the URI is ignored).
#[derive(Clone)]
struct UnixConnector(PathBuf);

impl tonic::codegen::Service<Uri> for UnixConnector {
    type Response = TokioIo<tokio::net::UnixStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move { Ok(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) })
    }
}

/// One `Check` sent over a bare HTTP/2 connection with `headers` added, for what a gRPC client
/// library would not send or would enforce itself (tonic's client also enforces `grpc-timeout`).
/// Returns the `grpc-status` (from the trailers, or the headers of a trailers-only answer).
pub async fn raw_check(
    addr: std::net::SocketAddr,
    call: &CheckCall,
    headers: &[(&str, &str)],
) -> Option<String> {
    use http_body_util::BodyExt;
    use prost::Message;
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let message = call.to_request().encode_to_vec();
    let mut body = vec![0u8];
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(&message);
    let mut request = tonic::codegen::http::Request::post(format!(
        "http://{addr}/envoy.service.auth.v3.Authorization/Check"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers");
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let request = request.body(http_body_util::Full::new(prost::bytes::Bytes::from(body))).unwrap();
    let response = send.send_request(request).await.unwrap();
    let in_headers = response.headers().get("grpc-status").map(|v| v.to_str().unwrap().to_string());
    let collected = response.into_body().collect().await.unwrap();
    let trailers =
        collected.trailers().and_then(|t| t.get("grpc-status")).map(|v| v.to_str().unwrap().to_string());
    trailers.or(in_headers)
}
