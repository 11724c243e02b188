//! The router and the handlers of every route of `openapi.yaml`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::{Json, Router};
use kscope_guest::abi::request::kind;
use kscope_vmm::devices::request::MAX_PAYLOAD;
use kscope_vmm::{Vm, VmConfig, VmState};
use kscope_workloads::Workload;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::clones::{self, CreateClones};
use super::error::{ApiError, ApiResult, ErrorCode};
use super::limits;
use super::registry::{request_url, RequestStats, VmEntry, VmKind};
use super::{AppState, MAX_BODY};
use kscope_vmm::summary::parse_size;

type St = State<Arc<AppState>>;

/// Every route served: `(path, methods)`, in the router's path syntax.
pub type RouteTable = Vec<(&'static str, Vec<Method>)>;

fn body_error(r: BytesRejection) -> ApiError {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge(format!(
            "the request body is larger than {MAX_BODY} bytes; send less"
        ))
    } else {
        ApiError::bad("bad_body", format!("cannot read the request body: {r}"))
    }
}

/// A JSON body: `application/json`, at most [`MAX_BODY`] bytes, unknown fields refused.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let ct = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !ct.starts_with("application/json") {
            return Err(ApiError::UnsupportedMediaType(format!(
                "content type {ct:?}: send the body as JSON with `Content-Type: application/json`"
            )));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(body_error)?;
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            ApiError::bad(
                "invalid_json",
                format!("the JSON body is invalid: {e}; see openapi.yaml for its schema"),
            )
        })
    }
}

/// A raw body of at most [`MAX_BODY`] bytes.
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Ok(RawBody(
            Bytes::from_request(req, state).await.map_err(body_error)?,
        ))
    }
}

/// Run a blocking request wait on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("a VM operation panicked: {e}")))?
}

/// Run a VM control operation (boot, clone, pause, snapshot, stop) on a thread of its own, so
/// that it never queues behind thousands of request waits on the blocking pool.
async fn control<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("kscope-control".into())
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = tx.send(r);
        })
        .map_err(|e| ApiError::Internal(format!("cannot start a control thread: {e}")))?;
    match rx.await {
        Ok(Ok(r)) => r,
        _ => Err(ApiError::Internal("a VM control operation panicked".into())),
    }
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION") }))
}

async fn list_vms(State(s): St) -> Json<serde_json::Value> {
    let vms: Vec<_> = s.registry.list().iter().map(|e| e.view()).collect();
    Json(json!({ "vms": vms }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateVm {
    workload: String,
    /// A size string ("64M") or a number of bytes (checked by [`parse_memory`]).
    memory: Option<serde_json::Value>,
    #[serde(default)]
    network: bool,
    guest_mode: Option<kscope_vmm::GuestMode>,
}

fn parse_workload(name: &str) -> ApiResult<Workload> {
    Workload::from_name(name).ok_or_else(|| {
        let all: Vec<_> = Workload::ALL.iter().map(|w| w.name()).collect();
        ApiError::bad(
            "unknown_workload",
            format!("unknown workload {name:?}: use one of {}", all.join(", ")),
        )
    })
}

/// `memory` of `CreateVm`: a size string ("64M", "1G") or an integer number of bytes, as
/// the spec says; any other JSON type is refused like a schema violation.
fn parse_memory(s: &AppState, m: Option<&serde_json::Value>) -> ApiResult<u64> {
    use serde_json::Value as V;
    let bytes = match m {
        None | Some(V::Null) => s.opts.default_mem,
        Some(V::String(t)) => parse_size(t).map_err(|e| ApiError::bad("bad_memory_size", e))?,
        Some(V::Number(n)) => n.as_u64().ok_or_else(|| {
            ApiError::bad(
                "bad_memory_size",
                format!("memory {n}: give a whole, positive number of bytes or a size like \"64M\""),
            )
        })?,
        Some(other) => {
            return Err(ApiError::bad(
                "invalid_json",
                format!("memory {other}: must be a size string like \"64M\" or an integer number of bytes; see openapi.yaml"),
            ))
        }
    };
    kscope_vmm::memory::validate_size(bytes).map_err(|e| {
        ApiError::bad(
            "bad_memory_size",
            format!(
                "memory {}: {e}; use e.g. \"64M\" or \"256M\"",
                m.map_or_else(|| "default".to_string(), |v| v.to_string())
            ),
        )
    })?;
    Ok(bytes)
}

fn count_failure(s: &AppState, e: &VmEntry) {
    if matches!(e.vm.state(), VmState::Failed(_))
        && !e.failure_counted.swap(true, Ordering::Relaxed)
    {
        s.metrics.vm_failures.fetch_add(1, Ordering::Relaxed);
    }
}

async fn create_vm(State(s): St, JsonBody(body): JsonBody<CreateVm>) -> ApiResult<Response> {
    let workload = parse_workload(&body.workload)?;
    let mem = parse_memory(&s, body.memory.as_ref())?;
    let reservation = s.registry.reserve(1, 0, mem)?;
    s.fds.check_vms(1, body.network)?;
    let id = s.registry.new_id();
    let st = s.clone();
    let vid = id.clone();
    let network = body.network;
    let entry = control(move || {
        let start = Instant::now();
        let net = if network {
            let n = kscope_vmm::net::Network::get()
                .map_err(|e| ApiError::VmFailed(format!("guest networking is unavailable: {e}")))?;
            let ident = n.boot_identity(&vid);
            Some(
                kscope_vmm::net::NetAttach::new(n, &ident)
                    .map_err(|e| ApiError::VmFailed(format!("no tap device for {vid}: {e}")))?,
            )
        } else {
            None
        };
        let vm = Vm::boot(VmConfig {
            name: vid.clone(),
            mem_bytes: mem,
            vcpus: 1,
            kernel: st.kernel(),
            cmdline: format!("init={}", workload.program_path()),
            disk: st.disk(),
            net,
            guest_mode: body
                .guest_mode
                .unwrap_or_else(kscope_vmm::GuestMode::process_default),
        })
        .map_err(|e| match e {
            kscope_vmm::VmError::ModeUnavailable(m) => ApiError::bad("guest_mode_unavailable", m),
            e => ApiError::creating(&format!("booting VM {vid}"), e),
        })?;
        if let Err(e) = vm.wait_ready(st.opts.boot_timeout) {
            st.metrics.vm_failures.fetch_add(1, Ordering::Relaxed);
            let _ = vm.stop();
            return Err(ApiError::VmFailed(format!(
                "VM {vid} running {} did not become ready: {e}",
                workload.name()
            )));
        }
        Ok(VmEntry::parent(vid, workload, vm, start.elapsed()))
    })
    .await?;
    let entry = Arc::new(entry);
    s.registry.insert(entry.clone());
    reservation.commit();
    // Its clones will want shells of its size: have them ready before the first clone call.
    if let Some(pool) = &s.pool {
        pool.prepare(kscope_vmm::pool::ShellKey {
            mem_bytes: mem,
            vcpus: entry.vm.config().vcpus,
        });
    }
    // And the standby VM of its first freeze (see `kscope_vmm::Vm::prepare_freeze`), so that
    // the first clone call does not make it; off the request path.
    let standby = entry.clone();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = standby.vm.prepare_freeze() {
            tracing::warn!(vm = %standby.id, "no standby VM for the first clone (the first clone call makes it): {e}");
        }
    });
    tracing::info!(vm = %id, workload = workload.name(), mem, "VM created");
    Ok((StatusCode::CREATED, Json(entry.view())).into_response())
}

async fn get_vm(State(s): St, Path(id): Path<String>) -> ApiResult<Response> {
    let e = s.registry.get(&id)?;
    count_failure(&s, &e);
    Ok(Json(e.view()).into_response())
}

async fn get_stats(State(s): St, Path(id): Path<String>) -> ApiResult<Response> {
    let e = s.registry.get(&id)?;
    count_failure(&s, &e);
    Ok(Json(e.stats_view()).into_response())
}

async fn delete_vm(State(s): St, Path(id): Path<String>) -> ApiResult<Response> {
    let removed = s.registry.remove_tree(&id)?;
    let ids: Vec<String> = removed.iter().map(|e| e.id.clone()).collect();
    let st = s.clone();
    control(move || {
        for e in removed {
            if let Err(err) = e.vm.stop() {
                tracing::warn!(vm = %e.id, "stop failed: {err}");
            }
            st.registry.retire(&e);
        }
        Ok(())
    })
    .await?;
    tracing::info!(vms = ?ids, "VMs deleted");
    Ok(Json(json!({ "deleted": ids })).into_response())
}

async fn pause_vm(State(s): St, Path(id): Path<String>) -> ApiResult<Response> {
    let e = s.registry.get(&id)?;
    let e2 = e.clone();
    control(move || e2.vm.pause().map_err(|err| ApiError::from_vm(&e2.id, err))).await?;
    Ok(Json(e.view()).into_response())
}

async fn resume_vm(State(s): St, Path(id): Path<String>) -> ApiResult<Response> {
    let e = s.registry.get(&id)?;
    let e2 = e.clone();
    control(move || e2.vm.resume().map_err(|err| ApiError::from_vm(&e2.id, err))).await?;
    Ok(Json(e.view()).into_response())
}

/// Decrements a VM's in-flight counter when the request ends (even if the client left).
struct InFlight(Arc<VmEntry>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn send_request(
    State(s): St,
    Path(id): Path<String>,
    RawBody(body): RawBody,
) -> ApiResult<Response> {
    let e = s.registry.get(&id)?;
    if body.len() > MAX_PAYLOAD {
        return Err(ApiError::PayloadTooLarge(format!(
            "the request is {} bytes; the request device takes at most {MAX_PAYLOAD}",
            body.len()
        )));
    }
    match e.vm.state() {
        VmState::Running => {}
        VmState::Paused => {
            return Err(ApiError::Conflict(format!(
                "VM {id} is paused; resume it with POST /v1/vms/{id}/resume first"
            )))
        }
        VmState::Booting => {
            return Err(ApiError::Conflict(format!(
                "VM {id} is still booting; retry when GET /v1/vms/{id} says running"
            )))
        }
        VmState::Failed(err) => {
            count_failure(&s, &e);
            return Err(ApiError::VmFailed(format!(
                "VM {id} has failed ({err}); delete it and create a new one"
            )));
        }
        VmState::Stopped => {
            return Err(ApiError::Conflict(format!(
                "VM {id} has stopped; delete it and create a new one"
            )))
        }
    }
    e.stats.in_flight.fetch_add(1, Ordering::Relaxed);
    let guard = InFlight(e.clone());
    let timeout = s.opts.request_timeout;
    let e2 = e.clone();
    let res = blocking(move || {
        let _guard = guard;
        e2.vm
            .request(kind::WORKLOAD, &body, timeout)
            .map_err(|err| ApiError::from_vm(&e2.id, err))
    })
    .await;
    match res {
        Ok(r) => {
            e.stats.record(r.latency);
            s.metrics.requests.fetch_add(1, Ordering::Relaxed);
            s.metrics.request_latency.observe(r.latency);
            let mut resp = r.payload.into_response();
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            h.insert("x-kscope-status", HeaderValue::from(r.status));
            h.insert(
                "x-kscope-latency-us",
                HeaderValue::from(r.latency.as_micros().min(u64::MAX as u128) as u64),
            );
            Ok(resp)
        }
        Err(_) if e.deleted.load(Ordering::Acquire) => {
            e.stats.errors.fetch_add(1, Ordering::Relaxed);
            s.metrics.request_errors.fetch_add(1, Ordering::Relaxed);
            Err(ApiError::Gone(format!(
                "VM {id} was deleted (DELETE /v1/vms/{id}) while this request was in flight; send it to another VM"
            )))
        }
        Err(err) => {
            e.stats.errors.fetch_add(1, Ordering::Relaxed);
            s.metrics.request_errors.fetch_add(1, Ordering::Relaxed);
            count_failure(&s, &e);
            Err(err)
        }
    }
}

async fn create_clones(
    State(s): St,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<CreateClones>,
) -> ApiResult<Response> {
    let start = Instant::now();
    let req = body.validate()?;
    let parent = s.registry.get(&id)?;
    req.check_recording()?;
    let recording = match &req.recording_from {
        Some(r) => Some(clones::recording_of(&parent, &*s.registry.get(r)?)?),
        None => None,
    };
    let lazy = req.mode == kscope_vmm::MemoryMode::Lazy;
    let charge = limits::charge_of(parent.mem_bytes, lazy, s.registry.limits().overcommit);
    let mut reservation = s
        .registry
        .reserve(0, req.n, charge.saturating_mul(req.n as u64))?;
    s.fds.check_vms(req.n, parent.vm.net_attach().is_some())?;
    let generation = s.registry.new_generation();
    let prefix = format!("{}-g{generation}-", parent.id);
    let (p2, r2, pool) = (parent.clone(), req.clone(), s.pool.clone());
    let batch = control(move || clones::make_clones(&p2, &r2, recording, &prefix, pool)).await?;
    let made = batch.clones.len();
    reservation.shrink_clones(req.n - made.min(req.n), charge);
    let policy = format!("{}:{}", req.mode, req.prefetch.name);
    let mut out = Vec::with_capacity(made);
    for c in batch.clones {
        let cid = s.registry.new_id();
        let address = c.vm.net_address().map(|a| a.to_string());
        let entry = Arc::new(VmEntry {
            id: cid.clone(),
            kind: VmKind::Clone,
            parent: Some(parent.id.clone()),
            workload: parent.workload,
            mem_bytes: parent.mem_bytes,
            vm: c.vm,
            identity: c.identity.clone(),
            boot: c.latency,
            stats: RequestStats::default(),
            children: Default::default(),
            policy: Some(policy.clone()),
            failure_counted: Default::default(),
            charge,
            deleted: Default::default(),
        });
        s.registry.insert(entry);
        out.push(json!({
            "id": cid,
            "identity": c.identity,
            "request_url": request_url(&cid),
            "address": address,
            "clone_ms": c.latency.as_secs_f64() * 1e3,
        }));
    }
    reservation.commit();
    s.metrics
        .clones_created
        .fetch_add(made as u64, Ordering::Relaxed);
    s.metrics.clone_latency.observe(start.elapsed());
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "parent": parent.id,
            "parent_pause_ms": batch.parent_pause.as_secs_f64() * 1e3,
            "clones": out,
        })),
    )
        .into_response())
}

fn snapshot_name(name: &str) -> ApiResult<()> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad(
            "bad_snapshot_name",
            format!("snapshot name {name:?}: use 1 to 64 letters, digits, '-' or '_'"),
        ))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSnapshot {
    name: String,
}

/// What the service stores next to a VMM snapshot to restore it as a parent.
#[derive(Serialize, Deserialize)]
struct SnapshotMeta {
    workload: String,
    memory_bytes: u64,
    vm: String,
}

const META_FILE: &str = "service.json";

fn snapshot_dir(s: &AppState, name: &str) -> std::path::PathBuf {
    s.state_dir.join("snapshots").join(name)
}

fn snap_error(what: &str, e: kscope_vmm::VmError) -> ApiError {
    use kscope_vmm::VmError as E;
    match e {
        E::BadState { .. } => ApiError::Conflict(format!("{what}: {e}")),
        E::SnapshotCorrupt { .. } | E::SnapshotIncompatible { .. } => {
            ApiError::bad("bad_snapshot", format!("{what}: {e}; take a new snapshot"))
        }
        _ => ApiError::Internal(format!("{what}: {e}")),
    }
}

async fn create_snapshot(
    State(s): St,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<CreateSnapshot>,
) -> ApiResult<Response> {
    snapshot_name(&body.name)?;
    let e = s.registry.get(&id)?;
    let dir = snapshot_dir(&s, &body.name);
    let name = body.name.clone();
    let report = control(move || {
        let r =
            e.vm.snapshot(&dir)
                .map_err(|err| snap_error(&format!("snapshot of VM {}", e.id), err))?;
        let meta = SnapshotMeta {
            workload: e.workload.name().into(),
            memory_bytes: e.mem_bytes,
            vm: e.id.clone(),
        };
        let text = serde_json::to_vec(&meta).map_err(|err| ApiError::Internal(err.to_string()))?;
        std::fs::write(dir.join(META_FILE), text).map_err(|err| {
            ApiError::Internal(format!("writing {}: {err}", dir.join(META_FILE).display()))
        })?;
        Ok(r)
    })
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "name": name,
            "vm": id,
            "path": report.dir.display().to_string(),
            "memory_bytes": report.memory.pages * 4096,
            "pause_ms": report.pause.as_secs_f64() * 1e3,
            "total_ms": report.total.as_secs_f64() * 1e3,
        })),
    )
        .into_response())
}

async fn restore_snapshot(State(s): St, Path(name): Path<String>) -> ApiResult<Response> {
    snapshot_name(&name)?;
    let dir = snapshot_dir(&s, &name);
    let meta: SnapshotMeta = match std::fs::read(dir.join(META_FILE)) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| {
            ApiError::bad(
                "bad_snapshot",
                format!("snapshot {name:?}: {META_FILE} is corrupt ({e}); take a new snapshot"),
            )
        })?,
        Err(_) => {
            return Err(ApiError::NotFound(format!(
                "no snapshot {name:?} in {}; create one with POST /v1/vms/{{id}}/snapshots",
                dir.display()
            )))
        }
    };
    let workload = parse_workload(&meta.workload)?;
    let reservation = s.registry.reserve(1, 0, meta.memory_bytes)?;
    s.fds.check(1)?;
    let id = s.registry.new_id();
    let vid = id.clone();
    let entry = control(move || {
        let t0 = Instant::now();
        let vm = Vm::restore(&dir, kscope_vmm::MemoryMode::Lazy, &vid)
            .map_err(|e| snap_error(&format!("restoring snapshot {name:?}"), e))?;
        Ok(VmEntry::parent(vid, workload, vm, t0.elapsed()))
    })
    .await?;
    let entry = Arc::new(entry);
    s.registry.insert(entry.clone());
    reservation.commit();
    tracing::info!(vm = %id, "VM restored from a snapshot");
    Ok((StatusCode::CREATED, Json(entry.view())).into_response())
}

async fn metrics(State(s): St) -> Response {
    let mut g = s.registry.gauges();
    g.open_files = limits::open_fds();
    g.open_files_limit = s.fds.limit();
    if let Some(pool) = &s.pool {
        g.pool = pool.stats();
    }
    let text = s.metrics.render(&g);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        text,
    )
        .into_response()
}

async fn no_route(req: Request) -> ApiError {
    ApiError::NoRoute(format!(
        "no route {} {}; the routes are listed in openapi.yaml",
        req.method(),
        req.uri().path()
    ))
}

async fn wrong_method(req: Request) -> ApiError {
    ApiError::MethodNotAllowed(format!(
        "{} is not allowed on {}; see openapi.yaml for the methods of each route",
        req.method(),
        req.uri().path()
    ))
}

async fn count_errors(State(s): St, req: Request, next: Next) -> Response {
    let r = next.run(req).await;
    if let Some(ErrorCode(code)) = r.extensions().get::<ErrorCode>() {
        s.metrics.api_error(code);
    }
    r
}

struct Routes {
    router: Router<Arc<AppState>>,
    table: RouteTable,
}

impl Routes {
    fn add(
        mut self,
        path: &'static str,
        methods: &[Method],
        r: MethodRouter<Arc<AppState>>,
    ) -> Self {
        self.router = self.router.route(path, r);
        self.table.push((path, methods.to_vec()));
        self
    }
}

/// The service's router (with auth, body limit and error counting) and its route table.
pub fn router(state: Arc<AppState>, token: Arc<str>) -> (Router, RouteTable) {
    use Method as M;
    let r = Routes {
        router: Router::new(),
        table: Vec::new(),
    }
    .add("/v1/health", &[M::GET], get(health))
    .add("/v1/vms", &[M::GET, M::POST], get(list_vms).post(create_vm))
    .add(
        "/v1/vms/{id}",
        &[M::GET, M::DELETE],
        get(get_vm).delete(delete_vm),
    )
    .add("/v1/vms/{id}/pause", &[M::POST], post(pause_vm))
    .add("/v1/vms/{id}/resume", &[M::POST], post(resume_vm))
    .add("/v1/vms/{id}/clones", &[M::POST], post(create_clones))
    .add("/v1/vms/{id}/requests", &[M::POST], post(send_request))
    .add("/v1/vms/{id}/snapshots", &[M::POST], post(create_snapshot))
    .add(
        "/v1/snapshots/{name}/restore",
        &[M::POST],
        post(restore_snapshot),
    )
    .add("/v1/vms/{id}/stats", &[M::GET], get(get_stats))
    .add("/metrics", &[M::GET], get(metrics));
    let app = r
        .router
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(
            token,
            super::auth::require_token,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), count_errors))
        .with_state(state);
    (app, r.table)
}
