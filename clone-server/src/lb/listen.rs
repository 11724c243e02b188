//! `kscope lb --listen`: the balancer's workers behind its front end ([`super::front`]).
//!
//! The pool is the balancer's own worker list: the front end picks among the workers whose
//! address is known (join-the-shortest-queue on the same in-flight counters), and books every
//! request the way the generated stream does, so the controller ([`super::control`]) scales
//! the clones on the p90 latency and queue that outside clients cause. A worker that the front
//! end finds unreachable [`EVICT_AFTER`] attempts in a row (stopped or deleted behind the
//! balancer's back) is dropped and deleted; the controller brings the pool back to its minimum.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use hyper::Method;

use super::front::{self, FrontStats};
use super::tcp::Target;
use super::{LbOptions, ScaleEvent, Shared, Source, Worker};

/// Attempts in a row that found a worker unreachable after which the balancer drops it from
/// the pool and asks the service to delete it; the controller then replaces it if the pool is
/// below its minimum.
pub const EVICT_AFTER: usize = 3;

/// Errors of the listening mode.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// The parent VM has no network, so its clones have no address to forward to.
    #[error("parent {0} has no network namespace: give `--parent` a VM created with \"network\": true, or let `kscope lb --listen` create the parent")]
    NoNetwork(String),
    /// A worker's address could not be looked up.
    #[error("address of worker {id}: {msg} (is the service still running?)")]
    Address {
        /// The worker.
        id: String,
        /// The error.
        msg: String,
    },
    /// The parent could not be looked up.
    #[error("looking up the parent {id}: {msg} (is the service still running?)")]
    Parent {
        /// The parent.
        id: String,
        /// The error.
        msg: String,
    },
    /// The front end could not start.
    #[error(transparent)]
    Front(#[from] front::FrontError),
    /// Not a listening run.
    #[error("internal: the front end was started without `Source::Listen`")]
    NotListening,
}

impl front::Upstream for Worker {
    fn name(&self) -> &str {
        &self.id
    }
    fn in_flight(&self) -> &AtomicUsize {
        &self.in_flight
    }
    fn target(&self) -> Option<Arc<Target>> {
        self.target.get().cloned()
    }
}

impl front::Pool for Shared {
    type Worker = Worker;
    fn workers(&self) -> Vec<Arc<Worker>> {
        self.workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    fn started(&self, _w: &Worker) {
        self.sent.fetch_add(1, Ordering::Relaxed);
    }
    fn finished(&self, w: &Worker, arrived: Instant, outcome: Result<u32, String>) {
        self.record(
            w,
            arrived.saturating_duration_since(self.start),
            outcome.map(|s| (s, 0)),
        );
    }
    fn unreachable(&self, w: &Worker) {
        let n = w.unreachable.fetch_add(1, Ordering::Relaxed) + 1;
        if n < EVICT_AFTER {
            return;
        }
        let before = {
            let mut ws = self.workers.lock().unwrap_or_else(|p| p.into_inner());
            let before = ws.len();
            ws.retain(|x| x.id != w.id);
            if ws.len() == before {
                return; // already dropped by another request
            }
            before
        };
        super::control::retire(self, w);
        tracing::warn!("worker {} unreachable {n} times in a row: dropped", w.id);
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(ScaleEvent {
                t_s: self.start.elapsed().as_secs_f64(),
                kind: "unreachable",
                reason: format!(
                    "worker {} unreachable {n} times in a row: dropped and deleted",
                    w.id
                ),
                workers_before: before,
                delta: -1,
                api_ms: 0.0,
            });
        let (api, id) = (self.api.clone(), w.id.clone());
        tokio::spawn(async move {
            if let Err(e) = api
                .json(Method::DELETE, &format!("/v1/vms/{id}"), None)
                .await
            {
                tracing::debug!("deleting unreachable worker {id}: {e}");
            }
        });
    }
}

/// Look up the addresses of `ws` (workers without one get no requests until they have it).
pub(super) async fn resolve(sh: &Shared, ws: &[Arc<Worker>]) -> Result<(), ListenError> {
    for w in ws {
        w.target(&sh.api)
            .await
            .map_err(|msg| ListenError::Address {
                id: w.id.clone(),
                msg,
            })?;
    }
    Ok(())
}

/// Run the front end for the listening period; returns its counters.
pub(super) async fn serve(
    sh: &Arc<Shared>,
    o: &LbOptions,
    parent: &str,
) -> anyhow::Result<FrontStats> {
    let Source::Listen {
        addr,
        duration,
        stop,
    } = &o.source
    else {
        return Err(ListenError::NotListening.into());
    };
    let v = sh
        .api
        .json(Method::GET, &format!("/v1/vms/{parent}"), None)
        .await
        .map_err(|e| ListenError::Parent {
            id: parent.to_string(),
            msg: e.to_string(),
        })?;
    let netns = v["netns"]
        .as_str()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ListenError::NoNetwork(parent.to_string()))?
        .to_string();
    let ws = sh.workers.lock().unwrap_or_else(|p| p.into_inner()).clone();
    resolve(sh, &ws).await?;
    let h = front::start(&netns, *addr, sh.clone(), o.front.clone()).await?;
    eprintln!(
        "kscope lb: front end listening on http://{} in namespace {netns} with {} workers (e.g. `sudo ip netns exec {netns} wrk http://{}/`)",
        h.addr(),
        ws.len(),
        h.addr()
    );
    let until = async {
        match duration {
            Some(d) => tokio::time::sleep(*d).await,
            None => std::future::pending().await,
        }
    };
    let notified = async {
        match stop {
            Some(n) => n.notified().await,
            None => std::future::pending().await,
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = until => {}
        _ = notified => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(h.stop().await)
}
