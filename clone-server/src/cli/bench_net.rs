//! `kscope bench net`: arguments, the balancer's front end given to the engine
//! ([`kscope_bench::net::FrontEnd`], the same code as `kscope lb --listen`), and printing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use kscope_bench::net::{FrontCounts, FrontEnd, NetBenchConfig, RunningFront};

use crate::lb::front::{self, FixedPool, FrontHandle, FrontOptions};

/// Arguments of `kscope bench net`.
#[derive(Args, Debug)]
pub struct NetArgs {
    /// Lazy clones (each cloned and timed alone, then loaded together).
    #[arg(long, default_value_t = 2)]
    pub clones: usize,
    /// Seconds of every load phase.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Concurrent connections (and request-device requesters).
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 64)]
    pub mem_mib: u64,
    /// Also run wrk against the load balancer's front end (`kscope lb --listen`'s) with this
    /// many lazy clones behind it (0: skip that phase).
    #[arg(long, default_value_t = 0)]
    pub lb_workers: usize,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The balancer's front end over a fixed list of clones, on its own async runtime.
struct LbFront;

struct Running {
    rt: tokio::runtime::Runtime,
    handle: FrontHandle,
    pool: Arc<FixedPool>,
}

impl FrontEnd for LbFront {
    fn start(
        &self,
        netns: &str,
        listen: SocketAddr,
        workers: &[SocketAddr],
    ) -> anyhow::Result<Box<dyn RunningFront>> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the front end's async runtime")?;
        let pool = Arc::new(FixedPool::new(netns, workers));
        let handle = rt.block_on(front::start(
            netns,
            listen,
            pool.clone(),
            FrontOptions::default(),
        ))?;
        Ok(Box::new(Running { rt, handle, pool }))
    }
}

fn counts(pool: &FixedPool, s: &front::FrontStats) -> FrontCounts {
    FrontCounts {
        per_worker: pool.counts().iter().map(|c| c.answered).collect(),
        retried: s.retried,
        bad_gateway: s.bad_gateway,
    }
}

impl RunningFront for Running {
    fn counts(&self) -> FrontCounts {
        counts(&self.pool, &self.handle.stats())
    }

    fn stop(self: Box<Self>) -> anyhow::Result<FrontCounts> {
        let Running { rt, handle, pool } = *self;
        let stats = rt.block_on(handle.stop());
        rt.shutdown_timeout(Duration::from_secs(1));
        Ok(counts(&pool, &stats))
    }
}

/// Run `kscope bench net`.
pub fn net(a: NetArgs) -> anyhow::Result<()> {
    let r = kscope_bench::net::run(&NetBenchConfig {
        clones: a.clones,
        duration: Duration::from_secs(a.seconds),
        connections: a.connections,
        mem_bytes: a.mem_mib << 20,
        lb_workers: a.lb_workers,
        front: Some(Arc::new(LbFront)),
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "web over TCP (wrk, {} connections): {:.0} req/s, p50 {:.0} us, p99 {:.0} us, {} errors",
        a.connections, r.tcp.rps, r.tcp.p50_us, r.tcp.p99_us, r.tcp.errors
    );
    println!(
        "web over the request device (same VM, same run): {:.0} req/s, p50 {:.0} us, p99 {:.0} us; TCP/device = {:.2}",
        r.request_device_rps,
        r.request_device_latency.p50_us,
        r.request_device_latency.p99_us,
        r.tcp.rps / r.request_device_rps.max(1e-9)
    );
    for (i, (c, f)) in r
        .clone_call_ms
        .iter()
        .zip(&r.clone_first_answer_ms)
        .enumerate()
    {
        println!("clone {i}: clone call {c:.1} ms, first TCP answer at its own address {f:.1} ms after the call");
    }
    println!(
        "{} clones under wrk at once: {:.0} req/s in total ({:?})",
        r.clones_tcp.len(),
        r.clones_total_rps,
        r.clones_tcp
            .iter()
            .map(|w| w.rps.round())
            .collect::<Vec<_>>()
    );
    if let Some(lb) = &r.lb {
        println!(
            "{} clones behind the balancer's front end (wrk, {} connections): {:.0} req/s, p50 {:.0} us, p99 {:.0} us, {} errors; balancer/VM = {:.2}; answers per clone {:?}, {} retried, {} answered 502/503 by the front end",
            lb.workers,
            a.connections,
            lb.wrk.rps,
            lb.wrk.p50_us,
            lb.wrk.p99_us,
            lb.wrk.errors,
            lb.ratio_to_vm,
            lb.front.per_worker,
            lb.front.retried,
            lb.front.bad_gateway
        );
    }
    println!(
        "tap pool: {} hits, {} misses, {} ready",
        r.pool.hits, r.pool.misses, r.pool.ready
    );
    Ok(())
}
