//! Cloning through the VMM: validated clone requests, identities, and the call into
//! `kscope_vmm`'s clone API.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use kscope_guest::abi::boot::{GenPage, GENPAGE_MAGIC};
use kscope_guest::abi::from_bytes;
use kscope_guest::abi::layout::GENPAGE_GPA;
use kscope_policies::{PolicyName, PolicySpec};
use kscope_vmm::{CloneOptions, PrefetcherFactory, Vm};
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ApiResult};
use super::registry::{Identity, VmEntry};

/// Most clones one call may ask for.
pub const MAX_CLONES_PER_CALL: usize = 64;

/// How a clone's memory is populated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MemoryMode {
    /// On demand (userfaultfd) with the prefetch policy.
    #[default]
    Lazy,
    /// Copied before the clone resumes.
    Eager,
}

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
        let mode = match self.memory_mode.as_deref().unwrap_or("lazy") {
            "lazy" => MemoryMode::Lazy,
            "eager" => MemoryMode::Eager,
            other => {
                return Err(ApiError::bad(
                    "bad_memory_mode",
                    format!("unknown memory_mode {other:?}: use \"lazy\" or \"eager\""),
                ))
            }
        };
        let spec = self.prefetch.as_deref().unwrap_or("lazy");
        let prefetch = PolicySpec::from_str(spec)
            .map_err(|e| ApiError::bad("unknown_policy", e.to_string()))?;
        factory(&prefetch)?;
        Ok(CloneRequest {
            n: self.n as usize,
            mode,
            prefetch,
        })
    }
}

/// The identity the VMM wrote into clone `vm`'s GenPage (what its guest sees), or `None` if
/// the page does not hold one.
pub fn identity_of(vm: &Vm) -> Option<Identity> {
    let mut buf = vec![0u8; std::mem::size_of::<GenPage>()];
    vm.read_phys(GENPAGE_GPA, &mut buf).ok()?;
    let g: GenPage = from_bytes(&buf)?;
    if g.magic != GENPAGE_MAGIC {
        return None;
    }
    let m = g.identity.mac;
    let ip = g.identity.ipv4;
    Some(Identity {
        clone_id: g.clone_id,
        mac: format!(
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        ),
        ip: format!("{}.{}.{}.{}", ip[0], ip[1], ip[2], ip[3]),
    })
}

/// A clone made by the VMM, ready to be registered.
pub struct MadeClone {
    /// The child VM.
    pub vm: Vm,
    /// From the call to the child's first instruction.
    pub latency: Duration,
    /// Its identity.
    pub identity: Option<Identity>,
}

/// The result of cloning.
pub struct MadeBatch {
    /// The children.
    pub clones: Vec<MadeClone>,
    /// How long the parent was paused.
    pub parent_pause: Duration,
}

/// The prefetcher factory of a policy: `lazy` is the VMM's on-demand default; colored
/// policies color the generation image once per batch (on the first child) and build one
/// policy per child.
fn factory(spec: &PolicySpec) -> ApiResult<Option<PrefetcherFactory>> {
    if spec.name == PolicyName::Lazy {
        return Ok(None);
    }
    if spec.name.needs_recording() {
        return Err(ApiError::bad(
            "unknown_policy",
            format!(
                "policy {} replays a recorded working set, which the API does not record; use lazy, eager, blind or kaleidoscope",
                spec.name.as_str()
            ),
        ));
    }
    Ok(kscope_bench::policy::factory(spec, None, None))
}

/// Clone `parent` `req.n` times (blocking): the parent is paused for the freeze only.
pub fn make_clones(
    parent: &Arc<VmEntry>,
    req: &CloneRequest,
    prefix: &str,
) -> ApiResult<MadeBatch> {
    let opts = CloneOptions {
        memory: match req.mode {
            MemoryMode::Lazy => kscope_vmm::MemoryMode::Lazy,
            MemoryMode::Eager => kscope_vmm::MemoryMode::Eager,
        },
        prefetcher: factory(&req.prefetch)?,
        name_prefix: prefix.to_string(),
        ..CloneOptions::default()
    };
    let batch = parent
        .vm
        .clone_children(req.n, &opts)
        .map_err(|e| match e {
            // The parent itself cannot be cloned in its state (paused is fine, failed is not).
            kscope_vmm::VmError::BadState { .. } => ApiError::from_vm(&parent.id, e),
            e if !parent_ok(parent) => ApiError::from_vm(&parent.id, e),
            e => ApiError::creating(&format!("creating {} clones of VM {}", req.n, parent.id), e),
        })?;
    let clones = batch
        .children
        .into_iter()
        .zip(batch.clone_latency)
        .map(|(vm, latency)| MadeClone {
            identity: identity_of(&vm),
            vm,
            latency,
        })
        .collect();
    Ok(MadeBatch {
        clones,
        parent_pause: batch.parent_pause,
    })
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
        };
        let r = ok.validate().unwrap();
        assert_eq!((r.n, r.mode), (3, MemoryMode::Eager));
        for (n, mode, pol, code) in [
            (0, None, None, "bad_clone_count"),
            (65, None, None, "bad_clone_count"),
            (1, Some("warm"), None, "bad_memory_mode"),
            (1, None, Some("nonsense"), "unknown_policy"),
            (1, None, Some("reap"), "unknown_policy"),
        ] {
            let e = CreateClones {
                n,
                memory_mode: mode.map(Into::into),
                prefetch: pol.map(Into::into),
            }
            .validate()
            .unwrap_err();
            assert_eq!(e.code(), code);
        }
    }
}
