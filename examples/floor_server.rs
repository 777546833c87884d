//! The floor of the ext_authz architecture: an `envoy.service.auth.v3.Authorization/Check` server
//! that reads nothing and answers OK to every request, with tonic's default server settings and
//! tokio's default runtime.
//!
//! `scripts/loadbench.py` (`make bench`) puts it behind one of Envoy's listeners, beside subguard,
//! so the cost of the gRPC hop itself (Envoy's ext_authz filter, HTTP/2, protobuf, tonic) is
//! measured on the same machine in the same run. Whatever subguard costs above this server is
//! subguard's own.
//!
//! Run: `cargo run --release --example floor_server -- 19191` (listens on 127.0.0.1 only).

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
    let port: u16 = match std::env::args().nth(1).map(|p| p.parse()) {
        Some(Ok(port)) => port,
        _ => {
            eprintln!("usage: floor_server PORT   (serves Authorization/Check on 127.0.0.1:PORT)");
            std::process::exit(2);
        }
    };
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    println!("floor_server listening on {addr}");
    tonic::transport::Server::builder()
        .add_service(AuthorizationServer::new(Allow))
        .serve_with_shutdown(addr, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
