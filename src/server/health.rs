//! `grpc.health.v1.Health` on the gRPC listener (SPEC §4): SERVING for `""` and
//! `envoy.service.auth.v3.Authorization` once ready, NOT_SERVING before and while shutting down.
//!
//! tonic-health's reporter serves the same answers, but its `Watch` streams never end: at
//! shutdown they told the watcher NOT_SERVING and then stayed open, and because the drain waits
//! for every stream in flight, one watching client (a mesh's health checker, a `grpc-health-probe
//! -watch`) held the process for the whole grace period. Here a `Watch` ends, with an OK status,
//! once it has sent NOT_SERVING for the shutdown; checks in flight are what the drain waits for.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use super::AUTHZ_SERVICE;
use super::place::Place;

/// Where the process is, as health reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    NotReady,
    Ready,
    Stopping,
}

/// The services `Check` and `Watch` know: the server as a whole, and the authorization service.
fn known(service: &str) -> bool {
    service.is_empty() || service == AUTHZ_SERVICE
}

fn status_of(phase: Phase) -> ServingStatus {
    match phase {
        Phase::Ready => ServingStatus::Serving,
        Phase::NotReady | Phase::Stopping => ServingStatus::NotServing,
    }
}

/// The handle the server sets readiness and shutdown through.
#[derive(Debug, Clone)]
pub struct HealthState(watch::Sender<Phase>);

impl HealthState {
    /// The handle, and the service to route `grpc.health.v1.Health` to. Not ready at first.
    pub fn new() -> (HealthState, HealthServer<HealthService>) {
        let (tx, rx) = watch::channel(Phase::NotReady);
        (HealthState(tx), HealthServer::new(HealthService::new(rx)))
    }

    /// Ready or not; once stopping, it stays stopping.
    pub fn set_ready(&self, ready: bool) {
        let phase = if ready { Phase::Ready } else { Phase::NotReady };
        self.0.send_if_modified(|p| {
            let change = *p != Phase::Stopping && *p != phase;
            if change {
                *p = phase;
            }
            change
        });
    }

    /// Shutting down: NOT_SERVING for good, and every `Watch` ends after saying so.
    pub fn stop(&self) {
        self.0.send_replace(Phase::Stopping);
    }
}

/// `Watch` calls open at once, at most; one more is `RESOURCE_EXHAUSTED`. A watch stays open as
/// long as its client, and each holds a task, a channel and an HTTP/2 stream (a few KiB): a mesh's
/// health checker or a `grpc-health-probe -watch` needs one or two, and without a bound a client
/// that keeps opening them grows the process without end.
pub const MAX_WATCHES: usize = 256;

/// The `grpc.health.v1.Health` service.
#[derive(Debug)]
pub struct HealthService {
    phase: watch::Receiver<Phase>,
    /// `Watch` calls open now (bounded by [`MAX_WATCHES`]).
    watches: Arc<AtomicUsize>,
}

impl HealthService {
    fn new(phase: watch::Receiver<Phase>) -> Self {
        HealthService { phase, watches: Arc::new(AtomicUsize::new(0)) }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        if !known(&request.get_ref().service) {
            return Err(Status::not_found("unknown service"));
        }
        let status = status_of(*self.phase.borrow());
        Ok(Response::new(HealthCheckResponse { status: status.into() }))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<HealthCheckRequest>) -> Result<Response<WatchStream>, Status> {
        // Held by the watch's task, given back when it ends.
        let Some(place) = Place::take(self.watches.clone(), MAX_WATCHES) else {
            return Err(Status::resource_exhausted(format!("{MAX_WATCHES} health watches are open already")));
        };
        let known = known(&request.get_ref().service);
        let mut phase = self.phase.clone();
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            let _place = place;
            let mut last = None;
            loop {
                let now = *phase.borrow_and_update();
                // The protocol: an unknown service is SERVICE_UNKNOWN, and the call stays open
                // (the service may appear); until shutdown, here.
                let status = if known { status_of(now) } else { ServingStatus::ServiceUnknown };
                if last != Some(status) {
                    if tx.send(Ok(HealthCheckResponse { status: status.into() })).await.is_err() {
                        return;
                    }
                    last = Some(status);
                }
                if now == Phase::Stopping {
                    return;
                }
                tokio::select! {
                    changed = phase.changed() => if changed.is_err() { return },
                    // The watcher went away: nothing to keep this task for.
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;

    use super::*;

    fn request(service: &str) -> Request<HealthCheckRequest> {
        Request::new(HealthCheckRequest { service: service.to_string() })
    }

    async fn next(stream: &mut WatchStream) -> Option<ServingStatus> {
        let item = tokio::time::timeout(std::time::Duration::from_secs(5), stream.next())
            .await
            .expect("the watch stream neither sent nor ended");
        item.map(|r| ServingStatus::try_from(r.unwrap().status).unwrap())
    }

    #[tokio::test]
    async fn check_follows_readiness_and_refuses_unknown_services() {
        let (state, server) = HealthState::new();
        let service = HealthService::new(state.0.subscribe());
        drop(server);
        let status =
            |r: Response<HealthCheckResponse>| ServingStatus::try_from(r.into_inner().status).unwrap();
        assert_eq!(status(service.check(request("")).await.unwrap()), ServingStatus::NotServing);
        state.set_ready(true);
        for name in ["", AUTHZ_SERVICE] {
            assert_eq!(status(service.check(request(name)).await.unwrap()), ServingStatus::Serving);
        }
        assert_eq!(service.check(request("other")).await.unwrap_err().code(), tonic::Code::NotFound);
        state.stop();
        state.set_ready(true);
        assert_eq!(
            status(service.check(request("")).await.unwrap()),
            ServingStatus::NotServing,
            "stopping stays"
        );
    }

    #[tokio::test]
    async fn a_watch_follows_changes_and_ends_at_shutdown() {
        let (state, _server) = HealthState::new();
        let service = HealthService::new(state.0.subscribe());
        let mut watch = service.watch(request(AUTHZ_SERVICE)).await.unwrap().into_inner();
        assert_eq!(next(&mut watch).await, Some(ServingStatus::NotServing));
        state.set_ready(true);
        assert_eq!(next(&mut watch).await, Some(ServingStatus::Serving));
        state.stop();
        assert_eq!(next(&mut watch).await, Some(ServingStatus::NotServing));
        assert_eq!(next(&mut watch).await, None, "the stream ends after NOT_SERVING");
    }

    #[tokio::test]
    async fn watches_are_bounded_and_a_closed_one_gives_its_place_back() {
        let (state, _server) = HealthState::new();
        let service = HealthService::new(state.0.subscribe());
        let mut open = Vec::new();
        for _ in 0..MAX_WATCHES {
            let mut watch = service.watch(request("")).await.unwrap().into_inner();
            assert_eq!(next(&mut watch).await, Some(ServingStatus::NotServing));
            open.push(watch);
        }
        let refused = service.watch(request("")).await.err().expect("one watch past the bound");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        // The watcher goes away: its task sees the channel closed and gives the place back.
        drop(open.pop());
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut again = loop {
            match service.watch(request("")).await {
                Ok(watch) => break watch.into_inner(),
                Err(_) if tokio::time::Instant::now() < deadline => tokio::task::yield_now().await,
                Err(e) => panic!("the closed watch's place was never given back: {e:?}"),
            }
        };
        assert_eq!(next(&mut again).await, Some(ServingStatus::NotServing));
        // Checks are not watches: they are answered whatever the watches.
        assert!(service.check(request("")).await.is_ok());
    }

    #[tokio::test]
    async fn a_watch_of_an_unknown_service_says_so_and_stays_open_until_shutdown() {
        let (state, _server) = HealthState::new();
        let service = HealthService::new(state.0.subscribe());
        let mut watch = service.watch(request("other")).await.unwrap().into_inner();
        assert_eq!(next(&mut watch).await, Some(ServingStatus::ServiceUnknown));
        state.set_ready(true);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(100), watch.next()).await.is_err(),
            "nothing new to say about an unknown service"
        );
        state.stop();
        assert_eq!(next(&mut watch).await, None);
    }
}
