//! Cloning through the VMM: validated clone requests, and the clone API path in its visible
//! steps: freeze the parent ([`Vm::freeze`]), color the generation once if the policy needs
//! it, build the policy factory once, spawn the children ([`kscope_vmm::Generation::spawn`]).

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kscope_guest::abi::boot::Identity;
use kscope_policies::{color_generation, factory, Gfn, PolicyContext, PolicyName, PolicySpec};
use kscope_vmm::{CloneOptions, MemoryMode, Vm};
use serde::Deserialize;

use super::error::{ApiError, ApiResult};
use super::registry::{IdentityView, VmEntry};

/// Most clones one call may ask for.
pub const MAX_CLONES_PER_CALL: usize = 64;

/// Body of `POST /v1/vms/{id}/clones` (`CreateClones` in the spec).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateClones {
    /// Number of clones.
    pub n: i64,
    /// Memory mode (`lazy` or `eager`, default lazy).
    pub memory_mode: Option<String>,
    /// Prefetch policy spec (default `lazy`).
    pub prefetch: Option<String>,
    /// A lazily served clone of the same parent whose first-fault order is the recorded
    /// working set that `reap`, `faasnap` and `activeset` replay (and `learned` learns from).
    pub recording_from: Option<String>,
}

/// A validated clone request.
#[derive(Debug, Clone)]
pub struct CloneRequest {
    /// Number of clones.
    pub n: usize,
    /// Memory mode.
    pub mode: MemoryMode,
    /// Prefetch policy spec.
    pub prefetch: PolicySpec,
    /// The VM whose recorded working set the policy replays.
    pub recording_from: Option<String>,
}

impl CreateClones {
    /// Check every field.
    pub fn validate(&self) -> ApiResult<CloneRequest> {
        if self.n < 1 || self.n > MAX_CLONES_PER_CALL as i64 {
            return Err(ApiError::bad(
                "bad_clone_count",
                format!(
                    "n = {} clones: ask for 1 to {MAX_CLONES_PER_CALL} per call",
                    self.n
                ),
            ));
        }
        let mode = MemoryMode::from_str(self.memory_mode.as_deref().unwrap_or("lazy"))
            .map_err(|e| ApiError::bad("bad_memory_mode", e.to_string()))?;
        let spec = self.prefetch.as_deref().unwrap_or("lazy");
        let prefetch = PolicySpec::from_str(spec)
            .map_err(|e| ApiError::bad("unknown_policy", e.to_string()))?;
        Ok(CloneRequest {
            n: self.n as usize,
            mode,
            prefetch,
            recording_from: self.recording_from.clone(),
        })
    }
}

impl CloneRequest {
    /// Check that `recording_from` is given exactly for the policies that replay a recorded
    /// working set. A dependency between fields that the spec's schema cannot express, so it
    /// is checked after the parent is found (an unknown parent is a 404 first).
    pub fn check_recording(&self) -> ApiResult<()> {
        if self.prefetch.name.needs_recording() != self.recording_from.is_some() {
            return Err(ApiError::bad(
                "bad_recording",
                if self.recording_from.is_some() {
                    format!(
                        "recording_from is only for policies that replay a recorded working set (reap, faasnap, activeset, learned), not {}",
                        self.prefetch.name.as_str()
                    )
                } else {
                    format!(
                        "policy {} replays a recorded working set: give recording_from, the id of a lazy clone of this parent that served the requests to record",
                        self.prefetch.name.as_str()
                    )
                },
            ));
        }
        Ok(())
    }
}

/// The wire view of a clone's identity (what its guest sees).
pub fn identity_view(clone_id: u64, id: &Identity) -> IdentityView {
    let m = id.mac;
    let ip = id.ipv4;
    IdentityView {
        clone_id,
        mac: format!(
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        ),
        ip: format!("{}.{}.{}.{}", ip[0], ip[1], ip[2], ip[3]),
    }
}

/// The identity view of clone `vm`, from the VMM (`None` if it is not a clone).
pub fn identity_of(vm: &Vm) -> Option<IdentityView> {
    Some(identity_view(vm.clone_id()?, &vm.identity()?))
}

/// A clone made by the VMM, ready to be registered.
pub struct MadeClone {
    /// The child VM.
    pub vm: Vm,
    /// From the start of the freeze to the child's first instruction (the coloring step is
    /// not included).
    pub latency: Duration,
    /// Its identity.
    pub identity: Option<IdentityView>,
}

/// The result of cloning.
pub struct MadeBatch {
    /// The children.
    pub clones: Vec<MadeClone>,
    /// How long the parent was paused.
    pub parent_pause: Duration,
    /// Time spent coloring the generation (zero for `lazy`).
    pub color: Duration,
}

/// The recorded working set of `recorder` (a lazily served clone of `parent`): the frames it
/// faulted on, in first-fault order.
pub fn recording_of(parent: &VmEntry, recorder: &VmEntry) -> ApiResult<Arc<[Gfn]>> {
    if recorder.parent.as_deref() != Some(parent.id.as_str()) {
        return Err(ApiError::bad(
            "bad_recording",
            format!(
                "recording_from {} is not a clone of {}: record with a lazy clone of the same parent",
                recorder.id, parent.id
            ),
        ));
    }
    let server = recorder.vm.fault_server().ok_or_else(|| {
        ApiError::bad(
            "bad_recording",
            format!(
                "recording_from {} is not lazily served: record with a lazy clone",
                recorder.id
            ),
        )
    })?;
    // A prefetching clone's fault order misses every page its policy installed ahead.
    let policy = server.stats().policy;
    if policy != "lazy" {
        return Err(ApiError::bad(
            "bad_recording",
            format!(
                "recording_from {} is served with prefetch policy {policy}, so its fault order misses the pages that policy installed ahead: record with a clone made with \"prefetch\": \"lazy\"",
                recorder.id
            ),
        ));
    }
    let order = server.touched();
    if order.is_empty() {
        return Err(ApiError::bad(
            "bad_recording",
            format!(
                "recording_from {} has not touched any page yet: send it requests first",
                recorder.id
            ),
        ));
    }
    Ok(order.into())
}

/// Clone `parent` `req.n` times (blocking): the parent is paused for the freeze only.
pub fn make_clones(
    parent: &Arc<VmEntry>,
    req: &CloneRequest,
    recording: Option<Arc<[Gfn]>>,
    prefix: &str,
    pool: Option<Arc<kscope_vmm::pool::ShellPool>>,
) -> ApiResult<MadeBatch> {
    let t_freeze = Instant::now();
    let generation = parent
        .vm
        .freeze()
        .map_err(|e| clone_err(parent, &format!("freezing VM {}", parent.id), e))?;
    let freeze = t_freeze.elapsed();
    let t_color = Instant::now();
    let ctx = match req.prefetch.name {
        PolicyName::Lazy => None,
        _ => {
            let (map, _) = color_generation(&generation).map_err(|e| {
                ApiError::Internal(format!(
                    "coloring the generation of {} for policy {}: {e}",
                    parent.id, req.prefetch.name
                ))
            })?;
            Some(PolicyContext::new(&map))
        }
    };
    let color = t_color.elapsed();
    let prefetcher = factory(&req.prefetch, ctx, recording)
        .map_err(|e| ApiError::bad("unknown_policy", e.to_string()))?;
    let opts = CloneOptions {
        memory: req.mode,
        prefetcher,
        name_prefix: prefix.to_string(),
        pool,
        // The call answers once every clone exists: starting them together makes the last
        // one run sooner (running clones no longer slow the creation of the others).
        start_together: true,
        ..CloneOptions::default()
    };
    let batch = generation.spawn(req.n, &opts).map_err(|e| {
        clone_err(
            parent,
            &format!("creating {} clones of VM {}", req.n, parent.id),
            e,
        )
    })?;
    tracing::info!(
        parent = %parent.id,
        n = req.n,
        freeze_ms = freeze.as_secs_f64() * 1e3,
        color_ms = color.as_secs_f64() * 1e3,
        spawn_ms = batch.total.as_secs_f64() * 1e3,
        "cloned"
    );
    let clones = batch
        .children
        .into_iter()
        .zip(batch.clone_latency)
        .map(|(vm, latency)| MadeClone {
            identity: identity_of(&vm),
            vm,
            latency: freeze + latency,
        })
        .collect();
    Ok(MadeBatch {
        clones,
        parent_pause: batch.parent_pause,
        color,
    })
}

/// The API error of a failed freeze or spawn: the parent's only if its state refused the
/// operation or it is no longer healthy; otherwise a creation error (a host limit, a bad
/// generation) that never blames a healthy parent.
fn clone_err(parent: &VmEntry, what: &str, e: kscope_vmm::VmError) -> ApiError {
    match e {
        // The parent itself cannot be cloned in its state (paused is fine, failed is not).
        kscope_vmm::VmError::BadState(_) => ApiError::from_vm(&parent.id, e),
        e if !parent_ok(parent) => ApiError::from_vm(&parent.id, e),
        e => ApiError::creating(what, e),
    }
}

/// True while the parent runs or is paused (a clone failure is then not the parent's).
fn parent_ok(parent: &VmEntry) -> bool {
    matches!(
        parent.vm.state(),
        kscope_vmm::VmState::Running | kscope_vmm::VmState::Paused
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clone_requests_are_validated() {
        let ok = CreateClones {
            n: 3,
            memory_mode: Some("eager".into()),
            prefetch: Some("blind".into()),
            recording_from: None,
        };
        let r = ok.validate().unwrap();
        assert_eq!((r.n, r.mode), (3, MemoryMode::Eager));
        for (n, mode, pol, code) in [
            (0, None, None, "bad_clone_count"),
            (65, None, None, "bad_clone_count"),
            (1, Some("warm"), None, "bad_memory_mode"),
            (1, None, Some("nonsense"), "unknown_policy"),
            (1, None, Some("eager"), "unknown_policy"),
        ] {
            let e = CreateClones {
                n,
                memory_mode: mode.map(Into::into),
                prefetch: pol.map(Into::into),
                recording_from: None,
            }
            .validate()
            .unwrap_err();
            assert_eq!(e.code(), code);
        }
        let e = CreateClones {
            n: 1,
            memory_mode: None,
            prefetch: Some("kaleidoscope".into()),
            recording_from: Some("vm-2".into()),
        }
        .validate()
        .unwrap()
        .check_recording()
        .unwrap_err();
        assert_eq!(e.code(), "bad_recording");
        let e = CreateClones {
            n: 1,
            memory_mode: None,
            prefetch: Some("reap".into()),
            recording_from: None,
        }
        .validate()
        .unwrap()
        .check_recording()
        .unwrap_err();
        assert_eq!(e.code(), "bad_recording");
        let r = CreateClones {
            n: 1,
            memory_mode: None,
            prefetch: Some("faasnap".into()),
            recording_from: Some("vm-2".into()),
        }
        .validate()
        .unwrap();
        r.check_recording().unwrap();
        assert_eq!(r.recording_from.as_deref(), Some("vm-2"));
    }
}
