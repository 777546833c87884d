//! The gRPC listener's connections, served by hyper's HTTP/2 server.
//!
//! tonic's `Server` does the same with two differences that cost every check: it lets hyper add a
//! `date` header to each response, and it wraps the service in layers subguard does not use
//! (connection info in the request's extensions, a boxed request body, tower adapters). The `date`
//! is the dearer one: h2's HPACK encoder indexes each new second's value in the connection's
//! dynamic table and finds a value by walking every entry with the same name, so once a
//! connection is a minute old each response compares its `date` with about sixty stored ones.
//! Envoy reads nothing from a gRPC response's `date`.
//!
//! What stays as tonic serves it: HTTP/2 only, hyper's default windows and frame size, no cap on
//! concurrent streams, TCP_NODELAY, HTTP/2 keepalive pings every 30 s, and graceful shutdown (stop
//! accepting, let every connection finish its streams with a GOAWAY, return when all are closed).
//! One difference: hyper's limit on streams a client makes the server reset (1 024 a connection,
//! against reset floods) is kept; tonic lifted it.

use std::convert::Infallible;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tonic::codegen::{Service, http};

/// Interval of HTTP/2 keepalive pings on idle connections.
const KEEPALIVE: Duration = Duration::from_secs(30);

/// A listening socket whose connections carry gRPC.
pub trait Listen: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&self) -> impl Future<Output = std::io::Result<Self::Io>> + Send;
}

impl Listen for TcpListener {
    type Io = tokio::net::TcpStream;

    async fn accept(&self) -> std::io::Result<Self::Io> {
        let (stream, _) = TcpListener::accept(self).await?;
        // A check's answer is one small write; Nagle would hold it for the previous one's ACK.
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

impl Listen for UnixListener {
    type Io = tokio::net::UnixStream;

    async fn accept(&self) -> std::io::Result<Self::Io> {
        Ok(UnixListener::accept(self).await?.0)
    }
}

/// Serves `service` on every connection `listener` accepts until `shutdown` resolves; then stops
/// accepting, asks every connection to finish (GOAWAY: streams in flight complete, no new ones
/// start) and returns once all are closed.
pub async fn serve<L, S>(listener: L, service: S, shutdown: impl Future<Output = ()>)
where
    L: Listen,
    S: Service<http::Request<Incoming>, Response = http::Response<tonic::body::Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEPALIVE)
        .auto_date_header(false)
        // No cap per connection (hyper's default is 200; tonic's server lifted it too): Envoy
        // sends a worker's checks over one connection, and `max_in_flight_checks` is the limit
        // that refuses checks beyond what subguard should take on, with a reason.
        .max_concurrent_streams(None);

    // Every connection holds a receiver: told to stop through it, and counted by it.
    let (stop, stopped) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let io = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(io) => io,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was accepted:
                    // the listener itself is fine. Back off a little so a descriptor shortage
                    // does not spin.
                    tracing::warn!(error = %e, "grpc listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let connection = http2.serve_connection(TokioIo::new(io), TowerToHyperService::new(service.clone()));
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => return finished(result),
                _ = stopped.wait_for(|s| *s) => connection.as_mut().graceful_shutdown(),
            }
            finished(connection.await);
        });
    }
    drop(listener);
    let _ = stop.send(true);
    drop(stopped);
    stop.closed().await;
}

fn finished(result: Result<(), hyper::Error>) {
    if let Err(e) = result {
        tracing::debug!(error = %e, "grpc connection ended with an error");
    }
}
