//! System tests of the kscope guest kernel under the real VMM (KVM): boot, requests through
//! ktest, process isolation, page tables and page cache as seen from outside.

use std::sync::Arc;
use std::time::Duration;

use kscope_guest::abi::kinfo::file_kind;
use kscope_guest::abi::request::kind;
use kscope_vmm::{Vm, VmConfig};

const T: Duration = Duration::from_secs(20);

fn program(path: &str) -> &'static [u8] {
    kscope_guest::PROGRAMS
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, b)| *b)
        .unwrap_or_else(|| panic!("program {path} not embedded"))
}

/// Test data: 3 pages + a tail, with a position-dependent pattern.
fn data_file() -> Vec<u8> {
    (0..(3 * 4096 + 1234u32)).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()
}

fn image(extra: &[(&str, u32, Vec<u8>)]) -> Vec<u8> {
    let mut b = kscope_guest::mkfs::FsBuilder::new();
    b.add("/bin/ktest", file_kind::EXEC, program("/bin/ktest")).unwrap();
    b.add("/bin/kcrash", file_kind::EXEC, program("/bin/kcrash")).unwrap();
    for (p, k, d) in extra {
        b.add(p, *k, d).unwrap();
    }
    b.build()
}

fn boot(name: &str, mem_mib: u64, extra: &[(&str, u32, Vec<u8>)]) -> Vm {
    let disk = image(extra);
    let vm = Vm::boot(VmConfig {
        name: name.into(),
        mem_bytes: mem_mib << 20,
        vcpus: 1,
        kernel: Arc::from(kscope_guest::KERNEL_ELF),
        cmdline: "init=/bin/ktest".into(),
        disk: Arc::from(disk),
    })
    .expect("boot");
    if let Err(e) = vm.wait_ready(T) {
        panic!("not ready: {e}\nserial:\n{}", vm.serial_output());
    }
    vm
}

fn ask(vm: &Vm, payload: &[u8]) -> Vec<u8> {
    match vm.request(kind::WORKLOAD, payload, T) {
        Ok(r) => {
            assert_eq!(r.status, 0, "status for {:?}", String::from_utf8_lossy(payload));
            r.payload
        }
        Err(e) => panic!("request {:?} failed: {e}\nserial:\n{}", String::from_utf8_lossy(payload), vm.serial_output()),
    }
}

#[test]
fn boots_and_echoes() {
    let vm = boot("kt-echo", 64, &[]);
    assert_eq!(ask(&vm, b"echo hello"), b"hello");
    assert_eq!(ask(&vm, b"plain payload"), b"plain payload");
    let r = vm.request(kind::PING, b"", T).expect("ping");
    assert_eq!(r.status, 0);
    let t = std::time::Instant::now();
    for _ in 0..20 {
        vm.request(kind::PING, b"", T).expect("ping");
    }
    println!("ping: {:?} per request", t.elapsed() / 20);
    let t = std::time::Instant::now();
    for _ in 0..20 {
        ask(&vm, b"echo x");
    }
    println!("echo: {:?} per request", t.elapsed() / 20);
    println!("{}", vm.serial_output());
    vm.stop().unwrap();
}
