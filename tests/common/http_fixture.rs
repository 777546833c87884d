//! A tiny HTTP/1 server on `127.0.0.1:0` with its own runtime thread, for fixture servers.
//!
//! It runs outside the test's runtime so that blocking helpers (starting subguard, which fetches
//! keys from a fixture before it is ready) can never starve it. `stop` closes the listener *and*
//! every open connection, so a pooled keep-alive connection can't keep a "down" server answering;
//! `resume` listens on the same port again.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::task::{JoinHandle, JoinSet};

/// What the handler sees of a request.
#[derive(Clone, Debug)]
pub struct FixtureRequest {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// Lowercase names, in arrival order (repeats kept).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl FixtureRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// What the handler answers.
#[derive(Clone, Debug)]
pub struct FixtureResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl FixtureResponse {
    pub fn json(status: u16, body: impl Into<Vec<u8>>) -> Self {
        FixtureResponse {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.into(),
        }
    }

    pub fn text(status: u16, body: impl Into<Vec<u8>>) -> Self {
        FixtureResponse {
            status,
            headers: vec![("content-type".into(), "text/plain".into())],
            body: body.into(),
        }
    }
}

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
pub type Handler = Arc<dyn Fn(FixtureRequest) -> BoxFuture<FixtureResponse> + Send + Sync>;

pub struct HttpFixture {
    addr: SocketAddr,
    handler: Handler,
    runtime: Option<tokio::runtime::Runtime>,
    server: Mutex<Option<JoinHandle<()>>>,
}

impl HttpFixture {
    pub fn start(handler: Handler) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("http-fixture")
            .enable_all()
            .build()
            .expect("fixture runtime");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind fixture server");
        let addr = listener.local_addr().unwrap();
        let fixture = HttpFixture { addr, handler, runtime: Some(runtime), server: Mutex::new(None) };
        fixture.serve(listener);
        fixture
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes the listener and every open connection: connections are refused until `resume`.
    pub fn stop(&self) {
        let Some(task) = self.server.lock().unwrap().take() else { return };
        task.abort();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !task.is_finished() {
            assert!(Instant::now() < deadline, "fixture server did not stop");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Listens on the same port again after `stop`.
    pub fn resume(&self) {
        if self.server.lock().unwrap().is_some() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match std::net::TcpListener::bind(self.addr) {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("re-binding fixture server on {}: {e}", self.addr),
            }
        };
        self.serve(listener);
    }

    fn serve(&self, listener: std::net::TcpListener) {
        listener.set_nonblocking(true).unwrap();
        let runtime = self.runtime.as_ref().unwrap();
        let _enter = runtime.enter();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let handler = self.handler.clone();
        let task = runtime.spawn(accept_loop(listener, handler));
        *self.server.lock().unwrap() = Some(task);
    }
}

impl Drop for HttpFixture {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, handler: Handler) {
    // Connections live in this set: aborting the accept loop drops it, which aborts them all.
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let Ok((stream, _)) = listener.accept().await else { continue };
        let handler = handler.clone();
        connections.spawn(async move {
            let service = service_fn(move |req: hyper::Request<Incoming>| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(respond(handler, req).await) }
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

async fn respond(handler: Handler, req: hyper::Request<Incoming>) -> hyper::Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes().to_vec()).unwrap_or_default();
    let request = FixtureRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect(),
        body,
    };
    let answer = handler(request).await;
    let mut response = hyper::Response::builder().status(answer.status);
    for (k, v) in &answer.headers {
        response = response.header(k, v);
    }
    response.body(Full::new(Bytes::from(answer.body))).unwrap()
}
