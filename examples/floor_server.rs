//! The floor of the ext_authz architecture: an `envoy.service.auth.v3.Authorization/Check` server
//! that reads nothing and answers OK to every request, with tonic's default server settings and
//! tokio's default runtime.
//!
//! `scripts/loadbench.py` (`make bench`) puts it behind one of Envoy's listeners, beside subguard,
//! so the cost of the gRPC hop itself (Envoy's ext_authz filter, HTTP/2, protobuf, tonic) is
//! measured on the same machine in the same run. Whatever subguard costs above this server is
//! subguard's own.
//!
//! Run: `cargo run --release --example floor_server -- 19191` (listens on 127.0.0.1 only), or
//! `-- unix:/tmp/floor.sock` to listen on a Unix socket, as subguard can.
//!
//! With `FLOOR_ANSWER=identity` in its environment it still reads nothing, but its OK carries what
//! subguard's allow for the harness's warm user carries (SPEC section 3): the three identity headers and
//! the five dynamic-metadata entries. Behind Envoy, that separates what Envoy spends on the
//! contract's answer from what subguard spends deciding it.

use std::net::{Ipv4Addr, SocketAddr};

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::auth::v3::authorization_server::{Authorization, AuthorizationServer};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse, OkHttpResponse};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc;
use tonic::{Request, Response, Status};

/// Answers OK; `identity`: with the headers and metadata of subguard's allow for the harness's
/// warm user (alice of tenant acme in the quickstart users file).
struct Allow {
    identity: bool,
}

#[tonic::async_trait]
impl Authorization for Allow {
    async fn check(&self, _request: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let (ok, metadata) = if self.identity { identity() } else { Default::default() };
        Ok(Response::new(CheckResponse {
            status: Some(rpc::Status { code: 0, ..Default::default() }),
            http_response: Some(HttpResponse::OkResponse(ok)),
            dynamic_metadata: metadata,
        }))
    }
}

fn identity() -> (OkHttpResponse, Option<Struct>) {
    let header = |key: &str, value: &str| HeaderValueOption {
        header: Some(HeaderValue { key: key.into(), value: value.into(), ..Default::default() }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    };
    let ok = OkHttpResponse {
        headers: vec![
            header("x-tenant-id", "acme"),
            header("x-user-id", "u-1001"),
            header("x-user-roles", "admin,billing"),
        ],
        ..Default::default()
    };
    let text = |s: &str| Value { kind: Some(Kind::StringValue(s.into())) };
    let fields = [
        ("decision", "allow"),
        ("reason", "ok"),
        ("tenant", "acme"),
        ("sub", "alice"),
        ("issuer", "https://idp.acme.test/"),
    ];
    let metadata = Struct { fields: fields.into_iter().map(|(k, v)| (k.to_string(), text(v))).collect() };
    (ok, Some(metadata))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arg = std::env::args().nth(1).unwrap_or_default();
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let identity = std::env::var("FLOOR_ANSWER").is_ok_and(|v| v == "identity");
    let server =
        tonic::transport::Server::builder().add_service(AuthorizationServer::new(Allow { identity }));
    if let Some(path) = arg.strip_prefix("unix:") {
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path)?;
        println!("floor_server listening on unix:{path}");
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        server.serve_with_incoming_shutdown(incoming, stop).await?;
        return Ok(());
    }
    let Ok(port) = arg.parse::<u16>() else {
        eprintln!(
            "usage: floor_server PORT | unix:PATH   (serves Authorization/Check on 127.0.0.1:PORT or PATH)"
        );
        std::process::exit(2);
    };
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    println!("floor_server listening on {addr}");
    server.serve_with_shutdown(addr, stop).await?;
    Ok(())
}
