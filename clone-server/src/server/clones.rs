//! Cloning through the VMM: validated clone requests, identities, and the call into
//! `kscope_vmm`'s clone API.

use std::str::FromStr;
use std::sync::Arc;

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
    pub prefetch: kscope_policies::PolicySpec,
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
        let prefetch = kscope_policies::PolicySpec::from_str(spec)
            .map_err(|e| ApiError::bad("unknown_policy", e.to_string()))?;
        Ok(CloneRequest {
            n: self.n as usize,
            mode,
            prefetch,
        })
    }
}

/// The identity of clone `index` (1-based) of generation `generation`: a locally
/// administered MAC and an address in 10.0.0.0/8 derived from both.
pub fn identity(generation: u64, index: u32) -> Identity {
    let g = (generation & 0xffff) as u16;
    let [g1, g0] = g.to_be_bytes();
    let [i1, i0] = (index as u16).to_be_bytes();
    Identity {
        clone_id: index,
        mac: format!("52:54:{g1:02x}:{g0:02x}:{i1:02x}:{i0:02x}"),
        ip: format!("10.{}.{}.{}", g0, i1, i0),
    }
}

/// A clone made by the VMM, ready to be registered.
pub struct MadeClone {
    /// The child VM.
    pub vm: kscope_vmm::Vm,
    /// Time to clone it.
    pub latency: std::time::Duration,
    /// Its memory statistics source.
    pub memory_stats: Option<super::registry::MemoryStatsFn>,
}

/// The result of cloning.
pub struct MadeBatch {
    /// The children.
    pub clones: Vec<MadeClone>,
    /// How long the parent was paused.
    pub parent_pause: std::time::Duration,
}

/// Clone `parent` `req.n` times (blocking). The VMM's clone API is not in this build yet:
/// this answers 501 rather than pretending.
pub fn make_clones(parent: &Arc<VmEntry>, req: &CloneRequest) -> ApiResult<MadeBatch> {
    let _ = (parent, req);
    Err(ApiError::NotImplemented(
        "cloning is not wired to the VMM in this build (kscope_vmm has no clone API yet); create more parents with POST /v1/vms instead".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_distinct_and_well_formed() {
        let a = identity(1, 1);
        let b = identity(1, 2);
        let c = identity(2, 1);
        assert_ne!(a.mac, b.mac);
        assert_ne!(a.mac, c.mac);
        assert_ne!(a.ip, c.ip);
        assert_eq!(a.mac, "52:54:00:01:00:01");
        assert_eq!(a.ip, "10.1.0.1");
    }

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
