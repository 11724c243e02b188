//! `kscope run`.

use clap::Args;

use kscope_bench::runner;
use kscope_vmm::summary::fmt_us;

/// Arguments of `kscope run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Workload: web, olap, json, aes, matmul, compress.
    #[arg(long, short)]
    pub workload: String,
    /// Guest memory (e.g. 64M, 256M, 1G).
    #[arg(long, default_value = "256M", value_parser = super::mem_arg)]
    pub mem: u64,
    /// Requests to send after the first one.
    #[arg(long, short = 'n', default_value_t = 200)]
    pub requests: usize,
    /// Requests kept in flight.
    #[arg(long, default_value_t = 4)]
    pub window: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Run `kscope run`.
pub fn run(a: RunArgs) -> anyhow::Result<()> {
    let w = runner::parse_workload(&a.workload)?;
    let r = runner::run(w, a.mem, a.requests, a.window)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!("workload            {}", r.workload);
    println!("guest memory        {} MiB", r.mem_mib);
    println!(
        "guest kernel        {}",
        r.cpu_mode.map_or("mode not reported", |m| m.as_str())
    );
    println!("boot (to ready)     {}", fmt_us(r.boot_ms * 1e3));
    println!("first response      {}", fmt_us(r.first_response_ms * 1e3));
    println!(
        "requests            {} ({} checked against host-computed answers)",
        r.run.requests, r.run.checked
    );
    println!("throughput          {:.0} req/s", r.run.throughput_rps);
    let l = &r.run.latency;
    println!(
        "latency             p50 {}  p90 {}  p99 {}  max {}",
        fmt_us(l.p50_us),
        fmt_us(l.p90_us),
        fmt_us(l.p99_us),
        fmt_us(l.max_us)
    );
    Ok(())
}
