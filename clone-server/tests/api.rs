//! System tests of `kscope serve` with real VMs (KVM): a real HTTP client (hyper) against the
//! real service started in-process on 127.0.0.1:0 with a temporary state directory. Every
//! answer is checked against `openapi.yaml` (documented status, required JSON fields).

mod api_util;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use api_util::*;
use hyper::{Method, StatusCode};
use kscope::server::Limits;
use kscope_vmm::summary::LatencySummary;
use kscope_workloads::Workload;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limits_answer_429() {
    if !kvm_available() {
        return;
    }
    let sp = spec();
    let limits = Limits {
        max_vms: 1,
        max_clones: 2,
        max_guest_mem: 160 << 20,
        ..Limits::default()
    };
    let (srv, c) = start(limits, |_| {}).await;
    // More memory than the service allows, before any VM exists.
    let (st, v) = call(
        &c,
        &sp,
        Method::POST,
        "/v1/vms",
        "/v1/vms",
        Some(json!({"workload": "web", "memory": "256M"})),
    )
    .await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS);
    assert_error(&v, "limit_exceeded");
    let (st, v) = call(
        &c,
        &sp,
        Method::POST,
        "/v1/vms",
        "/v1/vms",
        Some(json!({"workload": "web", "memory": "64M"})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let (st, v) = call(
        &c,
        &sp,
        Method::POST,
        "/v1/vms",
        "/v1/vms",
        Some(json!({"workload": "olap"})),
    )
    .await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS);
    assert_error(&v, "limit_exceeded");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--max-vms"));
    // Clones: 3 > max_clones.
    let tc = "/v1/vms/{id}/clones";
    let (st, v) = call(
        &c,
        &sp,
        Method::POST,
        tc,
        &format!("/v1/vms/{id}/clones"),
        Some(json!({"n": 3})),
    )
    .await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_error(&v, "limit_exceeded");
    // Clones within max_clones but over the memory limit (64M + 2 x 64M > 160M).
    let (st, v) = call(
        &c,
        &sp,
        Method::POST,
        tc,
        &format!("/v1/vms/{id}/clones"),
        Some(json!({"n": 2})),
    )
    .await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("memory"));
    // Deleting frees the capacity.
    let (st, _) = call(
        &c,
        &sp,
        Method::DELETE,
        "/v1/vms/{id}",
        &format!("/v1/vms/{id}"),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let (st, v) = call(
        &c,
        &sp,
        Method::POST,
        "/v1/vms",
        "/v1/vms",
        Some(json!({"workload": "json"})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    srv.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whole_lifecycle_of_a_web_vm() {
    if !kvm_available() {
        return;
    }
    let sp = spec();
    let (srv, c) = start(Limits::default(), |_| {}).await;
    let t0 = Instant::now();
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
    eprintln!("create web VM: {:?}", t0.elapsed());
    let id = vm["id"].as_str().unwrap().to_string();
    assert_eq!(vm["kind"], "parent");
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["memory_bytes"], 64 << 20);
    assert_eq!(vm["workload"], "web");
    let url = vm["request_url"].as_str().unwrap().to_string();
    assert_eq!(url, format!("/v1/vms/{id}/requests"));

    let (st, list) = call(&c, &sp, Method::GET, "/v1/vms", "/v1/vms", None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(list["vms"].as_array().unwrap().len(), 1);

    // Requests through the API, checked against the host's recomputation.
    let tr = "/v1/vms/{id}/requests";
    for req in Workload::Web.requests(5, 20) {
        let r = c
            .send(
                Method::POST,
                &url,
                Some("application/octet-stream"),
                req.clone(),
            )
            .await
            .unwrap();
        sp.check(&Method::POST, tr, &r);
        assert_eq!(r.status, StatusCode::OK);
        let status: u32 = r.headers["x-kscope-status"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(r.headers.contains_key("x-kscope-latency-us"));
        if status == 0 {
            Workload::Web.check(&req, &r.body).unwrap_or_else(|e| {
                panic!("wrong answer to {:?}: {e}", String::from_utf8_lossy(&req))
            });
        }
    }

    // Pause: requests are refused with 409 until resume.
    let (st, v) = call(
        &c,
        &sp,
        Method::POST,
        "/v1/vms/{id}/pause",
        &format!("/v1/vms/{id}/pause"),
        None,
    )
    .await;
    assert_eq!((st, v["state"].as_str()), (StatusCode::OK, Some("paused")));
    let (st, v) = call(
        &c,
        &sp,
        Method::POST,
        "/v1/vms/{id}/pause",
        &format!("/v1/vms/{id}/pause"),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::CONFLICT);
    assert_error(&v, "conflict");
    let r = c
        .send(
            Method::POST,
            &url,
            Some("application/octet-stream"),
            web_request(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_error(&sp.check(&Method::POST, tr, &r), "conflict");
    let (st, v) = call(
        &c,
        &sp,
        Method::POST,
        "/v1/vms/{id}/resume",
        &format!("/v1/vms/{id}/resume"),
        None,
    )
    .await;
    assert_eq!((st, v["state"].as_str()), (StatusCode::OK, Some("running")));
    let r = c
        .send(
            Method::POST,
            &url,
            Some("application/octet-stream"),
            web_request(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        String::from_utf8_lossy(&r.body).starts_with("HTTP/1.1 200"),
        "{:?}",
        r.body
    );

    // Stats and metrics.
    let (st, stats) = call(
        &c,
        &sp,
        Method::GET,
        "/v1/vms/{id}/stats",
        &format!("/v1/vms/{id}/stats"),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(stats["requests"], 21);
    assert_eq!(stats["errors"], 0);
    assert_eq!(stats["latency"]["count"], 21);
    assert!(stats["latency"]["p50_us"].as_f64().unwrap() > 0.0);
    let (_, vm) = call(
        &c,
        &sp,
        Method::GET,
        "/v1/vms/{id}",
        &format!("/v1/vms/{id}"),
        None,
    )
    .await;
    assert_eq!(vm["stats"]["requests"], 21);
    let r = c.send(Method::GET, "/metrics", None, vec![]).await.unwrap();
    sp.check(&Method::GET, "/metrics", &r);
    let text = String::from_utf8_lossy(&r.body);
    for line in [
        "kscope_vms 1",
        "kscope_requests_total 21",
        "kscope_request_latency_seconds_count 21",
        "kscope_guest_memory_bytes 67108864",
        "kscope_clones 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }

    // Clones: each answers requests, has its own identity and lazy-memory statistics.
    let (st, v) = call(
        &c,
        &sp,
        Method::POST,
        "/v1/vms/{id}/clones",
        &format!("/v1/vms/{id}/clones"),
        Some(json!({"n": 2, "memory_mode": "lazy", "prefetch": "lazy"})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert!(v["parent_pause_ms"].as_f64().unwrap() > 0.0);
    let clones = v["clones"].as_array().unwrap().clone();
    assert_eq!(clones.len(), 2);
    assert_ne!(clones[0]["identity"]["mac"], clones[1]["identity"]["mac"]);
    assert_ne!(clones[0]["identity"]["ip"], clones[1]["identity"]["ip"]);
    for cl in &clones {
        let req = Workload::Web.requests(77, 1).remove(0);
        ask_web_checked(&c, cl["request_url"].as_str().unwrap(), &req).await;
        let (_, cv) = call(
            &c,
            &sp,
            Method::GET,
            "/v1/vms/{id}",
            &format!("/v1/vms/{}", cl["id"].as_str().unwrap()),
            None,
        )
        .await;
        assert_eq!(cv["kind"], "clone");
        assert_eq!(cv["parent"], id.as_str());
        assert_eq!(cv["identity"], cl["identity"]);
        assert_eq!(cv["stats"]["memory"]["lazy"], true);
        assert!(
            cv["stats"]["memory"]["faults"].as_u64().unwrap() > 0,
            "{cv}"
        );
        assert!(
            cv["stats"]["memory"]["pages_fetched"].as_u64().unwrap() > 0,
            "{cv}"
        );
    }
    let (_, pv) = call(
        &c,
        &sp,
        Method::GET,
        "/v1/vms/{id}",
        &format!("/v1/vms/{id}"),
        None,
    )
    .await;
    assert_eq!(pv["clones"].as_array().unwrap().len(), 2);
    // A colored policy and eager memory work too.
    for body in [
        json!({"n": 1, "prefetch": "kaleidoscope"}),
        json!({"n": 1, "memory_mode": "eager"}),
    ] {
        let (st, v) = call(
            &c,
            &sp,
            Method::POST,
            "/v1/vms/{id}/clones",
            &format!("/v1/vms/{id}/clones"),
            Some(body.clone()),
        )
        .await;
        assert_eq!(st, StatusCode::CREATED, "{body}: {v}");
        let url = v["clones"][0]["request_url"].as_str().unwrap();
        let r = c
            .send(
                Method::POST,
                url,
                Some("application/octet-stream"),
                web_request(),
            )
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::OK, "{body}");
    }
    let r = c.send(Method::GET, "/metrics", None, vec![]).await.unwrap();
    let text = String::from_utf8_lossy(&r.body);
    assert!(text.lines().any(|l| l == "kscope_clones 4"), "{text}");
    assert!(
        text.lines()
            .any(|l| l == "kscope_clone_latency_seconds_count 3"),
        "{text}"
    );

    // Snapshot, then restore it as a new parent that answers requests.
    let (st, v) = call(
        &c,
        &sp,
        Method::POST,
        "/v1/vms/{id}/snapshots",
        &format!("/v1/vms/{id}/snapshots"),
        Some(json!({"name": "s1"})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert!(std::path::Path::new(v["path"].as_str().unwrap()).is_dir());
    let (st, rv) = call(
        &c,
        &sp,
        Method::POST,
        "/v1/snapshots/{name}/restore",
        "/v1/snapshots/s1/restore",
        None,
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{rv}");
    assert_eq!(
        (rv["kind"].as_str(), rv["workload"].as_str()),
        (Some("parent"), Some("web"))
    );
    let r = c
        .send(
            Method::POST,
            rv["request_url"].as_str().unwrap(),
            Some("application/octet-stream"),
            web_request(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&r.body).starts_with("HTTP/1.1 200"));
    let rid = rv["id"].as_str().unwrap();
    let (st, _) = call(
        &c,
        &sp,
        Method::DELETE,
        "/v1/vms/{id}",
        &format!("/v1/vms/{rid}"),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let expect_deleted = 5;

    // Destroy (with its clones).
    let (st, v) = call(
        &c,
        &sp,
        Method::DELETE,
        "/v1/vms/{id}",
        &format!("/v1/vms/{id}"),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        v["deleted"].as_array().unwrap().len(),
        expect_deleted,
        "{v}"
    );
    let (st, _) = call(
        &c,
        &sp,
        Method::GET,
        "/v1/vms/{id}",
        &format!("/v1/vms/{id}"),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let r = c.send(Method::GET, "/metrics", None, vec![]).await.unwrap();
    assert!(String::from_utf8_lossy(&r.body)
        .lines()
        .any(|l| l == "kscope_guest_memory_bytes 0"));
    srv.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_requests_and_clone_calls() {
    if !kvm_available() {
        return;
    }
    let sp = spec();
    let (srv, c) = start(
        Limits {
            max_vms: 4,
            max_clones: 64,
            max_guest_mem: 16 << 30,
            ..Limits::default()
        },
        |_| {},
    )
    .await;
    let (st, vm) = call(
        &c,
        &sp,
        Method::POST,
        "/v1/vms",
        "/v1/vms",
        Some(json!({"workload": "web"})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{vm}");
    let id = vm["id"].as_str().unwrap().to_string();
    let reqs = Workload::Web.requests(9, 50);
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for req in reqs {
        let (c, url) = (c.clone(), format!("/v1/vms/{id}/requests"));
        tasks.spawn(async move { ask_web_checked(&c, &url, &req).await });
    }
    let mut n = 0;
    while let Some(res) = tasks.join_next().await {
        res.unwrap();
        n += 1;
    }
    assert_eq!(n, 50);
    eprintln!("50 concurrent requests: {:?}", t0.elapsed());

    // 50 concurrent clone calls of one clone each.
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let (c, path) = (c.clone(), format!("/v1/vms/{id}/clones"));
        tasks.spawn(async move {
            let t = Instant::now();
            let r = c
                .send(
                    Method::POST,
                    &path,
                    Some("application/json"),
                    br#"{"n":1}"#.to_vec(),
                )
                .await
                .unwrap();
            (r, t.elapsed())
        });
    }
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    let mut lat = Vec::new();
    let mut clone_ids = Vec::new();
    while let Some(res) = tasks.join_next().await {
        let (r, d) = res.unwrap();
        let v = sp.check(&Method::POST, "/v1/vms/{id}/clones", &r);
        *by_status.entry(r.status.as_u16()).or_default() += 1;
        if r.status == StatusCode::CREATED {
            lat.push(d);
            clone_ids.push(v["clones"][0]["id"].as_str().unwrap().to_string());
        } else {
            panic!("clone call failed: {} {v}", r.status);
        }
    }
    eprintln!(
        "50 concurrent clone calls in {:?}: {by_status:?}",
        t0.elapsed()
    );
    {
        let s = LatencySummary::of(&lat);
        eprintln!(
            "clone call latency under 50-way concurrency: p50 {:.1} ms p99 {:.1} ms",
            s.p50_us / 1e3,
            s.p99_us / 1e3
        );
        assert_eq!(lat.len(), 50);
        for cid in clone_ids.iter().take(5) {
            let r = c
                .send(
                    Method::POST,
                    &format!("/v1/vms/{cid}/requests"),
                    Some("application/octet-stream"),
                    web_request(),
                )
                .await
                .unwrap();
            assert_eq!(r.status, StatusCode::OK);
        }
    }
    // The service is healthy and the parent still answers.
    let r = c
        .send(
            Method::POST,
            &format!("/v1/vms/{id}/requests"),
            Some("application/octet-stream"),
            web_request(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    srv.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_vm_does_not_take_the_service_down_and_shutdown_stops_vms() {
    if !kvm_available() {
        return;
    }
    let sp = spec();
    // A request timeout far below what a TPC-H Q1 takes: the watchdog fails the VM.
    let (srv, c) = start(Limits::default(), |o| {
        o.request_timeout = Duration::from_micros(200)
    })
    .await;
    let (st, vm) = call(
        &c,
        &sp,
        Method::POST,
        "/v1/vms",
        "/v1/vms",
        Some(json!({"workload": "olap"})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{vm}");
    let id = vm["id"].as_str().unwrap().to_string();
    let (st, other) = call(
        &c,
        &sp,
        Method::POST,
        "/v1/vms",
        "/v1/vms",
        Some(json!({"workload": "json"})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{other}");
    let q1 = Workload::Olap
        .requests(3, 40)
        .into_iter()
        .find(|r| r.starts_with(b"Q1"))
        .expect("a Q1 in the olap mix");
    let tr = "/v1/vms/{id}/requests";
    let r = c
        .send(
            Method::POST,
            &format!("/v1/vms/{id}/requests"),
            Some("application/octet-stream"),
            q1.clone(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{:?}", r.body);
    assert_error(&sp.check(&Method::POST, tr, &r), "vm_failed");
    let (_, v) = call(
        &c,
        &sp,
        Method::GET,
        "/v1/vms/{id}",
        &format!("/v1/vms/{id}"),
        None,
    )
    .await;
    assert_eq!(v["state"], "failed");
    assert!(v["error"].as_str().unwrap().contains("unresponsive"), "{v}");
    assert_eq!(v["stats"]["errors"], 1);
    let r = c
        .send(
            Method::POST,
            &format!("/v1/vms/{id}/requests"),
            Some("application/octet-stream"),
            q1,
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    // The service and the other VM are fine.
    let (st, _) = call(&c, &sp, Method::GET, "/v1/health", "/v1/health", None).await;
    assert_eq!(st, StatusCode::OK);
    let (st, v) = call(
        &c,
        &sp,
        Method::GET,
        "/v1/vms/{id}",
        &format!("/v1/vms/{}", other["id"].as_str().unwrap()),
        None,
    )
    .await;
    assert_eq!((st, v["state"].as_str()), (StatusCode::OK, Some("running")));
    let r = c.send(Method::GET, "/metrics", None, vec![]).await.unwrap();
    let text = String::from_utf8_lossy(&r.body);
    assert!(
        text.lines().any(|l| l == "kscope_vm_failures_total 1"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l == "kscope_vms_by_state{state=\"failed\"} 1"),
        "{text}"
    );

    // Shutdown stops every VM.
    let entries = srv.state().registry.list();
    assert_eq!(entries.len(), 2);
    srv.shutdown().await.unwrap();
    for e in entries {
        assert!(
            matches!(
                e.vm.state(),
                kscope_vmm::VmState::Stopped | kscope_vmm::VmState::Failed(_)
            ),
            "{} still {:?}",
            e.id,
            e.vm.state()
        );
    }
}
