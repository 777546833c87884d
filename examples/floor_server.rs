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

use std::net::{Ipv4Addr, SocketAddr};

use envoy_types::pb::envoy::service::auth::v3::authorization_server::{Authorization, AuthorizationServer};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse, OkHttpResponse};
use envoy_types::pb::google::rpc;
use tonic::{Request, Response, Status};

struct Allow;

#[tonic::async_trait]
impl Authorization for Allow {
    async fn check(&self, _request: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        Ok(Response::new(CheckResponse {
            status: Some(rpc::Status { code: 0, ..Default::default() }),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
            dynamic_metadata: None,
        }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arg = std::env::args().nth(1).unwrap_or_default();
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let server = tonic::transport::Server::builder().add_service(AuthorizationServer::new(Allow));
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
