//! The service under real limits (issue 10), with real VMs: the open-file budget answers 503
//! with the reason and spares a healthy parent, a deleted VM answers its in-flight requests
//! with 410, fault counters never fall when VMs are deleted, and lazy clones can overcommit
//! guest memory. Every answer is checked against `openapi.yaml`.

mod api_util;

use std::time::Duration;

use api_util::*;
use hyper::{Method, StatusCode};
use kscope::lb::client::ApiClient;
use kscope::server::limits::{open_fds, FDS_PER_CLONE, FD_RESERVE};
use kscope::server::Limits;
use kscope_workloads::Workload;
use serde_json::{json, Value};

/// The tests of this file count the process's descriptors: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn create(c: &ApiClient, sp: &Spec, body: Value) -> String {
    let (st, v) = call(c, sp, Method::POST, "/v1/vms", "/v1/vms", Some(body)).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    v["id"].as_str().unwrap().to_string()
}

async fn clones(c: &ApiClient, sp: &Spec, id: &str, body: Value) -> (StatusCode, Value) {
    call(
        c,
        sp,
        Method::POST,
        "/v1/vms/{id}/clones",
        &format!("/v1/vms/{id}/clones"),
        Some(body),
    )
    .await
}

async fn request(c: &ApiClient, sp: &Spec, id: &str, body: Vec<u8>) -> StatusCode {
    let r = c
        .send(
            Method::POST,
            &format!("/v1/vms/{id}/requests"),
            Some("application/octet-stream"),
            body,
        )
        .await
        .unwrap();
    sp.check(&Method::POST, "/v1/vms/{id}/requests", &r);
    r.status
}

async fn metric(c: &ApiClient, name: &str) -> u64 {
    let r = c.send(Method::GET, "/metrics", None, vec![]).await.unwrap();
    let text = String::from_utf8_lossy(&r.body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
        .parse()
        .unwrap()
}

async fn delete(c: &ApiClient, sp: &Spec, id: &str) {
    let (st, v) = call(
        c,
        sp,
        Method::DELETE,
        "/v1/vms/{id}",
        &format!("/v1/vms/{id}"),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fd_budget_answers_503_spares_the_parent_and_counters_never_fall() {
    if !kvm_available() {
        return;
    }
    let _one = SERIAL.lock().await;
    let sp = spec();
    let (srv, c) = start(Limits::default(), |_| {}).await;
    // The soft limit was raised toward the hard one at start.
    let limit = metric(&c, "kscope_open_files_limit").await;
    let mut hard = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct it is given.
    let r = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut hard) };
    assert_eq!(r, 0);
    assert_eq!(limit, hard.rlim_max.min(1 << 20), "soft limit not raised");

    let parent = create(&c, &sp, json!({"workload": "web", "memory": "64M"})).await;
    let req = Workload::Web.requests(5, 1).remove(0);
    // Descriptors per clone, measured.
    let before = open_fds();
    let links = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .map(|p| p.display().to_string())
            .collect();
        v.sort();
        v
    };
    let l0 = links();
    let (st, v) = clones(&c, &sp, &parent, json!({"n": 4})).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let per = (open_fds() - before) as f64 / 4.0;
    let mut l1 = links();
    for x in &l0 {
        if let Some(i) = l1.iter().position(|y| y == x) {
            l1.remove(i);
        }
    }
    println!("new descriptors: {l1:?}");
    println!("open files per lazy clone: {per}");
    assert!(
        per <= FDS_PER_CLONE as f64,
        "{per} fds per clone, budget assumes {FDS_PER_CLONE}"
    );
    let kids: Vec<String> = v["clones"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_string())
        .collect();
    for k in &kids {
        assert_eq!(request(&c, &sp, k, req.clone()).await, StatusCode::OK);
    }

    // A budget with room for two more clones: eight are refused with 503 and the numbers,
    // nothing is created, and the parent is not blamed.
    srv.state()
        .fds
        .set_limit(open_fds() + FD_RESERVE + 2 * FDS_PER_CLONE + FDS_PER_CLONE / 2);
    let (st, v) = clones(&c, &sp, &parent, json!({"n": 8})).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_error(&v, "host_limit");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("open files") && msg.contains("No VM failed"),
        "{msg}"
    );
    assert!(!msg.contains("delete it"), "{msg}");
    let (st, v) = call(
        &c,
        &sp,
        Method::GET,
        "/v1/vms/{id}",
        &format!("/v1/vms/{parent}"),
        None,
    )
    .await;
    assert_eq!((st, v["state"].as_str()), (StatusCode::OK, Some("running")));
    assert_eq!(
        v["clones"].as_array().unwrap().len(),
        4,
        "nothing was created"
    );
    assert_eq!(request(&c, &sp, &parent, req.clone()).await, StatusCode::OK);
    let (st, v) = clones(&c, &sp, &parent, json!({"n": 2})).await;
    assert_eq!(st, StatusCode::CREATED, "two fit: {v}");
    srv.state().fds.set_limit(limit);

    // Counters stay monotonic when the clones that produced them are deleted.
    let faults = metric(&c, "kscope_faults_total").await;
    let pages = metric(&c, "kscope_pages_fetched_total").await;
    assert!(faults > 0 && pages > 0);
    for k in &kids {
        delete(&c, &sp, k).await;
        let f = metric(&c, "kscope_faults_total").await;
        let p = metric(&c, "kscope_pages_fetched_total").await;
        assert!(
            f >= faults && p >= pages,
            "counters fell: {faults} -> {f}, {pages} -> {p}"
        );
    }
    delete(&c, &sp, &parent).await;
    assert!(metric(&c, "kscope_faults_total").await >= faults);
    srv.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_vm_answers_in_flight_requests_with_410() {
    if !kvm_available() {
        return;
    }
    let _one = SERIAL.lock().await;
    let sp = spec();
    let (srv, c) = start(Limits::default(), |_| {}).await;
    let id = create(&c, &sp, json!({"workload": "olap"})).await;
    // TPC-H queries take long enough to be in flight when the DELETE comes.
    let queries: Vec<Vec<u8>> = Workload::Olap
        .requests(3, 40)
        .into_iter()
        .filter(|r| r.starts_with(b"Q1") || r.starts_with(b"Q18"))
        .take(4)
        .collect();
    assert!(!queries.is_empty());
    let mut pending = Vec::new();
    for q in queries {
        let (c, id) = (c.clone(), id.clone());
        pending.push(tokio::spawn(async move {
            c.send(
                Method::POST,
                &format!("/v1/vms/{id}/requests"),
                Some("application/octet-stream"),
                q,
            )
            .await
            .unwrap()
        }));
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    delete(&c, &sp, &id).await;
    let mut gone = 0;
    for p in pending {
        let r = p.await.unwrap();
        let v = sp.check(&Method::POST, "/v1/vms/{id}/requests", &r);
        match r.status {
            StatusCode::OK => {}
            StatusCode::GONE => {
                assert_error(&v, "vm_deleted");
                assert!(
                    v["error"]["message"].as_str().unwrap().contains("deleted"),
                    "{v}"
                );
                gone += 1;
            }
            // Sent after the DELETE removed it.
            StatusCode::NOT_FOUND => assert_error(&v, "not_found"),
            s => panic!("in-flight request on a deleted VM answered {s}: {v}"),
        }
    }
    assert!(gone > 0, "no request was in flight when the VM was deleted");
    srv.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lazy_clones_are_charged_with_overcommit() {
    if !kvm_available() {
        return;
    }
    let _one = SERIAL.lock().await;
    let sp = spec();
    let limits = Limits {
        max_guest_mem: 256 << 20,
        overcommit: 8.0,
        ..Limits::default()
    };
    let (srv, c) = start(limits, |_| {}).await;
    // 64 MiB parent + 16 lazy clones at 8 MiB each = 192 MiB of 256: fits (nominal: 1088).
    let parent = create(&c, &sp, json!({"workload": "web", "memory": 67108864})).await;
    for _ in 0..2 {
        let (st, v) = clones(&c, &sp, &parent, json!({"n": 8, "memory_mode": "lazy"})).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
    }
    let (st, v) = call(
        &c,
        &sp,
        Method::GET,
        "/v1/vms/{id}",
        &format!("/v1/vms/{parent}"),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let kid = v["clones"][0].as_str().unwrap().to_string();
    let req = Workload::Web.requests(5, 1).remove(0);
    assert_eq!(request(&c, &sp, &kid, req).await, StatusCode::OK);
    // Eager clones are charged in full: two (128 MiB) no longer fit.
    let (st, v) = clones(&c, &sp, &parent, json!({"n": 2, "memory_mode": "eager"})).await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("overcommit ratio 8"), "{msg}");
    assert_eq!(metric(&c, "kscope_guest_memory_bytes").await, 192 << 20);
    srv.shutdown().await.unwrap();
}
