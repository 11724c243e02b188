//! System test: the load balancer's front end (`kscope lb --listen`). Real KVM guests, real
//! TCP inside kscope's network namespace, bounded in count and time: requests sent to the
//! front end are answered correctly (the workload's checker) by more than one clone, a worker
//! deleted during the test does not hang the client (its requests are retried on the other
//! clone) and is replaced, and a front end whose workers cannot be reached answers 502 with a
//! clear body within its bound.

mod api_util;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::Method;
use kscope::lb::front::{self, FixedPool, FrontOptions};
use kscope::lb::{self, LbOptions, Source};
use kscope::server::Limits;
use kscope_vmm::net::{Network, BRIDGE_IP};
use kscope_workloads::{read_http_response, Workload};

/// The namespace, or None (the test is skipped) where guest networking cannot be set up.
fn network() -> Option<Arc<Network>> {
    match Network::get() {
        Ok(n) => Some(n),
        Err(e) => {
            eprintln!("SKIPPED: guest networking is unavailable: {e}");
            None
        }
    }
}

fn connect(net: &Network, addr: SocketAddr) -> TcpStream {
    let s = net
        .connect(addr, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("connect to the front end {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

/// One request on a new connection: (answer, time taken).
fn exchange(net: &Network, addr: SocketAddr, req: &[u8]) -> (Vec<u8>, Duration) {
    let t = Instant::now();
    let mut s = connect(net, addr);
    s.write_all(req).unwrap();
    let r = read_http_response(&mut s, &mut Vec::new(), is_head(req))
        .unwrap_or_else(|e| panic!("no answer from the front end after {:?}: {e}", t.elapsed()));
    (r, t.elapsed())
}

/// A HEAD answer has a Content-Length but no body.
fn is_head(req: &[u8]) -> bool {
    req.starts_with(b"HEAD ")
}

/// The web mix without the malformed request (hyper answers that one itself, before the
/// balancer sees it).
fn mix(seed: u64, n: usize) -> Vec<Vec<u8>> {
    Workload::Web
        .requests(seed, n)
        .into_iter()
        .filter(|r| {
            let line = r.split(|&b| b == b'\r').next().unwrap_or_default();
            line.ends_with(b" HTTP/1.1") && line.iter().filter(|&&b| b == b' ').count() == 2
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn front_end_spreads_over_clones_and_survives_a_deleted_worker() {
    if !api_util::kvm_available() {
        return;
    }
    let Some(net) = network() else { return };
    let (srv, api) = api_util::start(Limits::default(), |_| {}).await;
    let listen = SocketAddr::from((BRIDGE_IP, 18081));
    let stop = Arc::new(tokio::sync::Notify::new());
    let opts = LbOptions {
        api: format!("http://{}", srv.addr()),
        token: srv.token().to_string(),
        workload: Workload::Web,
        memory: "64M".into(),
        source: Source::Listen {
            addr: listen,
            duration: Some(Duration::from_secs(240)),
            stop: Some(stop.clone()),
        },
        min_workers: 2,
        max_workers: 2,
        front: FrontOptions {
            upstream_timeout: Duration::from_secs(1),
            down_for: Duration::from_millis(100),
            ..Default::default()
        },
        ..LbOptions::default()
    };
    let lb_task = tokio::spawn(lb::run_lb(opts));

    // The front end is up once the parent and its two clones are (bounded).
    let n2 = net.clone();
    let up = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(180);
        while Instant::now() < deadline {
            if n2.connect(listen, Duration::from_millis(500)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    })
    .await
    .unwrap();
    assert!(up, "the front end did not listen within 180 s");

    // The web mix through the front end, checked, over one keep-alive connection.
    let n2 = net.clone();
    let ips = tokio::task::spawn_blocking(move || {
        let w = Workload::Web;
        let mut s = connect(&n2, listen);
        let mut buf = Vec::new();
        for req in mix(3, 60) {
            s.write_all(&req).unwrap();
            let resp = read_http_response(&mut s, &mut buf, is_head(&req)).unwrap_or_else(|e| {
                panic!("no answer to {:?}: {e}", String::from_utf8_lossy(&req))
            });
            if let Err(e) = w.check(&req, &resp) {
                panic!(
                    "wrong answer to {:?} through the front end: {e}\n{}",
                    String::from_utf8_lossy(&req),
                    String::from_utf8_lossy(&resp)
                );
            }
        }
        // Which clones answer: their own view of their address.
        let mut ips = std::collections::BTreeSet::new();
        for _ in 0..8 {
            let (r, _) = exchange(&n2, listen, b"GET /kscope/id HTTP/1.1\r\nHost: x\r\n\r\n");
            let text = String::from_utf8_lossy(&r).into_owned();
            // The worker's answer, unchanged: its header names, order and case, no added Date.
            assert!(
                text.starts_with("HTTP/1.1 200 OK\r\nServer: kscope\r\nContent-Type: text/plain\r\nContent-Length: "),
                "the front end changed the worker's answer: {text:?}"
            );
            assert!(!text.to_ascii_lowercase().contains("\r\ndate:"), "{text:?}");
            let ip = text
                .split("ip=")
                .nth(1)
                .and_then(|t| t.split_whitespace().next())
                .unwrap_or_else(|| panic!("no identity in {text:?}"))
                .to_string();
            ips.insert(ip);
        }
        ips
    })
    .await
    .unwrap();
    assert!(
        ips.len() >= 2,
        "only {ips:?} answered: the front end should spread requests over both clones"
    );

    // Delete one clone behind the balancer's back: no client may hang, every request is
    // answered (retried on the other clone), and after EVICT_AFTER unreachable attempts the
    // balancer drops the clone and the controller clones a replacement (min_workers = 2).
    let vms = api.json(Method::GET, "/v1/vms", None).await.unwrap();
    let victim = vms["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["kind"] == "clone")
        .expect("a clone")
        .clone();
    let victim_id = victim["id"].as_str().unwrap().to_string();
    let victim_ip = victim["address"].as_str().expect("address").to_string();
    api.json(Method::DELETE, &format!("/v1/vms/{victim_id}"), None)
        .await
        .unwrap();
    let n2 = net.clone();
    let (sent, answered) = tokio::task::spawn_blocking(move || {
        let w = Workload::Web;
        let (mut sent, mut ok) = (0, 0);
        let t0 = Instant::now();
        // Each attempt at the deleted clone costs up to the 1 s upstream timeout, and it is
        // skipped for 100 ms after each: 8 s is enough for three attempts.
        for req in mix(5, 50).iter().cycle() {
            if t0.elapsed() > Duration::from_secs(8) {
                break;
            }
            let (resp, took) = exchange(&n2, listen, req);
            // Two attempts of at most 1 s each, plus the exchange itself.
            assert!(
                took < Duration::from_secs(4),
                "a request took {took:?} after a worker was deleted"
            );
            sent += 1;
            match w.check(req, &resp) {
                Ok(()) => ok += 1,
                Err(e) => {
                    let text = String::from_utf8_lossy(&resp);
                    assert!(
                        text.starts_with("HTTP/1.1 502") && text.contains("kscope lb:"),
                        "neither a correct answer nor a clear 502: {e}\n{text}"
                    );
                }
            }
        }
        (sent, ok)
    })
    .await
    .unwrap();
    assert_eq!(
        answered, sent,
        "requests not answered correctly after a worker was deleted (the other clone should take them)"
    );
    // The replacement serves: two identities again, none of them the deleted clone's.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let n2 = net.clone();
    let after = tokio::task::spawn_blocking(move || {
        let mut ips = std::collections::BTreeSet::new();
        for _ in 0..8 {
            let (r, _) = exchange(&n2, listen, b"GET /kscope/id HTTP/1.1\r\nHost: x\r\n\r\n");
            let text = String::from_utf8_lossy(&r).into_owned();
            if let Some(ip) = text
                .split("ip=")
                .nth(1)
                .and_then(|t| t.split_whitespace().next())
            {
                ips.insert(ip.to_string());
            }
        }
        ips
    })
    .await
    .unwrap();
    assert!(
        after.len() >= 2 && !after.contains(&victim_ip),
        "after dropping {victim_ip} the balancer should serve from two clones again: {after:?}"
    );

    // Clients that go away mid-request leave nothing counted in flight (the controller would
    // never scale such a worker down).
    let n2 = net.clone();
    tokio::task::spawn_blocking(move || {
        for req in mix(7, 8) {
            let mut s = connect(&n2, listen);
            s.write_all(&req).unwrap();
            drop(s);
        }
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;

    stop.notify_one();
    let report = tokio::time::timeout(Duration::from_secs(60), lb_task)
        .await
        .expect("the balancer stops when told")
        .unwrap()
        .expect("lb report");
    let fe = report.front.clone().expect("front end counters");
    eprintln!("{report}");
    assert!(fe.answered >= 60, "{fe:?}");
    assert!(
        fe.retried >= 1,
        "the deleted worker was never tried, so the retry was not exercised: {fe:?}"
    );
    let dropped = report
        .events
        .iter()
        .any(|e| e.kind == "unreachable" && e.reason.contains(&format!("worker {victim_id} ")));
    let replaced = report
        .events
        .iter()
        .any(|e| e.kind == "minimum" && e.delta >= 1);
    assert!(dropped && replaced, "{report}");
    assert!(report.ok >= 60, "{report}");
    let last = report.timeline.last().expect("timeline");
    assert_eq!(
        last.in_flight, 0,
        "requests of clients that went away stay counted in flight: {report}"
    );
    srv.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn front_end_without_reachable_workers_answers_502_in_bounded_time() {
    let Some(net) = network() else { return };
    let listen = SocketAddr::from((BRIDGE_IP, 18082));
    // Nothing answers at these addresses of the namespace's network.
    let dead: Vec<SocketAddr> = vec![
        SocketAddr::from(([10, 0, 254, 250], 80)),
        SocketAddr::from(([10, 0, 254, 251], 80)),
    ];
    let pool = Arc::new(FixedPool::new(net.netns(), &dead));
    let opts = FrontOptions {
        upstream_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let h = front::start(net.netns(), listen, pool.clone(), opts)
        .await
        .expect("front end");
    let n2 = net.clone();
    let (resp, took) = tokio::task::spawn_blocking(move || {
        exchange(&n2, listen, b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&resp).into_owned();
    assert!(text.starts_with("HTTP/1.1 502"), "{text}");
    assert!(
        text.contains("kscope lb: the request failed on 2 worker(s)"),
        "{text}"
    );
    assert!(took < Duration::from_secs(5), "502 after {took:?}");
    let stats = h.stop().await;
    assert_eq!(
        (stats.requests, stats.retried, stats.bad_gateway),
        (1, 1, 1)
    );
    assert_eq!(pool.counts().iter().map(|c| c.failed).sum::<u64>(), 2);

    // No workers at all: 503 at once.
    let empty = Arc::new(FixedPool::new(net.netns(), &[]));
    let quiet = FrontOptions {
        header_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let h = front::start(net.netns(), listen, empty, quiet)
        .await
        .expect("front end");
    // A client that connects and sends nothing is closed after the header timeout.
    let n2 = net.clone();
    let (n, took) = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut s = n2.connect(listen, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let t = std::time::Instant::now();
        let mut b = [0u8; 512];
        (s.read(&mut b).unwrap_or(0), t.elapsed())
    })
    .await
    .unwrap();
    assert!(
        took < Duration::from_secs(5),
        "a silent client kept its connection for {took:?} ({n} bytes)"
    );
    let n2 = net.clone();
    let (resp, took) = tokio::task::spawn_blocking(move || {
        exchange(&n2, listen, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&resp).into_owned();
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(took < Duration::from_secs(2), "503 after {took:?}");
    h.stop().await;
}
