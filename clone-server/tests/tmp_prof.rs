use std::sync::Arc;
use std::time::Duration;
use kscope_guest::abi::request::kind;
use kscope_vmm::{Vm, VmConfig};
use kscope_workloads::{default_image, Workload};

#[test]
fn prof() {
    for w in [Workload::Json, Workload::Compress, Workload::Web] {
        let vm = Vm::boot(VmConfig { name: "p".into(), mem_bytes: 128 << 20, vcpus: 1, kernel: Arc::from(kscope_guest::KERNEL_ELF), cmdline: format!("init={}", w.program_path()), disk: Arc::from(default_image()) }).unwrap();
        vm.wait_ready(Duration::from_secs(60)).unwrap();
        for req in w.requests(11, 4) {
            let t = std::time::Instant::now();
            let r = vm.request(kind::WORKLOAD, &req, Duration::from_secs(60)).unwrap();
            println!("{} {:?} status {}", w.name(), t.elapsed(), r.status);
        }
        let s = vm.serial_output();
        for l in s.lines().filter(|l| l.starts_with("stats")) { println!("{l}"); }
        vm.stop().unwrap();
    }
}
