//! System test: guest networking. A web VM serves HTTP/1.1 over TCP (keep-alive) at its own
//! address inside kscope's network namespace, with the same host-checked answers as through
//! the request device; its clones answer at their own addresses, never with each other's
//! identity, and do not continue the parent's connections. All traffic stays inside the
//! namespace; counts and times are bounded.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kscope_guest::abi::request::kind;
use kscope_vmm::net::{NetAttach, Network};
use kscope_vmm::{CloneOptions, MemoryMode, Vm, VmConfig};
use kscope_workloads::{default_image, Workload};

const T: Duration = Duration::from_secs(120);

fn available() -> Option<Arc<Network>> {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: /dev/kvm is absent");
        return None;
    }
    match Network::get() {
        Ok(n) => Some(n),
        Err(e) => panic!("guest networking cannot be set up: {e}"),
    }
}

fn boot(net: &Arc<Network>, w: Workload, name: &str) -> Vm {
    let id = net.boot_identity(name);
    let vm = Vm::boot(VmConfig {
        name: name.into(),
        mem_bytes: 64 << 20,
        vcpus: 1,
        kernel: Arc::from(kscope_guest::KERNEL_ELF),
        cmdline: format!("init={}", w.program_path()),
        disk: Arc::from(default_image()),
        guest_mode: kscope_vmm::GuestMode::process_default(),
        net: Some(NetAttach::new(net.clone(), &id).expect("tap")),
    })
    .expect("boot");
    if let Err(e) = vm.wait_ready(T) {
        panic!("{name} not ready: {e}\nserial:\n{}", vm.serial_output());
    }
    vm
}

fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Vec<u8>> {
    kscope_workloads::read_http_response(s, buf, false)
}

fn connect(net: &Network, ip: Ipv4Addr) -> TcpStream {
    let s = net
        .connect(SocketAddr::from((ip, 80)), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("connect to {ip}:80: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s
}

/// Send the web mix over one keep-alive connection and check every answer.
fn check_mix(net: &Network, vm: &Vm, seed: u64, n: usize) -> Duration {
    let w = Workload::Web;
    let ip = vm.net_address().expect("address");
    let mut s = connect(net, ip);
    let mut buf = Vec::new();
    let t0 = Instant::now();
    for req in w.requests(seed, n) {
        s.write_all(&req).unwrap();
        let resp = read_response(&mut s, &mut buf).unwrap_or_else(|e| {
            panic!(
                "{}: no answer to {:?}: {e}\nnet: {:?} exits: {:?}\nserial:\n{}",
                vm.name(),
                String::from_utf8_lossy(&req),
                vm.net_counts(),
                vm.exit_counts(),
                vm.serial_output()
            )
        });
        if let Err(e) = w.check(&req, &resp) {
            panic!(
                "{}: wrong answer to {:?}: {e}",
                vm.name(),
                String::from_utf8_lossy(&req)
            );
        }
    }
    t0.elapsed()
}

/// `GET /kscope/id` over a new connection: the VM's own view of its address.
fn identity(net: &Network, ip: Ipv4Addr) -> String {
    let mut s = connect(net, ip);
    s.write_all(b"GET /kscope/id HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let r = read_response(&mut s, &mut Vec::new()).expect("identity answer");
    let text = String::from_utf8_lossy(&r).into_owned();
    text.split("\r\n\r\n").nth(1).unwrap_or("").to_string()
}

#[test]
fn web_vm_and_clones_serve_http_over_tcp_at_their_own_addresses() {
    let Some(net) = available() else { return };
    let vm = boot(&net, Workload::Web, "net-web");
    let ip = vm.net_address().unwrap();
    let took = check_mix(&net, &vm, 11, 40);
    eprintln!("parent {ip}: 40 keep-alive requests checked in {took:?}");
    // The request-device path still works beside TCP.
    let w = Workload::Web;
    for req in w.requests(12, 5) {
        let r = vm.request(kind::WORKLOAD, &req, T).expect("request device");
        w.check(&req, &r.payload).expect("request-device answer");
    }
    assert!(identity(&net, ip).contains(&format!("ip={ip}")));

    // A connection open in the parent when it is cloned: the parent keeps it, the clones do
    // not continue it.
    let mut held = connect(&net, ip);
    let mut held_buf = Vec::new();
    held.write_all(&w.requests(13, 1)[0]).unwrap();
    read_response(&mut held, &mut held_buf).expect("held connection answers");

    let t_clone = Instant::now();
    let clones = vm
        .clone_children(
            2,
            &CloneOptions {
                memory: MemoryMode::Lazy,
                ..Default::default()
            },
        )
        .expect("clone");
    let clone_call = t_clone.elapsed();
    let mut seen = Vec::new();
    for c in clones.children.iter() {
        let cip = c.net_address().expect("clone address");
        assert_ne!(cip, ip, "a clone has its parent's address");
        let t0 = Instant::now();
        let id = identity(&net, cip);
        eprintln!(
            "clone {cip}: clone call {clone_call:?}, first TCP answer {:?} later: {id}",
            t0.elapsed()
        );
        assert!(
            id.contains(&format!("ip={cip}")),
            "clone at {cip} answered as {id}"
        );
        let took = check_mix(&net, c, 21, 10);
        eprintln!("clone {cip}: 10 requests checked in {took:?}");
        seen.push(cip);
    }
    assert_ne!(seen[0], seen[1], "two clones share an address");
    // Each clone still answers with its own identity after the other one served.
    for &cip in &seen {
        assert!(identity(&net, cip).contains(&format!("ip={cip}")));
    }
    // The parent's held connection still works and only the parent answers on it.
    held.write_all(&w.requests(14, 1)[0]).unwrap();
    read_response(&mut held, &mut held_buf).expect("parent keeps its connection");
    for c in clones.children.iter() {
        let k = c.net_counts().unwrap();
        eprintln!("{}: {:?}", c.name(), k);
    }
    eprintln!("tap pool: {:?}", net.pool_stats());
    drop(clones);
    vm.stop().expect("stop");
}
