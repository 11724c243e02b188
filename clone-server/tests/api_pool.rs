//! `kscope serve` with a pool of pre-created VM shells (`ServeOptions::pool`): the pool fills
//! for a new parent's size before the first clone call, clones made from it answer checked
//! requests with distinct identities, a call larger than the pool takes the slower path for
//! the rest, and `/metrics` counts hits and misses.

mod api_util;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use api_util::*;
use hyper::{Method, StatusCode};
use kscope::lb::client::ApiClient;
use kscope::server::Limits;
use kscope_workloads::Workload;
use serde_json::json;

async fn metric(c: &ApiClient, name: &str) -> u64 {
    let r = c.send(Method::GET, "/metrics", None, vec![]).await.unwrap();
    let text = String::from_utf8_lossy(&r.body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pooled_clones_answer_and_metrics_count_hits_and_misses() {
    if !kvm_available() {
        return;
    }
    let sp = spec();
    let (srv, c) = start(Limits::default(), |o| o.pool = 8).await;
    assert_eq!(metric(&c, "kscope_pool_capacity").await, 8);
    let (st, vm) = call(
        &c,
        &sp,
        Method::POST,
        "/v1/vms",
        "/v1/vms",
        Some(json!({"workload": "web", "memory": "64M"})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{vm}");
    let id = vm["id"].as_str().unwrap().to_string();
    let t0 = Instant::now();
    while metric(&c, "kscope_pool_ready").await < 8 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the pool did not fill for the new parent"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut identities = HashSet::new();
    let mut total = 0;
    for n in [8, 12] {
        let (st, v) = call(
            &c,
            &sp,
            Method::POST,
            "/v1/vms/{id}/clones",
            &format!("/v1/vms/{id}/clones"),
            Some(json!({"n": n, "memory_mode": "lazy", "prefetch": "lazy"})),
        )
        .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        let clones = v["clones"].as_array().unwrap().clone();
        assert_eq!(clones.len(), n);
        total += n as u64;
        for (i, cl) in clones.iter().enumerate() {
            assert!(identities.insert(cl["identity"]["mac"].to_string()), "{cl}");
            let req = Workload::Web.requests(300 + i as u64, 1).remove(0);
            ask_web_checked(&c, cl["request_url"].as_str().unwrap(), &req).await;
        }
        let (hits, misses) = (
            metric(&c, "kscope_pool_hits_total").await,
            metric(&c, "kscope_pool_misses_total").await,
        );
        assert_eq!(hits + misses, total, "every lazy clone is a hit or a miss");
        if n == 8 {
            assert_eq!(
                (hits, misses),
                (8, 0),
                "the first call fits the filled pool"
            );
        }
    }
    // 12 from a pool of 8: the pool was refilled after the first call; what it lacked was
    // made directly; it refills again.
    let t0 = Instant::now();
    while metric(&c, "kscope_pool_ready").await < 8 {
        assert!(t0.elapsed() < Duration::from_secs(60), "no refill");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    srv.shutdown().await.unwrap();
}
