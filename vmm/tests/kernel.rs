//! Boot the real kscope kernel (`kscope_guest::KERNEL_ELF`) with the `ktest` init program and
//! measure boot and request costs. Run with `--nocapture` to see the numbers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kscope_guest::abi::kinfo::file_kind;
use kscope_guest::abi::request::kind;
use kscope_vmm::{ExitReason, Vm, VmConfig, VmState};

const T: Duration = Duration::from_secs(30);

fn disk() -> Vec<u8> {
    let mut b = kscope_guest::mkfs::FsBuilder::new();
    for (path, elf) in kscope_guest::PROGRAMS {
        b.add(path, file_kind::EXEC, elf).expect("add program");
    }
    b.build()
}

fn boot(name: &str) -> (Vm, Duration) {
    let t0 = Instant::now();
    let vm = Vm::boot(VmConfig {
        name: name.into(),
        mem_bytes: 64 << 20,
        vcpus: 1,
        kernel: Arc::from(kscope_guest::KERNEL_ELF),
        cmdline: "init=/bin/ktest".into(),
        disk: Arc::from(disk()),
        net: None,
        guest_mode: kscope_vmm::GuestMode::Auto,
    })
    .expect("boot");
    match vm.wait_ready(T) {
        Ok(_) => (vm, t0.elapsed()),
        Err(e) => panic!("kernel not ready: {e}\nserial:\n{}", vm.serial_output()),
    }
}

#[test]
fn real_kernel_boots_and_answers() {
    let (vm, boot_time) = boot("kernel");
    let r = vm.request(kind::PING, b"", T).unwrap_or_else(|e| {
        panic!(
            "{e}\nrequests (delivered, completed) {:?}, exits {:?}\n{}",
            vm.request_counts(),
            vm.exit_counts(),
            vm.serial_output()
        )
    });
    assert_eq!(r.status, 0);
    let n = 200u32;
    let t0 = Instant::now();
    for _ in 0..n {
        let r = vm.request(kind::PING, b"", T).unwrap_or_else(|e| {
            panic!(
                "{e}\nrequests (delivered, completed) {:?}, exits {:?}\n{}",
                vm.request_counts(),
                vm.exit_counts(),
                vm.serial_output()
            )
        });
        assert_eq!(r.status, 0);
    }
    let ping = t0.elapsed() / n;
    let t0 = Instant::now();
    for _ in 0..n {
        let r = vm
            .request(kind::WORKLOAD, b"echo hello", T)
            .unwrap_or_else(|e| {
                panic!(
                    "{e}\nrequests (delivered, completed) {:?}, exits {:?}\n{}",
                    vm.request_counts(),
                    vm.exit_counts(),
                    vm.serial_output()
                )
            });
        assert_eq!(r.payload, b"hello");
    }
    let echo = t0.elapsed() / n;
    println!("real kernel: boot to READY {boot_time:?}; PING round trip {ping:?}; ktest echo round trip {echo:?}; exits {:?}", vm.exit_counts());
    assert_eq!(vm.state(), VmState::Running);
    let rep = vm.stop().unwrap();
    assert!(
        matches!(rep.reason, ExitReason::Stopped),
        "{:?}",
        rep.reason
    );
}
