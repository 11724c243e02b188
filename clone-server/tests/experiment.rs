//! `kscope experiment replay` end to end on real VMs (KVM), in a small configuration:
//! two services (web and a function), three strategies, a few seconds of compressed trace.
//! It checks that every strategy ran on the same arrivals, that the metrics were computed
//! from real measurements (footprints, worker lives, first answers), and that a cost model
//! derived from it drives the simulation.

use kscope::experiment::gen::{self, GenParams};
use kscope::experiment::metrics::totals;
use kscope::experiment::model::CostModel;
use kscope::experiment::replay::{self, ReplayConfig};
use kscope::experiment::sim::{self, SimConfig};
use kscope::experiment::Strategy;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn small_replay_compares_strategies_and_feeds_the_simulation() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: /dev/kvm is absent, VMs cannot be booted on this machine");
        return;
    }
    let (mut trace, _) = gen::generate(&GenParams {
        services: 2,
        duration_s: 600.0,
        bursts_per_hour: 12.0,
        seed: 3,
        ..GenParams::default()
    })
    .unwrap();
    trace.services[0].workload = "web".into();
    trace.services[1].workload = "json".into();
    let cfg = ReplayConfig {
        strategies: vec![Strategy::Cold, Strategy::Kaleidoscope, Strategy::Learned],
        compress: 100.0,
        max_s: 6.0,
        peak_workers: 1.5,
        max_workers: 3,
        warm_requests: 60,
        ..ReplayConfig::default()
    };
    let t0 = std::time::Instant::now();
    let r = replay::run(&trace, &cfg, &|m: &str| eprintln!("{m}"))
        .await
        .unwrap();
    eprintln!("replay took {:.1} s", t0.elapsed().as_secs_f64());
    assert_eq!(r.runs.len(), 3);
    assert_eq!(r.setup.len(), 2);
    for s in &r.setup {
        assert!(s.capacity_rps > 0.0 && s.arrivals > 0, "{s:?}");
        assert!(s.parent_footprint_bytes > 0, "{s:?}");
    }
    for run in &r.runs {
        let t = totals(run.strategy.name(), &run.services);
        eprintln!("{t:?}");
        // The same arrivals for every strategy.
        for (m, s) in run.services.iter().zip(&r.setup) {
            assert_eq!(m.requests, s.arrivals, "{} {}", run.strategy.name(), s.name);
        }
        assert!(t.windows > 0);
        assert!(
            t.mem_gib_s > 0.0,
            "no footprint measured for {}",
            run.strategy.name()
        );
        assert!(t.vcpu_s > 0.0);
        assert!(t.peak_workers >= 2);
    }
    let model = CostModel::from_replay(&r, "test").unwrap();
    for s in &cfg.strategies {
        let m = model.strategy(*s).unwrap();
        assert!(m.samples > 0, "{s:?} has no worker samples");
    }
    let sim_cfg = SimConfig {
        compress: cfg.compress,
        max_s: cfg.max_s,
        peak_workers: cfg.peak_workers,
        max_workers: cfg.max_workers,
        ..SimConfig::default()
    };
    let s = sim::simulate(&r.trace, &model, Strategy::Kaleidoscope, &sim_cfg, |_| {}).unwrap();
    assert!(s.totals.windows > 0 && s.totals.mem_gib_s > 0.0);
}
