//! Parents moved onto standby VMs at their first freeze leak nothing: the old KVM VM, its
//! vCPUs and mapping are released on a thread after the resume, and a standby made but never
//! used is released with its VM. Alone in its test binary (its own process) because it counts
//! process-wide resources.

#[path = "clone_support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use kscope_vmm::CloneOptions;
use support::{ask, boot, count_proc};

const MB: u64 = 1 << 20;

#[test]
fn first_freezes_and_unused_standbys_leak_nothing() {
    let round = |i: usize| {
        let parent = boot(&format!("p-rehome-{i}"), 64 * MB);
        parent.prepare_freeze().unwrap();
        if i.is_multiple_of(2) {
            let batch = parent.clone_children(1, &CloneOptions::default()).unwrap();
            assert!(batch.freeze.rehomed);
            assert_eq!(ask(&batch.children[0], "echo c"), "c");
            assert_eq!(ask(&parent, "echo p"), "p");
        }
        parent.stop().unwrap();
    };
    round(0);
    round(1);
    std::thread::sleep(Duration::from_millis(200));
    let (fds, tasks) = (count_proc("fd"), count_proc("task"));
    for i in 0..20 {
        round(i);
    }
    // The retire threads end on their own: wait for them.
    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut fds2, mut tasks2) = (count_proc("fd"), count_proc("task"));
    while (fds2 != fds || tasks2 != tasks) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        (fds2, tasks2) = (count_proc("fd"), count_proc("task"));
    }
    println!("fds {fds}->{fds2}, threads {tasks}->{tasks2}");
    assert_eq!(fds2, fds, "file descriptors leaked");
    assert_eq!(tasks2, tasks, "threads leaked");
}
