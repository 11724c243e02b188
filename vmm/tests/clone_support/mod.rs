//! Helpers shared by the clone and snapshot tests: boot the real kscope kernel with `ktest`.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use kscope_guest::abi::kinfo::file_kind;
use kscope_guest::abi::request::kind;
use kscope_vmm::{Vm, VmConfig};

/// Request timeout.
pub const T: Duration = Duration::from_secs(30);

/// A disk with every guest program.
pub fn disk() -> Arc<[u8]> {
    let mut b = kscope_guest::mkfs::FsBuilder::new();
    for (path, elf) in kscope_guest::PROGRAMS {
        b.add(path, file_kind::EXEC, elf).expect("add program");
    }
    Arc::from(b.build())
}

/// The config of a `ktest` VM.
pub fn config(name: &str, mem_bytes: u64) -> VmConfig {
    VmConfig {
        name: name.into(),
        mem_bytes,
        vcpus: 1,
        kernel: Arc::from(kscope_guest::KERNEL_ELF),
        cmdline: "init=/bin/ktest".into(),
        disk: disk(),
        net: None,
        guest_mode: kscope_vmm::GuestMode::Auto,
    }
}

/// Boot a `ktest` VM and wait until it answers.
pub fn boot(name: &str, mem_bytes: u64) -> Vm {
    let vm = Vm::boot(config(name, mem_bytes)).expect("boot");
    if let Err(e) = vm.wait_ready(T) {
        panic!("kernel not ready: {e}\nserial:\n{}", vm.serial_output());
    }
    assert_eq!(ask(&vm, "echo up"), "up");
    vm
}

/// Send a ktest command, return the answer as text (panics with the console on failure).
pub fn ask(vm: &Vm, cmd: &str) -> String {
    String::from_utf8_lossy(&ask_bytes(vm, cmd)).into_owned()
}

/// Send a ktest command, return the answer bytes.
pub fn ask_bytes(vm: &Vm, cmd: &str) -> Vec<u8> {
    match vm.request(kind::WORKLOAD, cmd.as_bytes(), T) {
        Ok(r) => {
            assert_eq!(r.status, 0, "{cmd}: status {}", r.status);
            r.payload
        }
        Err(e) => panic!(
            "{}: {cmd}: {e}\nrequests {:?} exits {:?}\nserial:\n{}",
            vm.name(),
            vm.request_counts(),
            vm.exit_counts(),
            vm.serial_output()
        ),
    }
}

/// Entries of /proc/self/<what> (fd, task).
pub fn count_proc(what: &str) -> usize {
    std::fs::read_dir(format!("/proc/self/{what}"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Resident set size of this process in KiB.
pub fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
