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
//! Two differences: hyper's limit on streams a client makes the server reset (1 024 a connection,
//! against reset floods) is kept, which tonic lifted; and on one worker a connection's streams are
//! run where it reads them and their answers written together (`Streams`), where tonic spawns a
//! task for each.
//!
//! The windows, keepalive and TCP_NODELAY were measured against the alternatives (smaller and
//! larger windows, hyper's adaptive window, no keepalive, Nagle's algorithm): only TCP_NODELAY
//! changes anything, and without it an answer waits for the ACK of the one before
//! (docs/benchmarks.md, "Tried and not taken").

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tonic::codegen::{Service, http};

/// Interval of HTTP/2 keepalive pings on idle connections.
const KEEPALIVE: Duration = Duration::from_secs(30);

/// At most this many gRPC connections are open at once; more are closed as soon as they are
/// accepted. Envoy opens one per worker (and more only past a server's stream limit, which
/// subguard does not set), a mesh health checker one more: a file descriptor per connection must
/// not be something a local process can take them all with.
pub const MAX_CONNECTIONS: usize = 1024;

/// A connection must send HTTP/2's preface and first frame header within this long, or it is
/// closed: one that never does would hold a connection place and a descriptor for good (a
/// handshaked connection that goes silent is found by the keepalive pings instead).
pub const PREFACE_TIMEOUT: Duration = Duration::from_secs(10);

/// A listener's connection places: at most `limit` connections hold one; a connection accepted
/// beyond that is closed at once (dropped), and warned about at most every 10 s.
pub struct Places {
    listener: &'static str,
    /// What the listener does at the limit, for the warning.
    at_limit: &'static str,
    limit: usize,
    places: Arc<tokio::sync::Semaphore>,
    warned_at: Option<Instant>,
}

impl Places {
    pub fn new(listener: &'static str, limit: usize, at_limit: &'static str) -> Self {
        Places {
            listener,
            at_limit,
            limit,
            places: Arc::new(tokio::sync::Semaphore::new(limit)),
            warned_at: None,
        }
    }

    /// A place given back within `wait`, once [`Places::take`] found none.
    pub async fn take_within(&self, wait: Duration) -> Option<tokio::sync::OwnedSemaphorePermit> {
        tokio::time::timeout(wait, self.places.clone().acquire_owned()).await.ok()?.ok()
    }

    /// A place for a connection just accepted, held until the permit is dropped; `None`: close it.
    pub fn take(&mut self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let place = self.places.clone().try_acquire_owned().ok();
        if place.is_none() && self.warned_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
            self.warned_at = Some(Instant::now());
            tracing::warn!(
                limit = self.limit,
                "{} listener: connection limit reached; {}",
                self.listener,
                self.at_limit
            );
        }
        place
    }
}

/// The client preface (24 bytes) and the header of the SETTINGS frame that must follow it.
const PREFACE_BYTES: usize = 24 + 9;

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
pub async fn serve<L, S, B>(listener: L, service: S, shutdown: impl Future<Output = ()>)
where
    L: Listen,
    S: Service<http::Request<Incoming>, Response = http::Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // Every connection holds a receiver: told to stop through it, and counted by it.
    let (stop, stopped) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    let batch = one_worker();
    let mut places = Places::new("grpc", MAX_CONNECTIONS, "closing new connections");
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
        let Some(place) = places.take() else { continue };
        let greeted = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let io = FirstBytes { io, needed: PREFACE_BYTES, greeted: Some(greeted.clone()) };
        let streams = if batch { Streams::Batch(Arc::default()) } else { Streams::Spawn };
        let connection = http2(streams.clone())
            .serve_connection(TokioIo::new(io), TowerToHyperService::new(service.clone()));
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let _place = place;
            let mut connection = std::pin::pin!(connection);
            let silent = async {
                tokio::time::sleep(PREFACE_TIMEOUT).await;
                if greeted.load(std::sync::atomic::Ordering::Acquire) {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                result = drive(connection.as_mut(), &streams, SLOW) => return finished(result),
                _ = stopped.wait_for(|s| *s) => connection.as_mut().graceful_shutdown(),
                () = silent => {
                    tracing::debug!("grpc connection closed: no HTTP/2 preface within {} s", PREFACE_TIMEOUT.as_secs());
                    return;
                }
            }
            finished(drive(connection.as_mut(), &streams, SLOW).await);
        });
    }
    drop(listener);
    let _ = stop.send(true);
    drop(stopped);
    stop.closed().await;
}

/// A connection's socket that notes when the client has sent its first `needed` bytes (the
/// HTTP/2 preface); after that, one branch per read.
struct FirstBytes<T> {
    io: T,
    needed: usize,
    greeted: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl<T: AsyncRead + Unpin> AsyncRead for FirstBytes<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if self.greeted.is_some() {
            let read = buf.filled().len() - before;
            self.needed = self.needed.saturating_sub(read);
            if self.needed == 0
                && let Some(greeted) = self.greeted.take()
            {
                greeted.store(true, std::sync::atomic::Ordering::Release);
            }
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FirstBytes<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// hyper's HTTP/2 server with subguard's settings, its streams run by `streams`.
fn http2(streams: Streams) -> hyper::server::conn::http2::Builder<Streams> {
    let mut http2 = hyper::server::conn::http2::Builder::new(streams);
    http2
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEPALIVE)
        .auto_date_header(false)
        // No cap per connection (hyper's default is 200; tonic's server lifted it too): Envoy
        // sends a worker's checks over one connection, and `max_in_flight_checks` is the limit
        // that refuses checks beyond what subguard should take on, with a reason.
        .max_concurrent_streams(None);
    http2
}

/// Whether this runtime has one worker (subguard's default, see `server::runtime`).
fn one_worker() -> bool {
    tokio::runtime::Handle::try_current().map_or(true, |h| h.metrics().num_workers() == 1)
}

/// How a connection's streams run: hyper hands each stream it accepts to this executor.
///
/// `Spawn`: each stream is a task, as hyper's `TokioExecutor` runs it. Used with more than one
/// worker, so that stealing workers share a connection's checks.
///
/// `Batch` (one worker, subguard's default): a stream waits in the connection's queue until the
/// connection has read everything the socket held; [`drive`] then polls it once right there and
/// spawns it only if it did not finish. A warm check finishes at that poll (its request's DATA
/// frame has been read by then), so the answers to what Envoy sent in one write go back in two
/// writes ([`drive`] says when a batch is written). As tasks, each check was woken into tokio's
/// LIFO slot with the connection right behind it, and every answer was a `writev` of its own for
/// subguard and a read for Envoy (docs/benchmarks.md, items 23 and 24).
#[derive(Clone)]
enum Streams {
    Spawn,
    Batch(Arc<Mutex<Vec<Stream>>>),
}

/// A stream of a connection (the service's future, then the response's frames), boxed to wait.
type Stream = Pin<Box<dyn Future<Output = ()> + Send>>;

impl<F> hyper::rt::Executor<F> for Streams
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        match self {
            Streams::Spawn => {
                tokio::spawn(stream);
            }
            Streams::Batch(queue) => lock(queue).push(Box::pin(stream)),
        }
    }
}

fn lock(queue: &Mutex<Vec<Stream>>) -> std::sync::MutexGuard<'_, Vec<Stream>> {
    queue.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Times `drive` lets a connection read, run its new streams and write within one poll before
/// it yields to the runtime's other tasks.
const ROUNDS_PER_POLL: usize = 16;

/// How long a check's own run must take for its answer to be written as soon as it finishes.
/// Warm checks (a few microseconds each) wait for the end of their batch, however long the batch
/// is; a check that takes longer, usually a signature to verify, is written at once, so Envoy is
/// not left waiting for a batch of them. It counts each check's own time, not the time since the
/// last write, so a long batch of warm checks is still written in two.
const SLOW: Duration = Duration::from_micros(15);

/// Polls `connection` until it is done. With `Streams::Batch`, each time the connection has read
/// all it could, runs the streams it accepted (see [`Streams`]). The first answer is written at
/// once, so Envoy starts on it while the others are worked out; after that, an answer is written
/// as it finishes if its check ran for `slow` or longer ([`SLOW`] when serving), and the rest go
/// out together when the batch is done.
async fn drive<C: Future>(mut connection: Pin<&mut C>, streams: &Streams, slow: Duration) -> C::Output {
    let Streams::Batch(queue) = streams else {
        return connection.await;
    };
    let mut batch = Vec::new();
    std::future::poll_fn(|cx| {
        for _ in 0..ROUNDS_PER_POLL {
            if let Poll::Ready(done) = connection.as_mut().poll(cx) {
                spawn_all(lock(queue).drain(..));
                return Poll::Ready(done);
            }
            std::mem::swap(&mut *lock(queue), &mut batch);
            if batch.is_empty() {
                return Poll::Pending;
            }
            let mut accepted = batch.drain(..);
            let mut written = false;
            while let Some(stream) = accepted.next() {
                let started = Instant::now();
                // The batch's last answer is written by the next round's poll of the connection.
                if !first_poll(stream) || accepted.len() == 0 || (written && started.elapsed() < slow) {
                    continue;
                }
                written = true;
                if let Poll::Ready(done) = connection.as_mut().poll(cx) {
                    spawn_all(accepted);
                    spawn_all(lock(queue).drain(..));
                    return Poll::Ready(done);
                }
            }
        }
        // More keeps arriving: let other connections and timers run before the next round.
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

/// Streams accepted as their connection ended: theirs to finish or fail as tasks.
fn spawn_all(streams: impl Iterator<Item = Stream>) {
    for stream in streams {
        tokio::spawn(stream);
    }
}

/// Polls a new stream once and spawns it as a task if it did not finish; true if it finished.
///
/// That poll's waker is never woken: whatever the stream waits on takes the task's waker at the
/// task's first poll, which checks everything again. A panic is contained as a task's is: the
/// stream is dropped (hyper resets it) and the connection's other streams go on.
fn first_poll(mut stream: Stream) -> bool {
    let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        stream.as_mut().poll(&mut Context::from_waker(Waker::noop()))
    }));
    match polled {
        Ok(Poll::Ready(())) => true,
        Ok(Poll::Pending) => {
            tokio::spawn(stream);
            false
        }
        Err(_) => {
            tracing::error!("a grpc stream panicked; it was reset");
            false
        }
    }
}

fn finished(result: Result<(), hyper::Error>) {
    if let Err(e) = result {
        tracing::debug!(error = %e, "grpc connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use hyper::rt::Executor;
    use tokio::sync::oneshot;

    use super::*;

    type Log = Arc<Mutex<Vec<String>>>;

    fn note(log: &Log, line: impl Into<String>) {
        log.lock().unwrap().push(line.into());
    }

    #[tokio::test]
    async fn a_stream_that_finishes_at_its_first_poll_runs_there_and_is_not_spawned() {
        let ran = Arc::new(AtomicBool::new(false));
        let flag = ran.clone();
        let tasks = tokio::runtime::Handle::current().metrics().num_alive_tasks();
        assert!(first_poll(Box::pin(async move { flag.store(true, Ordering::SeqCst) })));
        assert!(ran.load(Ordering::SeqCst));
        assert_eq!(tokio::runtime::Handle::current().metrics().num_alive_tasks(), tasks);
    }

    #[tokio::test]
    async fn a_stream_still_waiting_after_its_first_poll_finishes_as_a_task() {
        let (go, wait) = oneshot::channel::<()>();
        let (done, finished) = oneshot::channel();
        assert!(!first_poll(Box::pin(async move {
            let _ = wait.await;
            let _ = done.send(());
        })));
        go.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), finished).await.expect("the task finishes").unwrap();
    }

    #[tokio::test]
    async fn a_stream_that_panics_is_dropped_and_the_connection_goes_on() {
        let dropped = Arc::new(AtomicBool::new(false));
        struct OnDrop(Arc<AtomicBool>);
        impl Drop for OnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let guard = OnDrop(dropped.clone());
        assert!(!first_poll(Box::pin(async move {
            let _guard = guard;
            panic!("a bug in a check");
        })));
        assert!(dropped.load(Ordering::SeqCst));
        // The caller (the connection's task) is still running: the next stream runs as usual.
        assert!(first_poll(Box::pin(async {})));
    }

    /// A connection stand-in: at its first poll it accepts one stream per entry of `costs` (each
    /// works for its cost, logs that it ran and finishes), and it ends once all have run.
    fn connection(costs: Vec<Duration>, executor: Streams, log: Log) -> impl Future<Output = ()> {
        let mut accepted = false;
        let streams = costs.len();
        std::future::poll_fn(move |_| {
            note(&log, "connection");
            if !accepted {
                accepted = true;
                for (i, cost) in costs.iter().copied().enumerate() {
                    let log = log.clone();
                    executor.execute(async move {
                        std::thread::sleep(cost);
                        note(&log, format!("stream {i}"));
                    });
                }
            }
            let ran = log.lock().unwrap().iter().filter(|l| l.starts_with("stream")).count();
            if ran == streams { Poll::Ready(()) } else { Poll::Pending }
        })
    }

    /// The order of reads/writes (`connection`) and streams when `drive` runs a batch of checks
    /// that cost `costs`.
    async fn order(costs: &[Duration], slow: Duration) -> Vec<String> {
        let log = Log::default();
        let streams = Streams::Batch(Arc::default());
        let conn = std::pin::pin!(connection(costs.to_vec(), streams.clone(), log.clone()));
        tokio::time::timeout(Duration::from_secs(5), drive(conn, &streams, slow)).await.unwrap();
        log.lock().unwrap().clone()
    }

    const QUICK: [Duration; 3] = [Duration::ZERO; 3];
    const MS: Duration = Duration::from_millis(1);

    #[tokio::test]
    async fn the_first_answer_is_written_before_the_rest_of_its_batch_runs() {
        // Read (and accept three), run the first, write its answer, run the other two, write theirs.
        assert_eq!(
            order(&QUICK, Duration::MAX).await,
            ["connection", "stream 0", "connection", "stream 1", "stream 2", "connection"]
        );
    }

    #[tokio::test]
    async fn answers_of_slow_checks_are_written_as_they_finish() {
        // Every check took at least the limit: each answer written at once (the last by the
        // round's closing poll).
        assert_eq!(
            order(&QUICK, Duration::ZERO).await,
            ["connection", "stream 0", "connection", "stream 1", "connection", "stream 2", "connection"]
        );
        // Only the slow one among quick ones.
        assert_eq!(
            order(&[Duration::ZERO, Duration::ZERO, 60 * MS, Duration::ZERO, Duration::ZERO], 50 * MS).await,
            [
                "connection",
                "stream 0",
                "connection",
                "stream 1",
                "stream 2",
                "connection",
                "stream 3",
                "stream 4",
                "connection"
            ]
        );
    }

    #[tokio::test]
    async fn a_long_batch_of_quick_checks_is_written_at_its_end() {
        // Together they take longer than the limit, none of them alone does (each leaves 35 ms
        // for a busy host's scheduling before it would count as slow).
        assert_eq!(
            order(&[Duration::ZERO, 15 * MS, 15 * MS, 15 * MS, 15 * MS, 15 * MS], 50 * MS).await,
            [
                "connection",
                "stream 0",
                "connection",
                "stream 1",
                "stream 2",
                "stream 3",
                "stream 4",
                "stream 5",
                "connection"
            ]
        );
    }

    #[tokio::test]
    async fn streams_accepted_as_their_connection_ends_still_run() {
        let log = Log::default();
        let streams = Streams::Batch(Arc::default());
        let conn_log = log.clone();
        let executor = streams.clone();
        // Accepts a stream and ends in the same poll.
        let (done, finished) = oneshot::channel();
        let mut done = Some(done);
        let conn = std::pin::pin!(std::future::poll_fn(move |_| {
            note(&conn_log, "connection");
            if let Some(done) = done.take() {
                executor.execute(async move {
                    let _ = done.send(());
                });
            }
            Poll::Ready(())
        }));
        drive(conn, &streams, SLOW).await;
        tokio::time::timeout(Duration::from_secs(5), finished).await.expect("the stream runs").unwrap();
        assert_eq!(*log.lock().unwrap(), ["connection"]);
    }

    /// Without TCP_NODELAY an answer waits for the ACK of the one before it, which Envoy sends
    /// with its next check: 3.6x the p99 at 1 000 req/s (docs/benchmarks.md).
    #[tokio::test]
    async fn accepted_tcp_connections_send_without_nagle_delay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (accepted, client) = tokio::join!(Listen::accept(&listener), client);
        let (accepted, _client) = (accepted.unwrap(), client.unwrap());
        assert!(accepted.nodelay().unwrap());
    }

    #[tokio::test]
    async fn one_worker_batches_streams() {
        assert!(one_worker());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn more_workers_spawn_every_stream_so_they_can_share_a_connection() {
        assert!(!one_worker());
        let log = Log::default();
        let streams = Streams::Spawn;
        let conn = std::pin::pin!(connection(Vec::new(), streams.clone(), log.clone()));
        drive(conn, &streams, SLOW).await;
        let (done, finished) = oneshot::channel();
        streams.execute(async move {
            let _ = done.send(tokio::runtime::Handle::current().metrics().num_alive_tasks());
        });
        // Ran as a task of its own: alive while it runs.
        assert!(tokio::time::timeout(Duration::from_secs(5), finished).await.unwrap().unwrap() >= 1);
    }
}
