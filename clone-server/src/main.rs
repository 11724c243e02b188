//! `kscope`: VM cloning for micro-elastic clouds. The command-line interface.

use anyhow::Context;
use clap::{Parser, Subcommand};

use kscope::cli;

#[derive(Parser)]
#[command(name = "kscope", version, about = "VM cloning for micro-elastic clouds", long_about = None)]
struct Cli {
    /// How guest kernels run: natively through the host's PVM switch, in KVM's instruction
    /// emulator, or native where available (auto).
    #[arg(long, global = true, env = "KSCOPE_GUEST_MODE", default_value = "auto")]
    guest_mode: kscope_vmm::GuestMode,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a VM running a workload, drive it with requests and print boot time, time to first
    /// response, throughput and latency percentiles.
    Run(cli::RunArgs),
    /// The quick-start demo: boot every workload, then clone a warm parent.
    Demo(cli::DemoArgs),
    /// Boot and warm a parent, clone it N times, drive every clone and report per clone.
    Clone(cli::CloneArgs),
    /// Save a running VM to a directory, or restore one.
    #[command(subcommand)]
    Snapshot(cli::SnapshotCmd),
    /// Boot and warm a workload, color its memory, print the histogram and accuracy.
    Color(cli::ColorArgs),
    /// Run the HTTP clone service (for elastic load balancers).
    Serve(cli::ServeArgs),
    /// Run an elastic load balancer that drives a running service with bursty load.
    Lb(cli::LbArgs),
    /// Benchmarks: clone warm-up per prefetch policy, color-targeted dedup.
    #[command(subcommand)]
    Bench(cli::BenchCmd),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KSCOPE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    cli.guest_mode.set_process_default();
    let result = match cli.cmd {
        Cmd::Run(a) => cli::run(a),
        Cmd::Demo(a) => cli::demo(a),
        Cmd::Clone(a) => cli::clone(a),
        Cmd::Snapshot(c) => cli::snapshot(c),
        Cmd::Color(a) => cli::color(a),
        Cmd::Serve(a) => cli::serve(a),
        Cmd::Lb(a) => cli::lb(a),
        Cmd::Bench(c) => cli::bench(c),
    };
    if let Err(e) = result.context("kscope failed") {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
