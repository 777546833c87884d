//! `grpc.health.v1.Health` on the gRPC listener (SPEC §4): SERVING for `""` and
//! `envoy.service.auth.v3.Authorization` once ready, NOT_SERVING before and while shutting down.
//!
//! tonic-health's reporter serves the same answers, but its `Watch` streams never end: at
//! shutdown they told the watcher NOT_SERVING and then stayed open, and because the drain waits
//! for every stream in flight, one watching client (a mesh's health checker, a `grpc-health-probe
//! -watch`) held the process for the whole grace period. Here a `Watch` ends, with an OK status,
//! once it has sent NOT_SERVING for the shutdown; checks in flight are what the drain waits for.

use std::pin::Pin;

use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use super::AUTHZ_SERVICE;

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
        (HealthState(tx), HealthServer::new(HealthService { phase: rx }))
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

/// The `grpc.health.v1.Health` service.
#[derive(Debug)]
pub struct HealthService {
    phase: watch::Receiver<Phase>,
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
        let known = known(&request.get_ref().service);
        let mut phase = self.phase.clone();
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
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
        let service = HealthService { phase: state.0.subscribe() };
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
        let service = HealthService { phase: state.0.subscribe() };
        let mut watch = service.watch(request(AUTHZ_SERVICE)).await.unwrap().into_inner();
        assert_eq!(next(&mut watch).await, Some(ServingStatus::NotServing));
        state.set_ready(true);
        assert_eq!(next(&mut watch).await, Some(ServingStatus::Serving));
        state.stop();
        assert_eq!(next(&mut watch).await, Some(ServingStatus::NotServing));
        assert_eq!(next(&mut watch).await, None, "the stream ends after NOT_SERVING");
    }

    #[tokio::test]
    async fn a_watch_of_an_unknown_service_says_so_and_stays_open_until_shutdown() {
        let (state, _server) = HealthState::new();
        let service = HealthService { phase: state.0.subscribe() };
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
