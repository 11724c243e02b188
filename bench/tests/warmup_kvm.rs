//! Runs `kscope bench warmup` for two policies on a few requests under real KVM.

use kscope_bench::warmup::{self, WarmupConfig};
use kscope_workloads::Workload;

#[test]
fn warmup_runs_two_policies_under_kvm() {
    if !std::path::Path::new("/dev/kvm").exists() {
        panic!("/dev/kvm is required for this test");
    }
    let cfg = WarmupConfig {
        workload: Workload::Web,
        policies: vec!["lazy".parse().unwrap(), "kaleidoscope".parse().unwrap()],
        clones: 1,
        requests: 6,
        window: 2,
        mem_bytes: 64 << 20,
        ws_change: false,
        warm_fraction: 0.9,
        fault_spin: std::time::Duration::ZERO,
    };
    let r = warmup::run(&cfg).expect("warmup runs");
    assert_eq!(r.policies.len(), 2);
    assert!(r.parent_rps > 0.0);
    assert!(r.touched_pages > 0, "a lazy clone touches pages");
    let lazy = &r.policies[0];
    let k = &r.policies[1];
    assert_eq!(
        (lazy.policy.as_str(), k.policy.as_str()),
        ("lazy", "kaleidoscope")
    );
    // A lazy clone installs what it touches plus what the VMM writes before it runs (its
    // GenPage), nothing else.
    assert!(lazy.wasted_pages <= 2, "lazy wasted {}", lazy.wasted_pages);
    assert!(lazy.installed_pages >= r.touched_pages);
    assert!(lazy.installed_pages <= r.touched_pages + 2);
    for p in &r.policies {
        assert!(p.first_response_ms > 0.0 && p.first_response_ms <= p.first_k_ms);
        assert!(p.installed_pages > 0 && p.footprint_bytes > 0);
        assert!(!p.curve.is_empty());
    }
    // Kaleidoscope prefetches: fewer blocking faults than lazy.
    assert!(
        k.blocking_faults < lazy.blocking_faults,
        "{} vs {}",
        k.blocking_faults,
        lazy.blocking_faults
    );
    // The warm reference ran, and a lazy clone loses time against it (its clone call and its
    // faults at least).
    assert!(r.reference_k_ms[0] > 0.0 && r.reference_k_ms[1] <= r.reference_k_ms[2]);
    assert!(
        lazy.warm_cost_ms > 0.0,
        "lazy time to warm {}",
        lazy.warm_cost_ms
    );
    let text = warmup::render(&r);
    assert!(text.contains("kaleidoscope") && text.contains("goals:"));
    assert!(text.contains("time to warm"));
}
