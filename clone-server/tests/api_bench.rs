//! Measurements through the API (real service in-process, real VMs, real HTTP client):
//! `cargo test -p kscope --test api_bench -- --ignored --nocapture --test-threads=1`.
//! They print numbers and check only that the work was done.

mod api_util;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api_util::*;
use hyper::Method;
use kscope::lb::{self, LbOptions, ScaleMode, Source};
use kscope::server::Limits;
use kscope_vmm::summary::LatencySummary;
use kscope_workloads::Workload;
use serde_json::json;

fn big_limits() -> Limits {
    Limits {
        max_vms: 16,
        max_clones: 256,
        max_guest_mem: 64 << 30,
        ..Limits::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn clone_call_latency() {
    if !kvm_available() {
        return;
    }
    let (srv, c) = start(big_limits(), |_| {}).await;
    let vm = c
        .json(Method::POST, "/v1/vms", Some(&json!({"workload": "web"})))
        .await
        .unwrap();
    let id = vm["id"].as_str().unwrap().to_string();
    for req in Workload::Web.requests(1, 50) {
        c.request(&id, &req).await.unwrap();
    }
    for (mode, n) in [("lazy", 1), ("eager", 1), ("lazy", 8)] {
        let mut lat = Vec::new();
        let mut pause = Vec::new();
        for _ in 0..30 {
            let t = Instant::now();
            let v = c
                .json(
                    Method::POST,
                    &format!("/v1/vms/{id}/clones"),
                    Some(&json!({"n": n, "memory_mode": mode})),
                )
                .await
                .unwrap();
            lat.push(t.elapsed());
            pause.push(Duration::from_secs_f64(
                v["parent_pause_ms"].as_f64().unwrap() / 1e3,
            ));
            for cl in v["clones"].as_array().unwrap() {
                let cid = cl["id"].as_str().unwrap();
                c.json(Method::DELETE, &format!("/v1/vms/{cid}"), None)
                    .await
                    .unwrap();
            }
        }
        let s = LatencySummary::of(&lat);
        let p = LatencySummary::of(&pause);
        println!(
            "clone call n={n} {mode}: p50 {:.2} ms p99 {:.2} ms (30 calls); parent pause p50 {:.3} ms",
            s.p50_us / 1e3,
            s.p99_us / 1e3,
            p.p50_us / 1e3
        );
    }
    srv.shutdown().await.unwrap();
}

async fn sustained(
    c: &kscope::lb::client::ApiClient,
    ids: &[String],
    clients: usize,
    secs: u64,
) -> (f64, LatencySummary) {
    let reqs = Arc::new(Workload::Web.requests(3, 512));
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..clients {
        let (c, reqs, done) = (c.clone(), reqs.clone(), done.clone());
        let id = ids[k % ids.len()].clone();
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut i = k;
            while Instant::now() < deadline {
                let t = Instant::now();
                c.request(&id, &reqs[i % reqs.len()]).await.unwrap();
                lat.push(t.elapsed());
                done.fetch_add(1, Ordering::Relaxed);
                i += clients;
            }
            lat
        });
    }
    let mut all = Vec::new();
    while let Some(l) = tasks.join_next().await {
        all.extend(l.unwrap());
    }
    (
        done.load(Ordering::Relaxed) as f64 / secs as f64,
        LatencySummary::of(&all),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn sustained_requests_per_second() {
    if !kvm_available() {
        return;
    }
    let (srv, c) = start(big_limits(), |_| {}).await;
    let vm = c
        .json(Method::POST, "/v1/vms", Some(&json!({"workload": "web"})))
        .await
        .unwrap();
    let id = vm["id"].as_str().unwrap().to_string();
    sustained(&c, std::slice::from_ref(&id), 4, 2).await; // warm the page cache
    for clients in [1, 4, 16] {
        let (rps, l) = sustained(&c, std::slice::from_ref(&id), clients, 5).await;
        println!(
            "1 web VM, {clients} clients: {rps:.0} req/s, latency p50 {:.0} us p99 {:.0} us",
            l.p50_us, l.p99_us
        );
    }
    let v = c
        .json(
            Method::POST,
            &format!("/v1/vms/{id}/clones"),
            Some(&json!({"n": 4})),
        )
        .await
        .unwrap();
    let ids: Vec<String> = v["clones"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect();
    sustained(&c, &ids, 8, 2).await;
    let (rps, l) = sustained(&c, &ids, 16, 5).await;
    println!(
        "4 web clones, 16 clients: {rps:.0} req/s, latency p50 {:.0} us p99 {:.0} us",
        l.p50_us, l.p99_us
    );
    srv.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn elastic_load_balancer_run() {
    if !kvm_available() {
        return;
    }
    let (srv, _) = start(big_limits(), |_| {}).await;
    let opts = LbOptions {
        api: format!("http://{}", srv.addr()),
        token: srv.token().to_string(),
        source: Source::Generate {
            pattern: lb::load::Pattern::parse("onoff:3000,4000,0.05").unwrap(),
            rate: 150.0,
            duration: Duration::from_secs(14),
            seed: 7,
        },
        min_workers: 1,
        max_workers: 8,
        p90_target: Duration::from_millis(50),
        max_queue: 4.0,
        cooldown: Duration::from_secs(2),
        window: Duration::from_millis(500),
        scale: ScaleMode::Clone,
        ..LbOptions::default()
    };
    let report = lb::run_lb(opts).await.unwrap();
    println!("{report}");
    assert!(report.requests > 0);
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    srv.shutdown().await.unwrap();
}
