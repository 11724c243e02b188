//! `kscope lb`: an elastic load balancer driving the kscope API over HTTP.
//!
//! It replays a request stream ([`load`]) against a pool of workers — clones of one warm
//! parent VM — dispatching each request to the worker with the fewest requests in flight
//! (join-the-shortest-queue). A controller watches the p90 latency of the last window and the
//! mean queue per worker; when either is above its threshold it asks the API for more clones,
//! and it deletes workers idle for the cool-down. If the service cannot clone (HTTP 501) and
//! the scale mode is `auto`, it scales by booting fresh parents instead and says so.

pub mod client;
pub mod load;
pub mod tcp;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use hyper::{Method, StatusCode};
use kscope_workloads::Workload;
use serde::Serialize;
use serde_json::json;

use client::{ApiClient, ClientError};
use kscope_vmm::summary::LatencySummary;
use load::{Arrival, Pattern};

/// How the balancer adds workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleMode {
    /// Clones of the warm parent.
    Clone,
    /// Fresh parents booted from the image.
    Boot,
    /// Clones, or fresh parents if the service cannot clone.
    Auto,
}

/// Where the requests come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Generated arrivals of the workload's request mix.
    Generate {
        /// Arrival pattern.
        pattern: Pattern,
        /// Mean rate at factor 1 (requests/s).
        rate: f64,
        /// Length of the run.
        duration: Duration,
        /// Seed of arrivals and request mix.
        seed: u64,
    },
    /// A file of `time_ms request` lines.
    File(PathBuf),
}

/// Options of `kscope lb`.
#[derive(Debug, Clone)]
pub struct LbOptions {
    /// API base URL.
    pub api: String,
    /// Bearer token.
    pub token: String,
    /// Workload of the parent.
    pub workload: Workload,
    /// Guest RAM of the parent (e.g. "64M").
    pub memory: String,
    /// Use this existing VM as the warm parent instead of creating one.
    pub parent: Option<String>,
    /// Request stream.
    pub source: Source,
    /// Workers kept at least.
    pub min_workers: usize,
    /// Workers at most.
    pub max_workers: usize,
    /// Scale up when the p90 latency of the last window exceeds this.
    pub p90_target: Duration,
    /// Scale up when the mean number of requests in flight per worker exceeds this.
    pub max_queue: f64,
    /// Delete a worker idle for this long.
    pub cooldown: Duration,
    /// Controller period and latency window.
    pub window: Duration,
    /// How workers are added.
    pub scale: ScaleMode,
    /// Clone memory mode.
    pub memory_mode: String,
    /// Clone prefetch policy.
    pub prefetch: String,
    /// Delete the workers (and a parent it created) at the end.
    pub cleanup: bool,
    /// Send requests over TCP to the workers' addresses ([`tcp`]) instead of the API.
    pub tcp: bool,
}

impl Default for LbOptions {
    fn default() -> Self {
        LbOptions {
            api: format!("http://{}", crate::server::DEFAULT_LISTEN),
            token: String::new(),
            workload: Workload::Web,
            memory: "64M".into(),
            parent: None,
            source: Source::Generate {
                pattern: Pattern::OnOff {
                    on: Duration::from_secs(2),
                    off: Duration::from_secs(3),
                    low: 0.1,
                },
                rate: 200.0,
                duration: Duration::from_secs(20),
                seed: 1,
            },
            min_workers: 1,
            max_workers: 8,
            p90_target: Duration::from_millis(20),
            max_queue: 2.0,
            cooldown: Duration::from_secs(3),
            window: Duration::from_millis(500),
            scale: ScaleMode::Auto,
            memory_mode: "lazy".into(),
            prefetch: "lazy".into(),
            cleanup: true,
            tcp: false,
        }
    }
}

/// One window of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Interval {
    /// End of the window since the start (s).
    pub t_s: f64,
    /// Requests that arrived.
    pub arrived: usize,
    /// Requests completed.
    pub completed: usize,
    /// Latency of the completed ones (from arrival, so queueing included).
    pub latency: LatencySummary,
    /// Workers at the end of the window.
    pub workers: usize,
    /// Requests in flight at the end of the window.
    pub in_flight: usize,
}

/// A scaling decision.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleEvent {
    /// When (s since start).
    pub t_s: f64,
    /// `overload` (workers added) or `idle` (a worker deleted).
    pub kind: &'static str,
    /// Why.
    pub reason: String,
    /// Workers before.
    pub workers_before: usize,
    /// Workers added (negative: removed).
    pub delta: i64,
    /// Duration of the API call(s) (ms).
    pub api_ms: f64,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct LbReport {
    /// The parent VM.
    pub parent: String,
    /// How workers were added.
    pub scale_mode: ScaleMode,
    /// Requests sent.
    pub requests: usize,
    /// Requests answered with guest status 0.
    pub ok: usize,
    /// Requests answered with another guest status.
    pub guest_errors: usize,
    /// Requests that failed at the API.
    pub failed: usize,
    /// Latency of every answered request (arrival to answer).
    pub latency: LatencySummary,
    /// Achieved throughput (answered / run time).
    pub throughput_rps: f64,
    /// Most workers at once.
    pub max_workers: usize,
    /// Windows over time.
    pub timeline: Vec<Interval>,
    /// Scaling decisions.
    pub events: Vec<ScaleEvent>,
    /// Latency of successful scale-up calls (ms).
    pub scale_latency: LatencySummary,
    /// First API errors seen (at most 10).
    pub errors: Vec<String>,
}

struct Worker {
    id: String,
    in_flight: AtomicUsize,
    last_done: Mutex<Instant>,
    /// Its HTTP endpoint (TCP mode), looked up from the API at first use.
    target: tokio::sync::OnceCell<Arc<tcp::Target>>,
}

impl Worker {
    async fn target(&self, api: &ApiClient) -> Result<Arc<tcp::Target>, String> {
        self.target
            .get_or_try_init(|| async {
                let v = api
                    .json(Method::GET, &format!("/v1/vms/{}", self.id), None)
                    .await
                    .map_err(|e| e.to_string())?;
                let ip: std::net::Ipv4Addr = v["address"]
                    .as_str()
                    .and_then(|a| a.parse().ok())
                    .ok_or_else(|| tcp::TcpError::NoAddress(self.id.clone()).to_string())?;
                let netns = v["netns"].as_str().unwrap_or_default().to_string();
                Ok(Arc::new(tcp::Target::new(
                    netns,
                    std::net::SocketAddr::from((ip, 80)),
                )))
            })
            .await
            .cloned()
    }
}

struct Done {
    arrived: Duration,
    finished: Duration,
    outcome: Result<u32, String>,
}

struct Shared {
    api: ApiClient,
    workers: Mutex<Vec<Arc<Worker>>>,
    done: Mutex<Vec<Done>>,
    sent: AtomicUsize,
    start: Instant,
    scaling: AtomicBool,
    mode: Mutex<ScaleMode>,
    events: Mutex<Vec<ScaleEvent>>,
}

impl Shared {
    fn pick(&self) -> Option<Arc<Worker>> {
        let ws = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        ws.iter()
            .min_by_key(|w| w.in_flight.load(Ordering::Relaxed))
            .cloned()
    }
}

/// Boot a fresh parent VM; returns its id.
async fn create_parent(api: &ApiClient, o: &LbOptions) -> Result<String, ClientError> {
    let v = api
        .json(
            Method::POST,
            "/v1/vms",
            Some(&json!({ "workload": o.workload.name(), "memory": o.memory, "network": o.tcp })),
        )
        .await?;
    Ok(v["id"].as_str().unwrap_or_default().to_string())
}

/// Add `n` workers per the scale mode; returns their ids.
async fn add_workers(
    api: &ApiClient,
    mode_cell: &Mutex<ScaleMode>,
    o: &LbOptions,
    parent: &str,
    n: usize,
) -> Result<Vec<String>, ClientError> {
    let mode = *mode_cell.lock().unwrap_or_else(|p| p.into_inner());
    if mode != ScaleMode::Boot {
        let body = json!({ "n": n, "memory_mode": o.memory_mode, "prefetch": o.prefetch });
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

fn push_workers(sh: &Shared, ids: Vec<String>) {
    let now = Instant::now();
    let mut ws = sh.workers.lock().unwrap_or_else(|p| p.into_inner());
    ws.extend(ids.into_iter().map(|id| {
        Arc::new(Worker {
            id,
            in_flight: AtomicUsize::new(0),
            last_done: Mutex::new(now),
            target: tokio::sync::OnceCell::new(),
        })
    }));
}

/// One controller step: scale up on overload, scale down one idle worker.
fn control(sh: &Arc<Shared>, o: &Arc<LbOptions>, parent: &Arc<str>, since: Duration) {
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
    if (over_latency || over_queue) && ws.len() < o.max_workers {
        if sh.scaling.swap(true, Ordering::AcqRel) {
            return;
        }
        let add = ws.len().div_ceil(2).clamp(1, o.max_workers - ws.len());
        let reason = format!(
            "p90 {:.1} ms (target {:.1} ms), {per_worker:.1} requests in flight per worker (max {})",
            p90 / 1e3,
            o.p90_target.as_secs_f64() * 1e3,
            o.max_queue
        );
        let (sh, o, parent) = (sh.clone(), o.clone(), parent.clone());
        let before = ws.len();
        tokio::spawn(async move {
            let t0 = Instant::now();
            let res = add_workers(&sh.api, &sh.mode, &o, &parent, add).await;
            let api_ms = t0.elapsed().as_secs_f64() * 1e3;
            let delta = match res {
                Ok(ids) => {
                    let n = ids.len() as i64;
                    push_workers(&sh, ids);
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
                    kind: "overload",
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

/// Run the load balancer: set up the parent and the initial workers, replay the stream,
/// scale, and report.
pub async fn run_lb(opts: LbOptions) -> anyhow::Result<LbReport> {
    anyhow::ensure!(
        opts.min_workers >= 1 && opts.max_workers >= opts.min_workers,
        "need 1 <= --min-workers <= --max-workers"
    );
    let arrivals: Vec<Arrival> = match &opts.source {
        Source::Generate {
            pattern,
            rate,
            duration,
            seed,
        } => {
            let mix = opts.workload.requests(*seed, 512);
            load::generate(pattern, *rate, *duration, *seed, &mix)?
        }
        Source::File(p) => load::parse_file(p)?,
    };
    anyhow::ensure!(!arrivals.is_empty(), "the request stream is empty");
    let api = ApiClient::new(&opts.api, Some(opts.token.clone()));
    api.json(Method::GET, "/v1/health", None)
        .await
        .context("the API is not reachable")?;
    let created_parent = opts.parent.is_none();
    let parent: Arc<str> = match &opts.parent {
        Some(p) => Arc::from(p.as_str()),
        None => Arc::from(create_parent(&api, &opts).await?.as_str()),
    };
    // Initial pool. In boot mode the parent itself serves as the first worker.
    let mode = Mutex::new(opts.scale);
    let mut initial = add_workers(&api, &mode, &opts, &parent, opts.min_workers).await;
    if *mode.lock().unwrap_or_else(|p| p.into_inner()) == ScaleMode::Boot {
        if let Ok(ids) = &mut initial {
            if let Some(extra) = ids.pop() {
                let _ = api
                    .json(Method::DELETE, &format!("/v1/vms/{extra}"), None)
                    .await;
            }
            ids.insert(0, parent.to_string());
        }
    }
    let initial = initial.context("cannot create the initial workers")?;
    let opts = Arc::new(opts);
    let start = Instant::now();
    let sh = Arc::new(Shared {
        api,
        workers: Mutex::default(),
        done: Mutex::default(),
        sent: AtomicUsize::new(0),
        start,
        scaling: AtomicBool::new(false),
        mode,
        events: Mutex::default(),
    });
    push_workers(&sh, initial);

    // Controller.
    let ctl_stop = Arc::new(AtomicBool::new(false));
    let ctl = {
        let (sh, o, parent, stop) = (sh.clone(), opts.clone(), parent.clone(), ctl_stop.clone());
        tokio::spawn(async move {
            let mut timeline = Vec::new();
            let mut tick = tokio::time::interval(o.window);
            tick.tick().await;
            let mut last = Duration::ZERO;
            let mut last_sent = 0;
            while !stop.load(Ordering::Acquire) {
                tick.tick().await;
                let now = sh.start.elapsed();
                control(&sh, &o, &parent, last);
                let done = sh.done.lock().unwrap_or_else(|p| p.into_inner());
                let lat: Vec<Duration> = done
                    .iter()
                    .filter(|d| d.finished >= last && d.finished < now && d.outcome.is_ok())
                    .map(|d| d.finished - d.arrived)
                    .collect();
                let sent = sh.sent.load(Ordering::Relaxed);
                let arrived = sent - last_sent;
                last_sent = sent;
                drop(done);
                let ws = sh.workers.lock().unwrap_or_else(|p| p.into_inner()).clone();
                timeline.push(Interval {
                    t_s: now.as_secs_f64(),
                    arrived,
                    completed: lat.len(),
                    latency: LatencySummary::of(&lat),
                    workers: ws.len(),
                    in_flight: ws.iter().map(|w| w.in_flight.load(Ordering::Relaxed)).sum(),
                });
                last = now;
            }
            timeline
        })
    };

    // Dispatcher.
    let mut tasks = tokio::task::JoinSet::new();
    for a in arrivals {
        let due = start + a.at;
        tokio::time::sleep_until(due.into()).await;
        let Some(w) = sh.pick() else {
            anyhow::bail!("no workers left");
        };
        w.in_flight.fetch_add(1, Ordering::Relaxed);
        sh.sent.fetch_add(1, Ordering::Relaxed);
        let sh2 = sh.clone();
        let (tcp_mode, http) = (opts.tcp, opts.workload == Workload::Web);
        tasks.spawn(async move {
            let arrived = sh2.start.elapsed();
            let res = if tcp_mode {
                match w.target(&sh2.api).await {
                    Ok(t) => t
                        .request(&a.payload, http, Duration::from_secs(30))
                        .await
                        .map(|(s, b)| (s, 0u64, b))
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e),
                }
            } else {
                sh2.api
                    .request(&w.id, &a.payload)
                    .await
                    .map(|(s, l, b)| (s, l, b.to_vec()))
                    .map_err(|e| e.to_string())
            };
            w.in_flight.fetch_sub(1, Ordering::Relaxed);
            *w.last_done.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
            let finished = sh2.start.elapsed();
            sh2.done
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Done {
                    arrived,
                    finished,
                    outcome: res.map(|(s, _, _)| s),
                });
        });
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = start.elapsed();
    ctl_stop.store(true, Ordering::Release);
    let timeline = ctl.await.unwrap_or_default();
    while sh.scaling.load(Ordering::Acquire) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let done = std::mem::take(&mut *sh.done.lock().unwrap_or_else(|p| p.into_inner()));
    let lat: Vec<Duration> = done
        .iter()
        .filter(|d| d.outcome.is_ok())
        .map(|d| d.finished - d.arrived)
        .collect();
    let events = sh.events.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let scale_lat: Vec<Duration> = events
        .iter()
        .filter(|e| e.kind == "overload" && e.delta > 0)
        .map(|e| Duration::from_secs_f64(e.api_ms / 1e3))
        .collect();
    let report = LbReport {
        parent: parent.to_string(),
        scale_mode: *sh.mode.lock().unwrap_or_else(|p| p.into_inner()),
        requests: done.len(),
        ok: done.iter().filter(|d| matches!(d.outcome, Ok(0))).count(),
        guest_errors: done
            .iter()
            .filter(|d| matches!(d.outcome, Ok(s) if s != 0))
            .count(),
        failed: done.iter().filter(|d| d.outcome.is_err()).count(),
        throughput_rps: lat.len() as f64 / elapsed.as_secs_f64().max(1e-9),
        latency: LatencySummary::of(&lat),
        max_workers: timeline
            .iter()
            .map(|i| i.workers)
            .max()
            .unwrap_or(0)
            .max(opts.min_workers),
        timeline,
        scale_latency: LatencySummary::of(&scale_lat),
        errors: done
            .iter()
            .filter_map(|d| d.outcome.as_ref().err().cloned())
            .take(10)
            .collect(),
        events,
    };
    if opts.cleanup {
        let ws = std::mem::take(&mut *sh.workers.lock().unwrap_or_else(|p| p.into_inner()));
        for w in ws.iter().filter(|w| *w.id != *parent) {
            let _ = sh
                .api
                .json(Method::DELETE, &format!("/v1/vms/{}", w.id), None)
                .await;
        }
        if created_parent {
            let _ = sh
                .api
                .json(Method::DELETE, &format!("/v1/vms/{parent}"), None)
                .await;
        }
    }
    Ok(report)
}

impl std::fmt::Display for LbReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use kscope_vmm::summary::fmt_us;
        writeln!(
            f,
            "parent {}, scale mode {:?}: {} requests ({} ok, {} guest errors, {} failed), {:.0} req/s, max {} workers",
            self.parent, self.scale_mode, self.requests, self.ok, self.guest_errors, self.failed,
            self.throughput_rps, self.max_workers
        )?;
        writeln!(
            f,
            "latency p50 {} p90 {} p99 {} max {}",
            fmt_us(self.latency.p50_us),
            fmt_us(self.latency.p90_us),
            fmt_us(self.latency.p99_us),
            fmt_us(self.latency.max_us)
        )?;
        writeln!(
            f,
            "{:>7} {:>7} {:>7} {:>10} {:>10} {:>7} {:>8}",
            "t(s)", "arrived", "done", "p50", "p90", "workers", "inflight"
        )?;
        for i in &self.timeline {
            writeln!(
                f,
                "{:>7.1} {:>7} {:>7} {:>10} {:>10} {:>7} {:>8}",
                i.t_s,
                i.arrived,
                i.completed,
                fmt_us(i.latency.p50_us),
                fmt_us(i.latency.p90_us),
                i.workers,
                i.in_flight
            )?;
        }
        for e in &self.events {
            writeln!(
                f,
                "{:>7.1}s {}: {:+} workers (from {}) in {:.1} ms: {}",
                e.t_s, e.kind, e.delta, e.workers_before, e.api_ms, e.reason
            )?;
        }
        for e in &self.errors {
            writeln!(f, "error: {e}")?;
        }
        Ok(())
    }
}
