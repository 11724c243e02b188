//! The balancer's front end: an HTTP/1.1 listener (hyper, keep-alive) at an address inside
//! kscope's network namespace that forwards every request to a worker's own TCP address.
//!
//! The worker is chosen by join-the-shortest-queue (fewest requests in flight) among the
//! workers of a [`Pool`]: the clones of `kscope lb --listen` (whose controller scales them on
//! the measured p90 and queue) or a fixed list ([`FixedPool`], used by `kscope bench net`).
//! Worker connections are kept alive ([`tcp::Target::forward`]). The worker's answer goes
//! back unchanged (status, headers, body; only hop-by-hop headers are dropped). A worker that
//! fails before answering (refused, closed, or silent for the upstream timeout) gets the
//! request retried once on another worker; if that fails too, or no other worker exists, the
//! client gets 502 with a body that names the workers and their errors (any method is retried:
//! the workloads' requests have no side effects that a second worker could repeat harmfully). A worker that could
//! not be reached or timed out is skipped for [`FrontOptions::down_for`]. No client waits
//! longer than two upstream timeouts.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::{HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::sync::watch;

use super::tcp::Target;

/// Errors of the front end.
#[derive(Debug, thiserror::Error)]
pub enum FrontError {
    /// The listening socket could not be made.
    #[error("cannot listen on {addr} in namespace {netns}: {msg} (use an address of the namespace, e.g. its bridge {bridge}, and a free port)", bridge = kscope_vmm::net::BRIDGE_IP)]
    Listen {
        /// Address.
        addr: SocketAddr,
        /// Namespace.
        netns: String,
        /// Error.
        msg: String,
    },
}

/// One worker behind the front end.
pub trait Upstream: Send + Sync + 'static {
    /// Its name (VM id or address), for errors and statistics.
    fn name(&self) -> &str;
    /// Requests in flight on it (join-the-shortest-queue).
    fn in_flight(&self) -> &AtomicUsize;
    /// Its HTTP endpoint, once known.
    fn target(&self) -> Option<Arc<Target>>;
}

/// The workers the front end chooses from, and what it tells their owner.
pub trait Pool: Send + Sync + 'static {
    /// The worker type.
    type Worker: Upstream;
    /// The current workers.
    fn workers(&self) -> Vec<Arc<Self::Worker>>;
    /// A request was sent to `w` (its in-flight count is already raised).
    fn started(&self, w: &Self::Worker);
    /// A request sent to `w` at `arrived` ended: the worker's answer (its `X-Kscope-Status`,
    /// 0 without one) or the error. Called once per attempt.
    fn finished(&self, w: &Self::Worker, arrived: Instant, outcome: Result<u32, String>);
    /// An attempt found `w` unreachable (no connection, or no answer within the upstream
    /// timeout); called after [`Pool::finished`].
    fn unreachable(&self, _w: &Self::Worker) {}
}

/// Settings of the front end.
#[derive(Debug, Clone)]
pub struct FrontOptions {
    /// One attempt at a worker (waiting for a connection slot, connecting, the exchange).
    pub upstream_timeout: Duration,
    /// How long a worker that could not be reached or timed out is skipped.
    pub down_for: Duration,
    /// Largest request body accepted (413 above).
    pub max_body: usize,
    /// A client connection that does not complete a request's headers within this time (an
    /// idle keep-alive connection included) is closed.
    pub header_timeout: Duration,
}

impl Default for FrontOptions {
    fn default() -> Self {
        FrontOptions {
            upstream_timeout: Duration::from_secs(5),
            down_for: Duration::from_secs(2),
            max_body: 1 << 20,
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// Counters of the front end.
#[derive(Debug, Default, Serialize, Clone)]
pub struct FrontStats {
    /// Requests received.
    pub requests: u64,
    /// Requests answered with a worker's answer.
    pub answered: u64,
    /// Requests retried on a second worker.
    pub retried: u64,
    /// Requests answered 502 or 503 by the front end.
    pub bad_gateway: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    answered: AtomicU64,
    retried: AtomicU64,
    bad_gateway: AtomicU64,
}

struct Front<P: Pool> {
    pool: Arc<P>,
    opts: FrontOptions,
    /// Workers skipped until the instant (by name).
    down: Mutex<HashMap<String, Instant>>,
    /// Rotates the order in which equal queues are considered (ties go round-robin).
    turn: AtomicUsize,
    counters: Counters,
}

/// A running front end.
pub struct FrontHandle {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    counters: Arc<dyn Fn() -> FrontStats + Send + Sync>,
}

impl FrontHandle {
    /// The address it listens on (inside the namespace).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its counters so far.
    pub fn stats(&self) -> FrontStats {
        (self.counters)()
    }

    /// Stop accepting, let open connections finish their request, and return the counters.
    pub async fn stop(self) -> FrontStats {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        (self.counters)()
    }
}

/// Listen on `listen` inside namespace `netns` and forward to the workers of `pool`.
pub async fn start<P: Pool>(
    netns: &str,
    listen: SocketAddr,
    pool: Arc<P>,
    opts: FrontOptions,
) -> Result<FrontHandle, FrontError> {
    let err = |msg: String| FrontError::Listen {
        addr: listen,
        netns: netns.to_string(),
        msg,
    };
    let ns = netns.to_string();
    let std = tokio::task::spawn_blocking(move || {
        kscope_vmm::net::run_in_netns(&ns, || std::net::TcpListener::bind(listen))
    })
    .await
    .map_err(|e| err(e.to_string()))?
    .map_err(|e| err(e.to_string()))?
    .map_err(|e| err(e.to_string()))?;
    std.set_nonblocking(true).map_err(|e| err(e.to_string()))?;
    let addr = std.local_addr().map_err(|e| err(e.to_string()))?;
    let listener = tokio::net::TcpListener::from_std(std).map_err(|e| err(e.to_string()))?;
    let front = Arc::new(Front {
        pool,
        opts,
        down: Mutex::default(),
        turn: AtomicUsize::new(0),
        counters: Counters::default(),
    });
    let (stop, mut stopped) = watch::channel(false);
    let f = front.clone();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = stopped.changed() => break,
                r = listener.accept() => match r {
                    Ok((s, _)) => {
                        let _ = s.set_nodelay(true);
                        conns.spawn(serve_conn(f.clone(), s, stopped.clone()));
                    }
                    Err(e) => {
                        tracing::warn!("front end accept on {addr}: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        drop(listener);
        // Open connections finish the request they carry, within a bound.
        let _ = tokio::time::timeout(front_drain(&f.opts), async {
            while conns.join_next().await.is_some() {}
        })
        .await;
        conns.abort_all();
    });
    let c = front.clone();
    Ok(FrontHandle {
        addr,
        stop,
        task,
        counters: Arc::new(move || c.stats()),
    })
}

fn front_drain(o: &FrontOptions) -> Duration {
    o.upstream_timeout * 2 + Duration::from_secs(1)
}

async fn serve_conn<P: Pool>(
    front: Arc<Front<P>>,
    stream: tokio::net::TcpStream,
    mut stopped: watch::Receiver<bool>,
) {
    let header_timeout = front.opts.header_timeout;
    let svc = hyper::service::service_fn(move |req| front.clone().handle(req));
    // The worker's answer goes out as it came: header names in its case, no added Date.
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .preserve_header_case(true)
        .auto_date_header(false)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!("front end connection: {e}");
            }
        }
        _ = stopped.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.as_mut().await;
        }
    }
}

/// One request counted in flight on a worker until dropped: also when the client goes away
/// mid-request and hyper drops the request's future.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        InFlight(n)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Headers that belong to one connection, not to the message (RFC 9110 section 7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (k, v) in from {
        if !HOP_BY_HOP.contains(&k.as_str()) && k != "upgrade" {
            to.append(k.clone(), v.clone());
        }
    }
}

/// The request for a worker: the client's method, path and query, headers (minus hop-by-hop)
/// and the whole body with its length (the body was read so that a retry can resend it).
fn upstream_request(parts: &hyper::http::request::Parts, body: &Bytes) -> Request<Full<Bytes>> {
    let mut r = Request::new(Full::new(body.clone()));
    *r.method_mut() = parts.method.clone();
    *r.uri_mut() = parts
        .uri
        .path_and_query()
        .cloned()
        .map(hyper::Uri::from)
        .unwrap_or_else(|| hyper::Uri::from_static("/"));
    copy_headers(&parts.headers, r.headers_mut());
    let had_length = r
        .headers_mut()
        .remove(hyper::header::CONTENT_LENGTH)
        .is_some();
    if had_length || !body.is_empty() {
        r.headers_mut()
            .insert(hyper::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    r
}

/// A plain-text answer of the front end itself.
fn plain(status: StatusCode, msg: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(msg + "\n")));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r.headers_mut().insert(
        HeaderName::from_static("x-kscope-lb"),
        HeaderValue::from_static("front-end"),
    );
    r
}

impl<P: Pool> Front<P> {
    fn stats(&self) -> FrontStats {
        let c = &self.counters;
        FrontStats {
            requests: c.requests.load(Ordering::Relaxed),
            answered: c.answered.load(Ordering::Relaxed),
            retried: c.retried.load(Ordering::Relaxed),
            bad_gateway: c.bad_gateway.load(Ordering::Relaxed),
        }
    }

    /// Join-the-shortest-queue among the workers with an address, other than `skip`,
    /// preferring those not marked down (a down worker is tried only if no other is left);
    /// equal queues are served in turn.
    fn pick(&self, skip: Option<&str>) -> Option<(Arc<P::Worker>, Arc<Target>)> {
        let now = Instant::now();
        let down = {
            let mut d = self.down.lock().unwrap_or_else(|p| p.into_inner());
            d.retain(|_, until| *until > now);
            d.clone()
        };
        let mut ws = self.pool.workers();
        if !ws.is_empty() {
            let k = self.turn.fetch_add(1, Ordering::Relaxed) % ws.len();
            ws.rotate_left(k);
        }
        ws.into_iter()
            .filter(|w| Some(w.name()) != skip)
            .filter_map(|w| w.target().map(|t| (w, t)))
            .min_by_key(|(w, _)| {
                (
                    down.contains_key(w.name()),
                    w.in_flight().load(Ordering::Relaxed),
                )
            })
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let arrived = Instant::now();
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let (parts, body) = req.into_parts();
        let body = match Limited::new(body, self.opts.max_body).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                self.counters.bad_gateway.fetch_add(1, Ordering::Relaxed);
                return Ok(plain(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "kscope lb: cannot read the request body ({e}); bodies are limited to {} bytes",
                        self.opts.max_body
                    ),
                ));
            }
        };
        let mut failures: Vec<String> = Vec::new();
        let mut skip: Option<String> = None;
        for attempt in 0..2 {
            let Some((w, target)) = self.pick(skip.as_deref()) else {
                break;
            };
            if attempt == 1 {
                self.counters.retried.fetch_add(1, Ordering::Relaxed);
            }
            let guard = InFlight::new(w.in_flight());
            self.pool.started(&w);
            let res = target
                .forward(upstream_request(&parts, &body), self.opts.upstream_timeout)
                .await;
            drop(guard);
            match res {
                Ok(resp) => {
                    let status = resp
                        .headers()
                        .get("x-kscope-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    self.pool.finished(&w, arrived, Ok(status));
                    self.counters.answered.fetch_add(1, Ordering::Relaxed);
                    self.down
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(w.name());
                    // Status, headers (and hyper's record of their case), body; minus the
                    // hop-by-hop headers of the worker connection.
                    let (mut rp, rb) = resp.into_parts();
                    let mut headers = HeaderMap::new();
                    copy_headers(&rp.headers, &mut headers);
                    rp.headers = headers;
                    return Ok(Response::from_parts(rp, Full::new(rb)));
                }
                Err(e) => {
                    if e.worker_down() {
                        self.down
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(w.name().to_string(), Instant::now() + self.opts.down_for);
                    }
                    tracing::debug!("worker {} failed: {e}", w.name());
                    self.pool.finished(&w, arrived, Err(e.to_string()));
                    if e.worker_down() {
                        self.pool.unreachable(&w);
                    }
                    failures.push(format!("worker {}: {e}", w.name()));
                    skip = Some(w.name().to_string());
                }
            }
        }
        self.counters.bad_gateway.fetch_add(1, Ordering::Relaxed);
        Ok(if failures.is_empty() {
            plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "kscope lb: no worker with a network address is ready yet; retry shortly (workers need a network: the parent must be created with one)".into(),
            )
        } else {
            plain(
                StatusCode::BAD_GATEWAY,
                format!(
                    "kscope lb: the request failed on {} worker(s) and was not answered: {}",
                    failures.len(),
                    failures.join("; ")
                ),
            )
        })
    }
}

/// A fixed list of workers at known addresses (no controller): `kscope bench net` and tests.
#[derive(Debug)]
pub struct FixedPool {
    workers: Vec<Arc<FixedWorker>>,
}

/// One worker of a [`FixedPool`].
#[derive(Debug)]
pub struct FixedWorker {
    name: String,
    target: Arc<Target>,
    in_flight: AtomicUsize,
    answered: AtomicU64,
    failed: AtomicU64,
}

/// What one worker of a [`FixedPool`] did.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerCount {
    /// Its address.
    pub addr: SocketAddr,
    /// Requests it answered.
    pub answered: u64,
    /// Attempts that failed on it.
    pub failed: u64,
}

impl FixedPool {
    /// Workers at `addrs` inside namespace `netns`.
    pub fn new(netns: &str, addrs: &[SocketAddr]) -> FixedPool {
        FixedPool {
            workers: addrs
                .iter()
                .map(|a| {
                    Arc::new(FixedWorker {
                        name: a.to_string(),
                        target: Arc::new(Target::new(netns.to_string(), *a)),
                        in_flight: AtomicUsize::new(0),
                        answered: AtomicU64::new(0),
                        failed: AtomicU64::new(0),
                    })
                })
                .collect(),
        }
    }

    /// Per worker: answers and failed attempts so far.
    pub fn counts(&self) -> Vec<WorkerCount> {
        self.workers
            .iter()
            .map(|w| WorkerCount {
                addr: w.target.addr,
                answered: w.answered.load(Ordering::Relaxed),
                failed: w.failed.load(Ordering::Relaxed),
            })
            .collect()
    }
}

impl Upstream for FixedWorker {
    fn name(&self) -> &str {
        &self.name
    }
    fn in_flight(&self) -> &AtomicUsize {
        &self.in_flight
    }
    fn target(&self) -> Option<Arc<Target>> {
        Some(self.target.clone())
    }
}

impl Pool for FixedPool {
    type Worker = FixedWorker;
    fn workers(&self) -> Vec<Arc<FixedWorker>> {
        self.workers.clone()
    }
    fn started(&self, _w: &FixedWorker) {}
    fn finished(&self, w: &FixedWorker, _arrived: Instant, outcome: Result<u32, String>) {
        match outcome {
            Ok(_) => w.answered.fetch_add(1, Ordering::Relaxed),
            Err(_) => w.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worker_gets_the_request_without_hop_by_hop_headers() {
        let req = Request::builder()
            .method("POST")
            .uri("http://10.0.255.254:8080/bank/login?x=1")
            .header("Host", "10.0.255.254:8080")
            .header("Connection", "keep-alive")
            .header("Transfer-Encoding", "chunked")
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let body = Bytes::from_static(b"user=7&pin=1234");
        let up = upstream_request(&parts, &body);
        assert_eq!(up.method(), "POST");
        assert_eq!(up.uri(), "/bank/login?x=1");
        let h = up.headers();
        assert_eq!(h["host"], "10.0.255.254:8080");
        assert_eq!(h["content-type"], "application/x-www-form-urlencoded");
        assert_eq!(h["content-length"], "15");
        assert!(h.get("connection").is_none() && h.get("transfer-encoding").is_none());

        let (parts, ()) = Request::get("/index.html").body(()).unwrap().into_parts();
        let up = upstream_request(&parts, &Bytes::new());
        assert_eq!(up.uri(), "/index.html");
        assert!(up.headers().get("content-length").is_none());
    }

    #[test]
    fn the_front_ends_own_answers_say_so() {
        let r = plain(StatusCode::BAD_GATEWAY, "kscope lb: x".into());
        assert_eq!(r.status(), 502);
        assert_eq!(r.headers()["x-kscope-lb"], "front-end");
        assert_eq!(r.headers()["content-type"], "text/plain");
    }
}
