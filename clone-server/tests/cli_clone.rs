//! `kscope clone`, as a user runs it: lazy clones from the pool of pre-created VMs, each
//! answering its own checked requests; `--pool 0` makes every VM in the call.

use std::process::Command;

fn kscope_clone(pool: usize) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_kscope"))
        .args([
            "clone",
            "--workload",
            "web",
            "--mem",
            "64M",
            "--clones",
            "2",
        ])
        .args(["--warm", "5", "--requests", "3", "--json", "--pool"])
        .arg(pool.to_string())
        .output()
        .expect("kscope runs");
    assert!(
        out.status.success(),
        "kscope clone --pool {pool} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON report")
}

#[test]
fn clones_come_from_the_pool_unless_it_is_off() {
    if !std::path::Path::new("/dev/kvm").exists() {
        panic!("/dev/kvm is required for this test");
    }
    for (pool, pooled) in [(2, 2), (0, 0)] {
        let r = kscope_clone(pool);
        assert_eq!(r["pooled"], pooled, "--pool {pool}: {r}");
        let clones = r["clones"].as_array().expect("clones");
        assert_eq!(clones.len(), 2);
        for c in clones {
            // Each clone answered its first request and 3 more, checked by the driver.
            assert_eq!(c["run"]["requests"], 3, "{c}");
            assert_eq!(c["run"]["checked"], 3, "{c}");
            assert!(c["clone_latency_ms"].as_f64().unwrap() > 0.0);
        }
        assert!(r["parent_pause_ms"].as_f64().unwrap() > 0.0);
    }
}
