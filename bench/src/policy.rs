//! Prefetch policies for clones of a generation image: coloring the image and turning a
//! [`PolicySpec`] into the VMM's [`PrefetcherFactory`]. Shared by the HTTP clone service and
//! the benchmarks so that both clone alike.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use kscope_colorer::{ColorError, ColorMap, MemError, PhysMem};
use kscope_policies::{Gfn, PolicyContext, PolicyName, PolicySpec};
use kscope_vmm::prefetch::OnDemand;
use kscope_vmm::{CloneContext, Generation, PrefetcherFactory};

/// A generation image as the colorer's physical memory.
pub struct GenerationMem(pub Arc<Generation>);

impl PhysMem for GenerationMem {
    fn size(&self) -> u64 {
        self.0.mem_bytes()
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.0.read_phys(gpa, buf).map_err(|e| MemError::Backend {
            gpa,
            reason: e.to_string(),
        })
    }
}

/// Color a generation image (kscope guest profile); returns the map and the time it took.
pub fn color_generation(g: &Arc<Generation>) -> Result<(ColorMap, Duration), ColorError> {
    let t = Instant::now();
    let map = kscope_colorer::color_kscope(&GenerationMem(g.clone()), None)?;
    Ok((map, t.elapsed()))
}

/// The prefetcher factory of `spec`, or `None` for `lazy` (the VMM's on-demand default).
///
/// Colored policies use `ctx` if given; otherwise the generation image of the batch is colored
/// once, on the first child, and a failure to color falls back to on-demand paging (logged).
/// `recording` (the frames one clone touched, in first-fault order) is required by `reap`,
/// `faasnap` and `activeset`; without it they also fall back to on-demand paging, so check
/// [`PolicyName::needs_recording`] first where that matters.
pub fn factory(
    spec: &PolicySpec,
    ctx: Option<Arc<PolicyContext>>,
    recording: Option<Arc<[Gfn]>>,
) -> Option<PrefetcherFactory> {
    if spec.name == PolicyName::Lazy {
        return None;
    }
    let spec = spec.clone();
    let cell: Arc<OnceLock<Option<Arc<PolicyContext>>>> = Arc::default();
    if let Some(c) = ctx {
        let _ = cell.set(Some(c));
    }
    Some(Arc::new(move |c: &CloneContext| {
        let pc = cell.get_or_init(|| match color_generation(&c.generation) {
            Ok((map, _)) => Some(PolicyContext::new(&map)),
            Err(e) => {
                tracing::warn!(
                    "cannot color the generation image ({e}); clones fall back to on-demand paging"
                );
                None
            }
        });
        match pc {
            Some(pc) => spec
                .build_with(pc.clone(), recording.as_deref())
                .unwrap_or_else(|e| {
                    tracing::warn!("policy {}: {e}; using on-demand paging", spec.name);
                    Box::new(OnDemand)
                }),
            None => Box::new(OnDemand),
        }
    }))
}
