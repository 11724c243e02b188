//! System test: every workload program boots as `init` of kscope's guest kernel in a real VM
//! (KVM) on the default image, and its answers to a request mix pass the host's checks.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kscope_guest::abi::request::kind;
use kscope_vmm::{Vm, VmConfig};
use kscope_workloads::{default_image, Workload};

const T: Duration = Duration::from_secs(120);

fn kvm_available() -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    eprintln!("SKIPPED: /dev/kvm is absent, guest workloads cannot be booted on this machine");
    false
}

fn boot(w: Workload, mem_mib: u64) -> Vm {
    let vm = Vm::boot(VmConfig {
        name: format!("wl-{}", w.name()),
        mem_bytes: mem_mib << 20,
        vcpus: 1,
        kernel: Arc::from(kscope_guest::KERNEL_ELF),
        cmdline: format!("init={}", w.program_path()),
        disk: Arc::from(default_image()),
        net: None,
        guest_mode: kscope_vmm::GuestMode::Auto,
    })
    .expect("boot");
    if let Err(e) = vm.wait_ready(T) {
        panic!(
            "{} not ready: {e}\nserial:\n{}",
            w.name(),
            vm.serial_output()
        );
    }
    vm
}

/// Boot `w`, send `n` requests of its mix, check every answer; returns the mean latency.
fn run(w: Workload, mem_mib: u64, n: usize) -> Duration {
    let vm = boot(w, mem_mib);
    let start = Instant::now();
    for req in w.requests(11, n) {
        let r = match vm.request(kind::WORKLOAD, &req, T) {
            Ok(r) => r,
            Err(e) => panic!(
                "{} request {:?} failed: {e}\nserial:\n{}",
                w.name(),
                String::from_utf8_lossy(&req),
                vm.serial_output()
            ),
        };
        assert_eq!(
            r.status,
            0,
            "{}: {}",
            w.name(),
            String::from_utf8_lossy(&r.payload)
        );
        if let Err(e) = w.check(&req, &r.payload) {
            panic!(
                "{} answer to {:?} is wrong: {e}\nanswer: {:?}",
                w.name(),
                String::from_utf8_lossy(&req),
                String::from_utf8_lossy(&r.payload[..r.payload.len().min(400)])
            );
        }
    }
    let mean = start.elapsed() / n as u32;
    eprintln!("{}: {n} requests checked, mean latency {mean:?}", w.name());
    vm.stop().expect("stop");
    mean
}

#[test]
fn web_serves_the_specweb_mix_in_64_mib() {
    if kvm_available() {
        run(Workload::Web, 64, 80);
    }
}

#[test]
fn olap_answers_tpch_queries() {
    if kvm_available() {
        run(Workload::Olap, 64, 8);
    }
}

#[test]
fn functions_answer_both_input_sizes() {
    if kvm_available() {
        for w in [
            Workload::Json,
            Workload::Aes,
            Workload::Matmul,
            Workload::Compress,
        ] {
            run(w, 64, 6);
        }
    }
}

#[test]
fn bad_requests_get_error_statuses() {
    if !kvm_available() {
        return;
    }
    let vm = boot(Workload::Olap, 64);
    let r = vm.request(kind::WORKLOAD, b"Q99", T).expect("request");
    assert_eq!(r.status, kscope_workloads::handlers::STATUS_BAD_REQUEST);
    assert!(String::from_utf8_lossy(&r.payload).contains("unknown query"));
    vm.stop().expect("stop");
}
