//! `kscope serve` and `kscope lb`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::lb::{self, load::Pattern, LbOptions, ScaleMode, Source};
use crate::server::{self, Limits, ServeOptions};
use kscope_bench::runner;

/// Arguments of `kscope serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on (loopback by default: expose it deliberately).
    #[arg(long, default_value = server::DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Bearer token (default: read from, or created in, the token file).
    #[arg(long, env = "KSCOPE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Token file (default `<state-dir>/token`, created with mode 0600).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// State directory (token, snapshots).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Most parent VMs at once.
    #[arg(long, default_value_t = Limits::default().max_vms)]
    pub max_vms: usize,
    /// Most clones at once.
    #[arg(long, default_value_t = Limits::default().max_clones)]
    pub max_clones: usize,
    /// Most guest memory of all VMs together (e.g. 8G).
    #[arg(long, default_value = "8G", value_parser = kscope_vmm::summary::parse_size)]
    pub max_guest_mem: u64,
    /// Overcommit ratio of lazy clones: each is charged 1/RATIO of its size against
    /// --max-guest-mem (or its real footprint once that is larger); 1 charges the full size.
    #[arg(long, default_value_t = 1.0, value_parser = overcommit_arg)]
    pub overcommit: f64,
    /// Guest memory of a VM created without one.
    #[arg(long, default_value = "64M", value_parser = super::mem_arg)]
    pub default_mem: u64,
    /// Pre-created VM shells kept ready for lazy clones (KVM VM, memory slot, vCPU, empty
    /// userfaultfd memory), for the size of the most recent parent; refilled in the background
    /// after each clone. Each shell holds 4 open files and a little kernel memory (no guest
    /// memory; see docs/BENCHMARKS.md section 10). A clone call that finds the pool empty
    /// makes its own (slower). 0 disables the pool.
    #[arg(long, default_value_t = 8)]
    pub pool: usize,
}

/// Run `kscope serve` until SIGTERM/SIGINT.
pub fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let opts = ServeOptions {
        listen: a.listen,
        token: a.token,
        token_file: a.token_file,
        state_dir: a.state_dir,
        limits: Limits {
            max_vms: a.max_vms,
            max_clones: a.max_clones,
            max_guest_mem: a.max_guest_mem,
            overcommit: a.overcommit,
        },
        default_mem: a.default_mem,
        pool: a.pool,
        ..ServeOptions::default()
    };
    tokio_runtime()?.block_on(server::serve(opts))
}

fn overcommit_arg(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && (1.0..=1000.0).contains(&r) => Ok(r),
        _ => Err(format!(
            "overcommit {s:?}: give a ratio from 1 to 1000, e.g. 8"
        )),
    }
}

/// Arguments of `kscope lb`.
#[derive(Args, Debug)]
pub struct LbArgs {
    /// Base URL of a running `kscope serve`.
    #[arg(long, default_value = concat!("http://", "127.0.0.1:8470"))]
    pub api: String,
    /// Bearer token (default: the service's token file).
    #[arg(long, env = "KSCOPE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Token file to read when no token is given.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Workload of the warm parent.
    #[arg(long, short, default_value = "web")]
    pub workload: String,
    /// Guest memory of the parent.
    #[arg(long, default_value = "64M")]
    pub mem: String,
    /// Arrival pattern: steady, onoff[:on_ms,off_ms,low] or diurnal[:period_ms,burst_every_ms,burst_ms,factor].
    #[arg(long, default_value = "onoff:2000,3000,0.1")]
    pub pattern: String,
    /// Mean arrival rate at factor 1 (requests/s).
    #[arg(long, default_value_t = 150.0)]
    pub rate: f64,
    /// Length of the run in seconds (default 20; with --listen: until Ctrl-C or SIGTERM).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Replay a file of `time_ms request` lines instead of generating load.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Fewest and most workers.
    #[arg(long, default_value_t = 1)]
    pub min_workers: usize,
    /// Most workers.
    #[arg(long, default_value_t = 8)]
    pub max_workers: usize,
    /// Scale up when the window's p90 latency exceeds this many milliseconds.
    #[arg(long, default_value_t = 20.0)]
    pub p90_ms: f64,
    /// Clone memory mode (lazy or eager).
    #[arg(long, default_value = "lazy")]
    pub memory: String,
    /// Clone prefetch policy. For those that replay a recorded working set (reap, faasnap,
    /// activeset, learned) the balancer records one first: a lazy clone of the parent serves
    /// 64 requests of the workload's mix.
    #[arg(long, default_value = "lazy")]
    pub prefetch: String,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Send real TCP connections (HTTP/1.1, keep-alive) to the workers' own addresses in the
    /// service's network namespace instead of the API's request device path (the parent is
    /// created with a network; needs the same machine and root, like the service).
    #[arg(long)]
    pub tcp: bool,
    /// Serve requests from outside instead of generating them: an HTTP/1.1 front end (keep-alive)
    /// listens at ADDR:PORT inside the service's network namespace, or at the bridge's address
    /// (10.0.255.254) when only PORT is given, and forwards every request to a worker's own
    /// address (join-the-shortest-queue); the controller scales the clones on the p90 and queue.
    #[arg(long, value_name = "[ADDR:]PORT", value_parser = listen_arg)]
    pub listen: Option<std::net::SocketAddr>,
    /// With --listen: seconds one attempt at a worker may take before the request is retried
    /// on another worker (or answered 502).
    #[arg(long, default_value_t = 5.0)]
    pub upstream_timeout: f64,
}

fn listen_arg(s: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok((kscope_vmm::net::BRIDGE_IP, port).into());
    }
    s.parse().map_err(|_| {
        format!("--listen {s:?}: give a port (e.g. 8080) or an address inside the namespace with a port (e.g. 10.0.255.254:8080)")
    })
}

/// Run `kscope lb` against a running service.
pub fn lb(a: LbArgs) -> anyhow::Result<()> {
    let token = match a.token {
        Some(t) => t,
        None => {
            let path = match a.token_file.clone() {
                Some(p) => p,
                None => server::default_state_dir()?.join("token"),
            };
            server::auth::read_token(&path).with_context(|| {
                format!(
                    "reading the service token from {}: pass --token or --token-file",
                    path.display()
                )
            })?
        }
    };
    anyhow::ensure!(
        a.upstream_timeout.is_finite() && a.upstream_timeout > 0.0,
        "--upstream-timeout must be a positive number of seconds"
    );
    let source = match (a.listen, a.file) {
        (Some(_), Some(_)) => anyhow::bail!("--listen and --file exclude each other: the requests come either from outside or from the file"),
        (Some(addr), None) => Source::Listen {
            addr,
            duration: a.duration.map(Duration::from_secs_f64),
            stop: None,
        },
        (None, Some(f)) => Source::File(f),
        (None, None) => Source::Generate {
            pattern: Pattern::parse(&a.pattern).map_err(|e| anyhow::anyhow!("--pattern: {e}"))?,
            rate: a.rate,
            duration: Duration::from_secs_f64(a.duration.unwrap_or(20.0)),
            seed: 1,
        },
    };
    let opts = LbOptions {
        api: a.api,
        token,
        workload: runner::parse_workload(&a.workload)?,
        memory: a.mem,
        source,
        min_workers: a.min_workers,
        max_workers: a.max_workers,
        p90_target: Duration::from_secs_f64(a.p90_ms / 1e3),
        scale: ScaleMode::Auto,
        memory_mode: a.memory,
        prefetch: a.prefetch,
        tcp: a.tcp,
        front: lb::front::FrontOptions {
            upstream_timeout: Duration::from_secs_f64(a.upstream_timeout),
            ..Default::default()
        },
        ..LbOptions::default()
    };
    let report = tokio_runtime()?.block_on(lb::run_lb(opts))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{report}");
    }
    Ok(())
}

fn tokio_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

#[cfg(test)]
mod tests {
    use super::listen_arg;

    #[test]
    fn listen_takes_a_port_or_an_address() {
        assert_eq!(
            listen_arg("8080").unwrap(),
            "10.0.255.254:8080".parse().unwrap()
        );
        assert_eq!(
            listen_arg("10.0.255.254:81").unwrap(),
            "10.0.255.254:81".parse().unwrap()
        );
        assert!(listen_arg("nope").unwrap_err().contains("give a port"));
    }
}
