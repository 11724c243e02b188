//! Guest networking on the host: the namespace of a kscope process killed with SIGKILL is
//! removed by the next process, and the tap pool serves clones without creating devices.

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kscope_vmm::net::{sweep_leftovers, Network};

/// Not a test on its own: the child process of `namespace_of_a_killed_kscope_is_removed`
/// (selected by the environment variable), which sets up a network, reports its namespace
/// and waits to be killed.
#[test]
fn child_holding_a_network() {
    if std::env::var_os("KSCOPE_NET_TEST_CHILD").is_none() {
        return;
    }
    let n = Network::get().expect("network");
    let _tap = n.tap().expect("tap");
    println!("NETNS {}", n.netns());
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn namespace_of_a_killed_kscope_is_removed() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_holding_a_network", "--nocapture"])
        .env("KSCOPE_NET_TEST_CHILD", "1")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let out = child.stdout.take().unwrap();
    let mut ns = None;
    for line in std::io::BufReader::new(out).lines() {
        let line = line.unwrap();
        if let Some(n) = line.strip_prefix("NETNS ") {
            ns = Some(n.to_string());
            break;
        }
    }
    let ns = ns.expect("the child reported no namespace");
    let path = std::path::Path::new("/run/netns").join(&ns);
    assert!(path.exists(), "{ns} was not created");
    // SAFETY: kill(2) of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    assert!(
        path.exists(),
        "SIGKILL cannot clean up: {ns} should be left over"
    );
    let removed = sweep_leftovers();
    assert!(removed.contains(&ns), "sweep removed {removed:?}, not {ns}");
    assert!(!path.exists(), "{ns} is still there after the sweep");
}

#[test]
fn tap_pool_serves_taps_without_creating_them() {
    let n = Network::get().expect("network");
    // Let the pool fill, then take a few: hits, and fast.
    let deadline = Instant::now() + Duration::from_secs(10);
    while n.pool_stats().ready < 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = n.pool_stats();
    let taps: Vec<_> = (0..3).map(|_| n.tap().expect("tap")).collect();
    let after = n.pool_stats();
    assert_eq!(after.hits - before.hits, 3, "{before:?} -> {after:?}");
    assert_eq!(after.misses, before.misses, "{before:?} -> {after:?}");
    let names: std::collections::HashSet<_> = taps.iter().map(|t| t.name().to_string()).collect();
    assert_eq!(names.len(), 3);
}
