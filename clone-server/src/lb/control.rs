//! The balancer's controller: creating the parent and workers through the API, the pool's
//! bookkeeping, and the periodic scaling step (scale up on the window's p90 latency or queue
//! per worker, delete a worker idle for the cool-down).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::json;

use super::client::{ApiClient, ClientError};
use super::{LbOptions, ScaleEvent, ScaleMode, Shared, Worker, WorkerLog};
use kscope_vmm::summary::LatencySummary;

/// Requests a recording clone serves ([`record`]).
pub(super) const RECORD_REQUESTS: usize = 64;

/// True if the clone policy `prefetch` replays a recorded working set (reap, faasnap,
/// activeset, learned); a spec that does not parse is left for the API to refuse.
pub(super) fn needs_recording(prefetch: &str) -> bool {
    prefetch
        .parse::<kscope_policies::PolicySpec>()
        .is_ok_and(|s| s.name.needs_recording())
}

/// Record a working set for policies that replay one: a lazy clone of `parent` (prefetch
/// `lazy`, so that its fault order is every page it touched) serves [`RECORD_REQUESTS`]
/// requests of the workload's mix, one after another; returns its id, for `recording_from`.
/// The clone is not a worker.
pub(super) async fn record(
    api: &ApiClient,
    o: &LbOptions,
    parent: &str,
) -> Result<String, ClientError> {
    let v = api
        .json(
            Method::POST,
            &format!("/v1/vms/{parent}/clones"),
            Some(&json!({ "n": 1, "memory_mode": "lazy", "prefetch": "lazy" })),
        )
        .await?;
    let id = v["clones"][0]["id"]
        .as_str()
        .ok_or_else(|| ClientError::Unexpected {
            path: format!("/v1/vms/{parent}/clones"),
            what: "no clone id in the answer".into(),
        })?
        .to_string();
    for req in o.workload.requests(0x5eed, RECORD_REQUESTS) {
        api.request(&id, &req).await?;
    }
    Ok(id)
}

/// Boot a fresh parent VM; returns its id.
pub(super) async fn create_parent(api: &ApiClient, o: &LbOptions) -> Result<String, ClientError> {
    let v = api
        .json(
            Method::POST,
            "/v1/vms",
            Some(&json!({ "workload": o.workload.name(), "memory": o.memory, "network": o.needs_network() })),
        )
        .await?;
    Ok(v["id"].as_str().unwrap_or_default().to_string())
}

/// Add `n` workers per the scale mode; returns their ids.
pub(super) async fn add_workers(
    api: &ApiClient,
    mode_cell: &Mutex<ScaleMode>,
    o: &LbOptions,
    parent: &str,
    n: usize,
) -> Result<Vec<String>, ClientError> {
    let mode = *mode_cell.lock().unwrap_or_else(|p| p.into_inner());
    if mode != ScaleMode::Boot {
        let mut body = json!({ "n": n, "memory_mode": o.memory_mode, "prefetch": o.prefetch });
        if let Some(r) = &o.recording_from {
            body["recording_from"] = json!(r);
        }
        match api
            .json(
                Method::POST,
                &format!("/v1/vms/{parent}/clones"),
                Some(&body),
            )
            .await
        {
            Ok(v) => {
                return Ok(v["clones"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|c| c["id"].as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default())
            }
            Err(ClientError::Api { status, .. })
                if status == StatusCode::NOT_IMPLEMENTED && mode == ScaleMode::Auto =>
            {
                tracing::warn!("the service cannot clone (501): scaling by booting parents");
                *mode_cell.lock().unwrap_or_else(|p| p.into_inner()) = ScaleMode::Boot;
            }
            Err(e) => return Err(e),
        }
    }
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(create_parent(api, o).await?);
    }
    Ok(ids)
}

/// Add workers `ids` to the pool; returns them.
pub(super) fn push_workers(
    sh: &Shared,
    ids: Vec<String>,
    decided: Option<Duration>,
) -> Vec<Arc<Worker>> {
    let now = Instant::now();
    let ready_s = now.saturating_duration_since(sh.start).as_secs_f64();
    let new: Vec<Arc<Worker>> = ids
        .into_iter()
        .map(|id| {
            Arc::new(Worker {
                log: Mutex::new(WorkerLog {
                    id: id.clone(),
                    initial: decided.is_none(),
                    decided_s: decided.map_or(0.0, |d| d.as_secs_f64()),
                    ready_s,
                    first_answer_s: None,
                    removed_s: 0.0,
                    samples: Vec::new(),
                }),
                id,
                in_flight: AtomicUsize::new(0),
                last_done: Mutex::new(now),
                completed: AtomicUsize::new(0),
                vm_us: AtomicU64::new(0),
                unreachable: AtomicUsize::new(0),
                target: tokio::sync::OnceCell::new(),
            })
        })
        .collect();
    sh.workers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .extend(new.iter().cloned());
    new
}

pub(super) fn retire(sh: &Shared, w: &Worker) {
    let mut log = w.log.lock().unwrap_or_else(|p| p.into_inner()).clone();
    log.removed_s = sh.start.elapsed().as_secs_f64();
    sh.retired
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(log);
}

/// Sample every worker's footprint (GET /v1/vms/{id}/stats) and completions; returns the sum
/// of the footprints.
pub(super) async fn sample_workers(
    sh: &Shared,
    ws: &[Arc<Worker>],
    t_s: f64,
    account: bool,
) -> u64 {
    let mut total = 0u64;
    for w in ws {
        let bytes = if account {
            match sh
                .api
                .json(Method::GET, &format!("/v1/vms/{}/stats", w.id), None)
                .await
            {
                Ok(v) => v["memory"]["footprint_bytes"].as_u64().unwrap_or(0),
                Err(e) => {
                    tracing::debug!("stats of {}: {e}", w.id);
                    0
                }
            }
        } else {
            0
        };
        total += bytes;
        let done = w.completed.swap(0, Ordering::Relaxed);
        let vm_us = w.vm_us.swap(0, Ordering::Relaxed);
        let inflight = w.in_flight.load(Ordering::Relaxed);
        w.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .samples
            .push((t_s, bytes, done, inflight, vm_us));
    }
    total
}

/// One controller step: scale up on overload or below the minimum (workers the front end
/// dropped as unreachable), scale down one idle worker.
pub(super) fn control(sh: &Arc<Shared>, o: &Arc<LbOptions>, parent: &Arc<str>, since: Duration) {
    let now = sh.start.elapsed();
    let recent: Vec<Duration> = sh
        .done
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|d| d.finished >= since && d.outcome.is_ok())
        .map(|d| d.finished - d.arrived)
        .collect();
    let p90 = LatencySummary::of(&recent).p90_us;
    let ws: Vec<Arc<Worker>> = sh.workers.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let queued: usize = ws.iter().map(|w| w.in_flight.load(Ordering::Relaxed)).sum();
    let per_worker = queued as f64 / ws.len().max(1) as f64;
    let over_latency = p90 > o.p90_target.as_secs_f64() * 1e6;
    let over_queue = per_worker > o.max_queue;
    let below_min = ws.len() < o.min_workers;
    if (below_min || over_latency || over_queue) && ws.len() < o.max_workers {
        if sh.scaling.swap(true, Ordering::AcqRel) {
            return;
        }
        let (kind, add, reason) = if below_min {
            (
                "minimum",
                o.min_workers - ws.len(),
                format!(
                    "{} workers, below the minimum of {}",
                    ws.len(),
                    o.min_workers
                ),
            )
        } else {
            (
                "overload",
                ws.len().div_ceil(2).clamp(1, o.max_workers - ws.len()),
                format!(
                    "p90 {:.1} ms (target {:.1} ms), {per_worker:.1} requests in flight per worker (max {})",
                    p90 / 1e3,
                    o.p90_target.as_secs_f64() * 1e3,
                    o.max_queue
                ),
            )
        };
        let (sh, o, parent) = (sh.clone(), o.clone(), parent.clone());
        let before = ws.len();
        tokio::spawn(async move {
            let t0 = Instant::now();
            let res = add_workers(&sh.api, &sh.mode, &o, &parent, add).await;
            let api_ms = t0.elapsed().as_secs_f64() * 1e3;
            let delta = match res {
                Ok(ids) => {
                    let n = ids.len() as i64;
                    let new = push_workers(&sh, ids, Some(now));
                    // The front end sends requests only to workers with a known address.
                    if matches!(o.source, super::Source::Listen { .. }) {
                        if let Err(e) = super::listen::resolve(&sh, &new).await {
                            tracing::warn!("new workers: {e}");
                        }
                    }
                    n
                }
                Err(e) => {
                    tracing::warn!("scale-up failed: {e}");
                    0
                }
            };
            sh.events
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(ScaleEvent {
                    t_s: now.as_secs_f64(),
                    kind,
                    reason,
                    workers_before: before,
                    delta,
                    api_ms,
                });
            sh.scaling.store(false, Ordering::Release);
        });
        return;
    }
    if ws.len() > o.min_workers.max(1) && !sh.scaling.load(Ordering::Acquire) {
        let idle = ws.iter().find(|w| {
            w.in_flight.load(Ordering::Relaxed) == 0
                && w.last_done
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .elapsed()
                    >= o.cooldown
                && *w.id != **parent
        });
        if let Some(w) = idle.cloned() {
            sh.workers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|x| x.id != w.id);
            retire(sh, &w);
            let sh = sh.clone();
            let before = ws.len();
            tokio::spawn(async move {
                let t0 = Instant::now();
                if let Err(e) = sh
                    .api
                    .json(Method::DELETE, &format!("/v1/vms/{}", w.id), None)
                    .await
                {
                    tracing::warn!("deleting idle worker {} failed: {e}", w.id);
                }
                sh.events
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(ScaleEvent {
                        t_s: now.as_secs_f64(),
                        kind: "idle",
                        reason: format!("worker {} idle for the cool-down", w.id),
                        workers_before: before,
                        delta: -1,
                        api_ms: t0.elapsed().as_secs_f64() * 1e3,
                    });
            });
        }
    }
}
