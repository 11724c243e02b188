//! System test: a VM on kscope's network reaches what is inside kscope's namespace and
//! nothing of the host: not the host's loopback services, not services the host listens to on
//! all its interfaces, not the host's own address. The guest opens the connections itself
//! (`/bin/ktest`'s `connect`); every attempt is bounded to a second.

use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use kscope_guest::abi::kinfo::file_kind;
use kscope_guest::abi::request::kind;
use kscope_vmm::net::{NetAttach, Network, BRIDGE_IP};
use kscope_vmm::{Vm, VmConfig};

const T: Duration = Duration::from_secs(60);

fn ktest_disk() -> Arc<[u8]> {
    let mut b = kscope_guest::mkfs::FsBuilder::new();
    for (path, elf) in kscope_guest::PROGRAMS {
        b.add(path, file_kind::EXEC, elf).expect("add program");
    }
    Arc::from(b.build())
}

fn ask(vm: &Vm, cmd: &str) -> String {
    let r = vm
        .request(kind::WORKLOAD, cmd.as_bytes(), T)
        .unwrap_or_else(|e| panic!("{cmd}: {e}\nserial:\n{}", vm.serial_output()));
    assert_eq!(r.status, 0, "{cmd}: status {}", r.status);
    String::from_utf8_lossy(&r.payload).into_owned()
}

/// The host's address on its default route, if it has one (a UDP `connect` sends nothing).
fn host_address() -> Option<Ipv4Addr> {
    let s = UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    match s.local_addr().ok()?.ip() {
        std::net::IpAddr::V4(a) if !a.is_unspecified() => Some(a),
        _ => None,
    }
}

fn nothing_accepted(l: &TcpListener, what: &str) {
    l.set_nonblocking(true).unwrap();
    match l.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Ok((_, from)) => panic!("{what} accepted a connection from {from}"),
        Err(e) => panic!("{what}: {e}"),
    }
}

#[test]
fn a_vm_reaches_its_namespace_and_nothing_of_the_host() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: /dev/kvm is absent");
        return;
    }
    let net = Network::get().unwrap_or_else(|e| panic!("guest networking: {e}"));
    let id = net.boot_identity("net-iso");
    let vm = Vm::boot(VmConfig {
        name: "net-iso".into(),
        mem_bytes: 64 << 20,
        vcpus: 1,
        kernel: Arc::from(kscope_guest::KERNEL_ELF),
        cmdline: "init=/bin/ktest".into(),
        disk: ktest_disk(),
        guest_mode: kscope_vmm::GuestMode::process_default(),
        net: Some(NetAttach::new(net.clone(), &id).expect("tap")),
    })
    .expect("boot");
    vm.wait_ready(T)
        .unwrap_or_else(|e| panic!("not ready: {e}\n{}", vm.serial_output()));

    // Inside the namespace: a service on the bridge is reachable (the positive control).
    let inside = net
        .run_in(|| TcpListener::bind((BRIDGE_IP, 0)))
        .expect("enter the namespace")
        .expect("listen on the bridge");
    let port = inside.local_addr().unwrap().port();
    assert_eq!(
        ask(&vm, &format!("connect {BRIDGE_IP} {port}")),
        "connected"
    );
    let (_conn, from) = inside.accept().expect("the guest's connection");
    assert_eq!(from.ip(), std::net::IpAddr::V4(vm.net_address().unwrap()));

    // The host's loopback service: 127.0.0.1 is the guest's own, never the host's.
    let lo = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let lo_port = lo.local_addr().unwrap().port();
    let r = ask(&vm, &format!("connect 127.0.0.1 {lo_port}"));
    assert_ne!(r, "connected", "the guest reached the host's loopback");
    nothing_accepted(&lo, "the host's loopback service");

    // A host service on every interface: absent from the namespace, so the bridge refuses.
    let any = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
    let any_port = any.local_addr().unwrap().port();
    let r = ask(&vm, &format!("connect {BRIDGE_IP} {any_port}"));
    assert_eq!(r, "refused", "a host service answered inside the namespace");
    // The host's own address: no route out of the namespace.
    if let Some(h) = host_address() {
        let r = ask(&vm, &format!("connect {h} {any_port}"));
        assert_ne!(r, "connected", "the guest reached the host at {h}");
        eprintln!("host address {h}: {r}");
    }
    nothing_accepted(&any, "the host's service on all interfaces");
    assert_eq!(ask(&vm, "echo still up"), "still up");
    vm.stop().expect("stop");
}
