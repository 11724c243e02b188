//! `kscope bench net`: the web workload over real TCP (wrk inside kscope's network namespace)
//! beside the request-device path in the same run, the time from a clone call to the clone's
//! first TCP answer at its own address, wrk against N clones at once, wrk against the load
//! balancer's front end with N clones behind it ([`FrontEnd`], given by the CLI, which owns the
//! balancer), and the tap pool.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use kscope_guest::abi::request::kind;
use kscope_vmm::net::{NetAttach, Network, PoolStats, BRIDGE_IP};
use kscope_vmm::{CloneOptions, MemoryMode, Vm, VmConfig};
use kscope_workloads::Workload;
use serde::Serialize;

use crate::runner::{cmdline, image, kernel, BOOT_TIMEOUT, REQUEST_TIMEOUT};
use kscope_vmm::summary::LatencySummary;

/// What to measure.
#[derive(Debug, Clone)]
pub struct NetBenchConfig {
    /// Lazy clones measured (one clone call each) and then loaded together.
    pub clones: usize,
    /// Length of every load phase.
    pub duration: Duration,
    /// Concurrent connections (wrk) and concurrent requesters (request device).
    pub connections: usize,
    /// Guest RAM.
    pub mem_bytes: u64,
    /// Clones behind the balancer's front end (0: no balancer phase).
    pub lb_workers: usize,
    /// The balancer's front end (needed when `lb_workers > 0`).
    pub front: Option<Arc<dyn FrontEnd>>,
}

/// Port of the balancer's front end, on the bridge's address inside the namespace.
pub const LB_PORT: u16 = 8080;

/// A load balancer front end that forwards HTTP/1.1 requests to workers' own addresses.
/// The CLI gives `kscope lb`'s ([`NetBenchConfig::front`]); the engine only measures it.
pub trait FrontEnd: Send + Sync {
    /// Listen at `listen` inside namespace `netns` and forward to `workers`.
    fn start(
        &self,
        netns: &str,
        listen: SocketAddr,
        workers: &[SocketAddr],
    ) -> anyhow::Result<Box<dyn RunningFront>>;
}

impl std::fmt::Debug for dyn FrontEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FrontEnd")
    }
}

/// A started front end.
pub trait RunningFront: Send {
    /// What it did so far.
    fn counts(&self) -> FrontCounts;
    /// Stop it and return what it did.
    fn stop(self: Box<Self>) -> anyhow::Result<FrontCounts>;
}

/// What a front end did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FrontCounts {
    /// Requests each worker answered (in the order of the workers given).
    pub per_worker: Vec<u64>,
    /// Requests retried on a second worker.
    pub retried: u64,
    /// Requests the front end answered 502/503 itself.
    pub bad_gateway: u64,
}

/// wrk against the balancer's front end with clones behind it.
#[derive(Debug, Clone, Serialize)]
pub struct LbResult {
    /// Clones behind the front end.
    pub workers: usize,
    /// wrk's figures.
    pub wrk: WrkResult,
    /// Requests/s relative to wrk against the single VM of the same run.
    pub ratio_to_vm: f64,
    /// The front end's counters (measured phase only).
    pub front: FrontCounts,
}

/// One wrk run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WrkResult {
    /// Target.
    pub url: String,
    /// Requests per second.
    pub rps: f64,
    /// Median latency (us).
    pub p50_us: f64,
    /// 99th percentile latency (us).
    pub p99_us: f64,
    /// Socket errors and non-2xx answers reported by wrk.
    pub errors: u64,
}

/// The report.
#[derive(Debug, Clone, Serialize)]
pub struct NetBenchReport {
    /// wrk against the parent over TCP.
    pub tcp: WrkResult,
    /// The request-device path, same VM, same run, same concurrency (requests/s).
    pub request_device_rps: f64,
    /// Its latency.
    pub request_device_latency: LatencySummary,
    /// Per clone: the clone call (ms).
    pub clone_call_ms: Vec<f64>,
    /// Per clone: from the start of the clone call to the first TCP answer at the clone's
    /// own address (ms).
    pub clone_first_answer_ms: Vec<f64>,
    /// wrk against each clone, all at once.
    pub clones_tcp: Vec<WrkResult>,
    /// Sum of the clones' requests/s.
    pub clones_total_rps: f64,
    /// wrk against the balancer's front end with `lb_workers` clones behind it.
    pub lb: Option<LbResult>,
    /// Tap pool at the end.
    pub pool: PoolStats,
}

fn parse_latency(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mult) = if let Some(v) = s.strip_suffix("us") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1e3)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1e6)
    } else {
        (s, 1.0)
    };
    num.trim().parse::<f64>().ok().map(|v| v * mult)
}

/// Parse wrk's `--latency` output.
pub fn parse_wrk(url: &str, out: &str) -> anyhow::Result<WrkResult> {
    let mut r = WrkResult {
        url: url.into(),
        ..Default::default()
    };
    for line in out.lines() {
        let l = line.trim();
        if let Some(v) = l.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().context("wrk Requests/sec")?;
        } else if let Some(v) = l.strip_prefix("50%") {
            r.p50_us = parse_latency(v).unwrap_or(0.0);
        } else if let Some(v) = l.strip_prefix("99%") {
            r.p99_us = parse_latency(v).unwrap_or(0.0);
        } else if let Some(v) = l.strip_prefix("Non-2xx or 3xx responses:") {
            r.errors += v.trim().parse::<u64>().unwrap_or(0);
        } else if let Some(v) = l.strip_prefix("Socket errors:") {
            r.errors += v
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    if r.rps == 0.0 {
        bail!("wrk reported no requests/s:\n{out}");
    }
    Ok(r)
}

/// Run wrk inside namespace `ns` against `url`.
fn wrk(ns: &str, url: &str, connections: usize, d: Duration) -> anyhow::Result<WrkResult> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "wrk", "-t1"])
        .arg(format!("-c{connections}"))
        .arg(format!("-d{}s", d.as_secs().max(1)))
        .args(["--timeout", "10s", "--latency", url])
        .output()
        .context("running wrk (Debian package `wrk`) inside the namespace")?;
    if !out.status.success() {
        bail!(
            "wrk failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_wrk(url, &String::from_utf8_lossy(&out.stdout))
}

/// One `GET /kscope/id` at `ip`; true if the VM answered as `ip`.
fn answers_as(net: &Network, ip: Ipv4Addr) -> bool {
    let Ok(mut s) = net.connect(SocketAddr::from((ip, 80)), Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET /kscope/id HTTP/1.1\r\nHost: x\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let mut tmp = [0u8; 1024];
    while let Ok(n) = s.read(&mut tmp) {
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&tmp[..n]);
        if String::from_utf8_lossy(&buf).contains('\n') && buf.ends_with(b"\n") {
            break;
        }
    }
    String::from_utf8_lossy(&buf).contains(&format!("ip={ip} "))
}

/// Wait until the clone at `ip` answers `GET /kscope/id` as itself.
fn wait_answers(net: &Network, ip: Ipv4Addr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !answers_as(net, ip) {
        if Instant::now() > deadline {
            bail!("clone {ip} did not answer within 30 s");
        }
    }
    Ok(())
}

/// `n` lazy clones of `vm` (one clone call) behind the front end; wrk through it.
fn lb_phase(
    cfg: &NetBenchConfig,
    net: &Network,
    vm: &Vm,
    path: &str,
    vm_rps: f64,
) -> anyhow::Result<LbResult> {
    let front = cfg.front.as_ref().context(
        "the balancer phase needs the front end: run it through `kscope bench net --lb-workers N`",
    )?;
    let b = vm.clone_children(
        cfg.lb_workers,
        &CloneOptions {
            memory: MemoryMode::Lazy,
            ..Default::default()
        },
    )?;
    let mut addrs = Vec::new();
    for c in &b.children {
        let ip = c.net_address().context("clone without address")?;
        wait_answers(net, ip)?;
        addrs.push(SocketAddr::from((ip, 80)));
    }
    let listen = SocketAddr::from((BRIDGE_IP, LB_PORT));
    let url = format!("http://{listen}{path}");
    // Warm the clones and the front end's worker connections, then measure.
    let h = front.start(net.netns(), listen, &addrs)?;
    let measured = wrk(net.netns(), &url, cfg.connections, Duration::from_secs(1)).and_then(|_| {
        let before = h.counts();
        wrk(net.netns(), &url, cfg.connections, cfg.duration).map(|r| (before, r))
    });
    let after = h.stop()?;
    let (before, r) = measured?;
    let front = FrontCounts {
        per_worker: after
            .per_worker
            .iter()
            .zip(before.per_worker.iter().chain(std::iter::repeat(&0)))
            .map(|(a, b)| a.saturating_sub(*b))
            .collect(),
        retried: after.retried.saturating_sub(before.retried),
        bad_gateway: after.bad_gateway.saturating_sub(before.bad_gateway),
    };
    Ok(LbResult {
        workers: addrs.len(),
        ratio_to_vm: r.rps / vm_rps.max(1e-9),
        wrk: r,
        front,
    })
}

/// Run the benchmark.
pub fn run(cfg: &NetBenchConfig) -> anyhow::Result<NetBenchReport> {
    let net = Network::get().map_err(|e| anyhow::anyhow!("guest networking: {e}"))?;
    let w = Workload::Web;
    let id = net.boot_identity("bench-net");
    let vm = Vm::boot(VmConfig {
        name: "bench-net".into(),
        mem_bytes: cfg.mem_bytes,
        vcpus: 1,
        kernel: kernel(),
        cmdline: cmdline(w),
        disk: image(),
        guest_mode: kscope_vmm::GuestMode::process_default(),
        net: Some(NetAttach::new(net.clone(), &id)?),
    })?;
    vm.wait_ready(BOOT_TIMEOUT)?;
    let ip = vm.net_address().context("no address")?;
    // One page of the mix, the same for both paths (wrk requests one URL).
    let req = w.requests(7, 1).remove(0);
    let path = String::from_utf8_lossy(&req)
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_string();
    // Warm both paths.
    for _ in 0..20 {
        let r = vm.request(kind::WORKLOAD, &req, REQUEST_TIMEOUT)?;
        w.check(&req, &r.payload)
            .map_err(|e| anyhow::anyhow!("request-device answer: {e}"))?;
    }
    let url = format!("http://{ip}{path}");
    // Warm the TCP path too (socket buffers, the server's connection state), then measure.
    wrk(net.netns(), &url, cfg.connections, Duration::from_secs(1))?;
    let tcp = wrk(net.netns(), &url, cfg.connections, cfg.duration)?;

    // The request device, same VM, same concurrency.
    let stop = Arc::new(AtomicBool::new(false));
    let vm = Arc::new(vm);
    let t0 = Instant::now();
    let threads: Vec<_> = (0..cfg.connections)
        .map(|_| {
            let (vm, stop, req) = (vm.clone(), stop.clone(), req.clone());
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    if vm.request(kind::WORKLOAD, &req, REQUEST_TIMEOUT).is_err() {
                        break;
                    }
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    std::thread::sleep(cfg.duration);
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for t in threads {
        lat.extend(t.join().unwrap_or_default());
    }
    let request_device_rps = lat.len() as f64 / t0.elapsed().as_secs_f64();

    // Clones: one call each, then poll the clone's own address.
    let mut clone_call_ms = Vec::new();
    let mut clone_first_answer_ms = Vec::new();
    let mut clones = Vec::new();
    for _ in 0..cfg.clones {
        let t = Instant::now();
        let b = vm.clone_children(
            1,
            &CloneOptions {
                memory: MemoryMode::Lazy,
                ..Default::default()
            },
        )?;
        clone_call_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let c = b.children.into_iter().next().context("no clone")?;
        let cip = c.net_address().context("clone without address")?;
        wait_answers(&net, cip)?;
        clone_first_answer_ms.push(t.elapsed().as_secs_f64() * 1e3);
        clones.push(c);
    }
    let clones_tcp: Vec<WrkResult> = std::thread::scope(|s| {
        let hs: Vec<_> = clones
            .iter()
            .map(|c| {
                let url = format!("http://{}{path}", c.net_address().unwrap_or(ip));
                let ns = net.netns().to_string();
                s.spawn(move || wrk(&ns, &url, cfg.connections, cfg.duration))
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("wrk thread"))?)
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    let clones_total_rps = clones_tcp.iter().map(|r| r.rps).sum();
    // The clones measured alone step aside (their CPU would be shared with the balancer's).
    drop(clones);
    let lb = if cfg.lb_workers > 0 {
        Some(lb_phase(cfg, &net, &vm, &path, tcp.rps)?)
    } else {
        None
    };
    Ok(NetBenchReport {
        tcp,
        request_device_rps,
        request_device_latency: LatencySummary::of(&lat),
        clone_call_ms,
        clone_first_answer_ms,
        clones_tcp,
        clones_total_rps,
        lb,
        pool: net.pool_stats(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_output() {
        let out = "Running 5s test @ http://10.0.255.2/x\n  1 threads and 4 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency     1.20ms  300.00us   5.00ms   90.00%\n  Latency Distribution\n     50%    1.10ms\n     75%    1.30ms\n     90%    1.60ms\n     99%    2.50ms\n  4000 requests in 5.00s, 1.00MB read\n  Socket errors: connect 0, read 1, write 0, timeout 2\nRequests/sec:    800.00\nTransfer/sec:    200.00KB\n";
        let r = parse_wrk("u", out).unwrap();
        assert_eq!(r.rps, 800.0);
        assert_eq!(r.p50_us, 1100.0);
        assert_eq!(r.p99_us, 2500.0);
        assert_eq!(r.errors, 3);
        assert!(parse_wrk("u", "garbage").is_err());
    }
}
