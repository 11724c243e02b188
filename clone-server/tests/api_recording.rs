//! Clones that replay a recorded working set through `kscope serve`: a lazy clone that served
//! requests is the recording (`recording_from`); `learned` clones made from it answer checked
//! requests and fetch the recording in the background; a recording from a prefetching clone,
//! from another parent's clone or from nowhere is refused with `bad_recording`. The load
//! balancer records one itself for such a policy.

mod api_util;

use std::time::Duration;

use api_util::*;
use hyper::{Method, StatusCode};
use kscope::lb::client::ApiClient;
use kscope::lb::{self, LbOptions, ScaleMode, Source};
use kscope::server::Limits;
use kscope_workloads::Workload;
use serde_json::{json, Value};

async fn post(
    c: &ApiClient,
    sp: &Spec,
    path: &str,
    template: &str,
    body: Value,
) -> (StatusCode, Value) {
    call(c, sp, Method::POST, template, path, Some(body)).await
}

async fn new_parent(c: &ApiClient, sp: &Spec) -> String {
    let (st, v) = post(
        c,
        sp,
        "/v1/vms",
        "/v1/vms",
        json!({"workload": "web", "memory": "64M"}),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    v["id"].as_str().unwrap().to_string()
}

async fn clones(c: &ApiClient, sp: &Spec, parent: &str, body: Value) -> (StatusCode, Value) {
    post(
        c,
        sp,
        &format!("/v1/vms/{parent}/clones"),
        "/v1/vms/{id}/clones",
        body,
    )
    .await
}

/// The memory statistics of VM `id`.
async fn memory(c: &ApiClient, sp: &Spec, id: &str) -> Value {
    let (st, vm) = call(
        c,
        sp,
        Method::GET,
        "/v1/vms/{id}",
        &format!("/v1/vms/{id}"),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{vm}");
    vm["stats"]["memory"].clone()
}

/// Make one clone of `parent` with `prefetch` and drive `n` checked requests through it.
async fn driven_clone(c: &ApiClient, sp: &Spec, parent: &str, prefetch: &str, n: usize) -> String {
    let (st, v) = clones(
        c,
        sp,
        parent,
        json!({"n": 1, "memory_mode": "lazy", "prefetch": prefetch}),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let cl = &v["clones"][0];
    for req in Workload::Web.requests(7, n) {
        ask_web_checked(c, cl["request_url"].as_str().unwrap(), &req).await;
    }
    cl["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn learned_clones_replay_a_lazy_clones_recording_and_bad_recordings_are_refused() {
    if !kvm_available() {
        return;
    }
    let sp = spec();
    let (srv, c) = start(Limits::default(), |_| {}).await;
    let parent = new_parent(&c, &sp).await;
    for req in Workload::Web.requests(1, 20) {
        ask_web_checked(&c, &format!("/v1/vms/{parent}/requests"), &req).await;
    }
    let recorder = driven_clone(&c, &sp, &parent, "lazy", 20).await;
    let recorded = memory(&c, &sp, &recorder).await["faults"].as_u64().unwrap();

    // Learned clones from that recording answer checked requests, and their fault servers
    // installed pages in the background (the recording) besides what they faulted on.
    let (st, v) = clones(
        &c,
        &sp,
        &parent,
        json!({"n": 2, "memory_mode": "lazy", "prefetch": "learned", "recording_from": recorder}),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    for cl in v["clones"].as_array().unwrap() {
        for req in Workload::Web.requests(7, 20) {
            ask_web_checked(&c, cl["request_url"].as_str().unwrap(), &req).await;
        }
        let mem = memory(&c, &sp, cl["id"].as_str().unwrap()).await;
        assert_eq!(mem["policy"], "lazy:learned", "{mem}");
        // The same requests as the recorder's: the background fetcher installed most of what
        // the recorder faulted on before this clone reached it.
        let (faults, pages) = (
            mem["faults"].as_u64().unwrap(),
            mem["pages_fetched"].as_u64().unwrap(),
        );
        // (0 faults of 219 recorded pages when written; 45-50 with the windows alone.)
        assert!(
            faults * 10 < recorded && pages >= recorded,
            "recording of {recorded} pages not fetched ahead: {mem}"
        );
    }

    // A prefetching clone's fault order is not a recording.
    let ahead = driven_clone(&c, &sp, &parent, "kaleidoscope", 5).await;
    let (st, v) = clones(
        &c,
        &sp,
        &parent,
        json!({"n": 1, "prefetch": "learned", "recording_from": ahead}),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_error(&v, "bad_recording");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("\"lazy\""),
        "{v}"
    );

    // Nor is another parent's clone, and learned needs one.
    let other = new_parent(&c, &sp).await;
    let (st, v) = clones(
        &c,
        &sp,
        &other,
        json!({"n": 1, "prefetch": "learned", "recording_from": recorder}),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_error(&v, "bad_recording");
    let (st, v) = clones(&c, &sp, &parent, json!({"n": 1, "prefetch": "learned"})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_error(&v, "bad_recording");
    srv.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_balancer_records_a_working_set_for_learned_clones() {
    if !kvm_available() {
        return;
    }
    let sp = spec();
    let (srv, c) = start(Limits::default(), |_| {}).await;
    let opts = LbOptions {
        api: format!("http://{}", srv.addr()),
        token: srv.token().to_string(),
        source: Source::Generate {
            pattern: lb::load::Pattern::parse("onoff:1500,1500,0.1").unwrap(),
            rate: 300.0,
            duration: Duration::from_secs(3),
            seed: 3,
        },
        min_workers: 2,
        max_workers: 3,
        scale: ScaleMode::Clone,
        prefetch: "learned".into(),
        cleanup: false,
        ..LbOptions::default()
    };
    let report = lb::run_lb(opts).await.unwrap();
    assert!(report.ok > 0, "{report}");
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    // The parent, the recording clone (lazy, not a worker) and learned workers.
    let (st, v) = call(&c, &sp, Method::GET, "/v1/vms", "/v1/vms", None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let vms = v["vms"].as_array().unwrap();
    let policy = |vm: &Value| {
        vm["stats"]["memory"]["policy"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    let workers: Vec<&str> = report.workers.iter().map(|w| w.id.as_str()).collect();
    let recorders: Vec<&Value> = vms.iter().filter(|vm| policy(vm) == "lazy:lazy").collect();
    assert_eq!(recorders.len(), 1, "{v}");
    assert!(!workers.contains(&recorders[0]["id"].as_str().unwrap()));
    let learned = vms.iter().filter(|vm| policy(vm) == "lazy:learned").count();
    assert!(learned >= 2, "{v}");
    srv.shutdown().await.unwrap();
}
