//! `kscope lb`: an elastic load balancer driving the kscope API over HTTP.
//!
//! It replays a request stream ([`load`]) against a pool of workers — clones of one warm
//! parent VM — dispatching each request to the worker with the fewest requests in flight
//! (join-the-shortest-queue). A controller watches the p90 latency of the last window and the
//! mean queue per worker; when either is above its threshold it asks the API for more clones,
//! and it deletes workers idle for the cool-down ([`control`]). If the service cannot clone
//! (HTTP 501) and the scale mode is `auto`, it scales by booting fresh parents instead and says
//! so. With [`Source::Listen`] the requests come from outside instead: an HTTP/1.1 front end
//! ([`front`]) inside the service's network namespace forwards each one to a worker's own TCP
//! address with the same choice, and the same controller scales the clones ([`listen`]).

pub mod client;
mod control;
pub mod front;
mod listen;
pub mod load;
pub mod tcp;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use hyper::Method;
use kscope_workloads::Workload;
use serde::Serialize;

use client::ApiClient;
use control::{
    add_workers, control, create_parent, needs_recording, push_workers, record, sample_workers,
};
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
    /// Arrivals built by the caller (e.g. `kscope experiment replay` from a load trace).
    Arrivals(Arc<Vec<Arrival>>),
    /// Requests from outside, received by the front end ([`front`]) at `addr` inside the
    /// service's network namespace, until `duration` has passed, `stop` is notified, or the
    /// process gets SIGINT or SIGTERM (whichever comes first).
    Listen {
        /// Address to listen on (e.g. the bridge's, `10.0.255.254:8080`).
        addr: SocketAddr,
        /// Stop after this long.
        duration: Option<Duration>,
        /// Stop when notified.
        stop: Option<Arc<tokio::sync::Notify>>,
    },
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
    /// For policies that replay a recorded working set (reap, faasnap, activeset, learned):
    /// the lazy clone that recorded it. None: the balancer records one itself before its
    /// first clone (a lazy clone of the parent serves a few requests of the workload's mix;
    /// deleted at the end with the workers).
    pub recording_from: Option<String>,
    /// Sample every worker's memory footprint each window (server usage accounting).
    pub account: bool,
    /// Send requests over TCP to the workers' addresses ([`tcp`]) instead of the API.
    pub tcp: bool,
    /// Settings of the front end ([`Source::Listen`]).
    pub front: front::FrontOptions,
}

impl LbOptions {
    /// Whether the workers need a network: TCP dispatch or the front end.
    pub fn needs_network(&self) -> bool {
        self.tcp || matches!(self.source, Source::Listen { .. })
    }
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
            recording_from: None,
            account: false,
            tcp: false,
            front: front::FrontOptions::default(),
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
    /// Requests that failed (API or guest error) in the window.
    pub failed: usize,
    /// Summed memory footprint of the workers (bytes; with `account`, else 0).
    pub memory_bytes: u64,
}

/// The life of one worker, for usage accounting and cost models.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerLog {
    /// VM id.
    pub id: String,
    /// In the initial pool (not added by a scale-out).
    pub initial: bool,
    /// Scale-out decision (s since start; 0 for the initial pool).
    pub decided_s: f64,
    /// Created and serving (s).
    pub ready_s: f64,
    /// First answer it sent (s).
    pub first_answer_s: Option<f64>,
    /// Removed (s), or the end of the run.
    pub removed_s: f64,
    /// Per window: (t_s, footprint bytes, requests completed in the window, in flight,
    /// summed in-VM service time of those requests in microseconds).
    pub samples: Vec<(f64, u64, usize, usize, u64)>,
}

/// A scaling decision.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleEvent {
    /// When (s since start).
    pub t_s: f64,
    /// `overload` (workers added), `minimum` (workers added back up to the minimum), `idle` (a
    /// worker deleted) or `unreachable` (the front end dropped a worker it could not reach).
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
    /// Every worker's life (with `account`: footprint samples).
    pub workers: Vec<WorkerLog>,
    /// The front end's counters ([`Source::Listen`] only).
    pub front: Option<front::FrontStats>,
}

struct Worker {
    id: String,
    in_flight: AtomicUsize,
    last_done: Mutex<Instant>,
    completed: AtomicUsize,
    vm_us: AtomicU64,
    log: Mutex<WorkerLog>,
    /// Attempts in a row that found it unreachable (front end; see [`listen::EVICT_AFTER`]).
    unreachable: AtomicUsize,
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
    retired: Mutex<Vec<WorkerLog>>,
}

impl Shared {
    /// Book one ended request of worker `w` (its in-flight count already lowered):
    /// `outcome` is (guest status, in-VM time in us) or the error.
    fn record(&self, w: &Worker, arrived: Duration, outcome: Result<(u32, u64), String>) {
        *w.last_done.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        let finished = self.start.elapsed();
        if outcome.is_ok() {
            w.unreachable.store(0, Ordering::Relaxed);
        }
        if let Ok((0, vm_us)) = &outcome {
            w.vm_us.fetch_add(*vm_us, Ordering::Relaxed);
            w.completed.fetch_add(1, Ordering::Relaxed);
            let mut log = w.log.lock().unwrap_or_else(|p| p.into_inner());
            log.first_answer_s.get_or_insert(finished.as_secs_f64());
        }
        self.done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Done {
                arrived,
                finished,
                outcome: outcome.map(|(s, _)| s),
            });
    }

    fn pick(&self) -> Option<Arc<Worker>> {
        let ws = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        ws.iter()
            .min_by_key(|w| w.in_flight.load(Ordering::Relaxed))
            .cloned()
    }
}

/// Run the load balancer: set up the parent and the initial workers, replay the stream,
/// scale, and report.
pub async fn run_lb(mut opts: LbOptions) -> anyhow::Result<LbReport> {
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
        Source::Arrivals(a) => a.as_ref().clone(),
        Source::Listen { .. } => Vec::new(),
    };
    let listening = matches!(opts.source, Source::Listen { .. });
    anyhow::ensure!(
        listening || !arrivals.is_empty(),
        "the request stream is empty"
    );
    let api = ApiClient::new(&opts.api, Some(opts.token.clone()));
    api.json(Method::GET, "/v1/health", None)
        .await
        .context("the API is not reachable")?;
    let created_parent = opts.parent.is_none();
    let parent: Arc<str> = match &opts.parent {
        Some(p) => Arc::from(p.as_str()),
        None => Arc::from(create_parent(&api, &opts).await?.as_str()),
    };
    // A recording for the clone policy, if it replays one and none was given.
    let mut recorder = None;
    if opts.scale != ScaleMode::Boot
        && opts.recording_from.is_none()
        && needs_recording(&opts.prefetch)
    {
        match record(&api, &opts, &parent).await {
            Ok(id) => {
                opts.recording_from = Some(id.clone());
                recorder = Some(id);
            }
            Err(e) => {
                if created_parent {
                    // Deleting the parent deletes the recording clone too.
                    let _ = api
                        .json(Method::DELETE, &format!("/v1/vms/{parent}"), None)
                        .await;
                }
                return Err(anyhow::Error::new(e).context(format!(
                    "recording a working set for prefetch {}",
                    opts.prefetch
                )));
            }
        }
    }
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
        retired: Mutex::default(),
    });
    push_workers(&sh, initial, None);

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
                let (lat, failed) = {
                    let done = sh.done.lock().unwrap_or_else(|p| p.into_inner());
                    let in_window = |d: &&Done| d.finished >= last && d.finished < now;
                    let lat: Vec<Duration> = done
                        .iter()
                        .filter(|d| in_window(d) && matches!(d.outcome, Ok(0)))
                        .map(|d| d.finished - d.arrived)
                        .collect();
                    let failed = done
                        .iter()
                        .filter(|d| in_window(d) && !matches!(d.outcome, Ok(0)))
                        .count();
                    (lat, failed)
                };
                let sent = sh.sent.load(Ordering::Relaxed);
                let arrived = sent - last_sent;
                last_sent = sent;
                let ws = sh.workers.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let memory_bytes = sample_workers(&sh, &ws, now.as_secs_f64(), o.account).await;
                timeline.push(Interval {
                    t_s: now.as_secs_f64(),
                    arrived,
                    completed: lat.len(),
                    latency: LatencySummary::of(&lat),
                    workers: ws.len(),
                    in_flight: ws.iter().map(|w| w.in_flight.load(Ordering::Relaxed)).sum(),
                    failed,
                    memory_bytes,
                });
                last = now;
            }
            timeline
        })
    };

    // Requests from outside: the front end, until the end of the listening period.
    let mut front_result = None;
    if listening {
        front_result = Some(listen::serve(&sh, &opts, &parent).await);
    }

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
            sh2.record(&w, arrived, res.map(|(s, l, _)| (s, l)));
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
    let mut workers = std::mem::take(&mut *sh.retired.lock().unwrap_or_else(|p| p.into_inner()));
    for w in sh.workers.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        let mut log = w.log.lock().unwrap_or_else(|p| p.into_inner()).clone();
        log.removed_s = elapsed.as_secs_f64();
        workers.push(log);
    }
    let scale_lat: Vec<Duration> = events
        .iter()
        .filter(|e| (e.kind == "overload" || e.kind == "minimum") && e.delta > 0)
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
        workers,
        front: front_result.as_ref().and_then(|r| r.as_ref().ok().cloned()),
    };
    if opts.cleanup {
        let ws = std::mem::take(&mut *sh.workers.lock().unwrap_or_else(|p| p.into_inner()));
        for w in ws.iter().filter(|w| *w.id != *parent) {
            let _ = sh
                .api
                .json(Method::DELETE, &format!("/v1/vms/{}", w.id), None)
                .await;
        }
        if let Some(r) = &recorder {
            let _ = sh
                .api
                .json(Method::DELETE, &format!("/v1/vms/{r}"), None)
                .await;
        }
        if created_parent {
            let _ = sh
                .api
                .json(Method::DELETE, &format!("/v1/vms/{parent}"), None)
                .await;
        }
    }
    if let Some(Err(e)) = front_result {
        return Err(e);
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
        if let Some(fe) = &self.front {
            writeln!(
                f,
                "front end: {} requests, {} answered by workers, {} retried on another worker, {} answered 502/503 by the front end",
                fe.requests, fe.answered, fe.retried, fe.bad_gateway
            )?;
        }
        for e in &self.errors {
            writeln!(f, "error: {e}")?;
        }
        Ok(())
    }
}
