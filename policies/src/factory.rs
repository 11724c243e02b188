//! From a policy spec to the VMM's per-clone [`PrefetcherFactory`], in explicit steps:
//! [`color_generation`] colors a frozen generation image once (timed by the caller, never
//! hidden inside a clone's creation), [`PolicyContext::new`] precomputes what the policies
//! need from the color map, and [`factory`] makes the closure that builds one policy per clone.
//! The clone service, the CLI and the benchmarks all clone through these.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kscope_colorer::{ColorError, ColorMap, MemError, PhysMem};
use kscope_vmm::{CloneContext, Generation, PrefetcherFactory};

use crate::{Gfn, PolicyContext, PolicyError, PolicyName, PolicySpec};

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

/// The prefetcher factory of `spec`: `None` for `lazy` (the VMM's on-demand default),
/// otherwise a closure that builds the policy for each clone from `ctx` (the generation's
/// colors, required for every other policy: color the generation first) and `recording` (the
/// frames one clone touched, in first-fault order; required by `reap`, `faasnap` and
/// `activeset`). Every error is found here, before any clone exists.
pub fn factory(
    spec: &PolicySpec,
    ctx: Option<Arc<PolicyContext>>,
    recording: Option<Arc<[Gfn]>>,
) -> Result<Option<PrefetcherFactory>, PolicyError> {
    if spec.name == PolicyName::Lazy {
        return Ok(None);
    }
    let ctx = ctx.ok_or(PolicyError::NeedsColors(spec.name.as_str()))?;
    if spec.name == PolicyName::Learned {
        // Learn the table once for the generation, not once per clone.
        let rec = recording.ok_or(PolicyError::NeedsRecording(spec.name.as_str()))?;
        let learned = crate::learn::learn(&ctx, &rec, &spec.config, crate::learn::DEFAULT_BUDGET);
        tracing::debug!(
            faults_base = learned.base.faults,
            faults_learned = learned.learned.faults,
            tables = learned.evaluated,
            "learned a per-color table:\n{}\nrecording under the base table:\n{}\nunder the learned table:\n{}",
            learned.config.render(),
            crate::learn::render_color_faults(&crate::learn::color_faults(&ctx, &spec.config, &rec)),
            crate::learn::render_color_faults(&crate::learn::color_faults(&ctx, &learned.config, &rec)),
        );
        return Ok(Some(Arc::new(move |_: &CloneContext| {
            Box::new(crate::learn::LearnedPolicy::new(
                ctx.clone(),
                learned.config.clone(),
                rec.clone(),
            )) as Box<dyn kscope_vmm::prefetch::Prefetcher>
        })));
    }
    // Build once now so that a bad spec or a missing recording fails before cloning.
    spec.build_with(ctx.clone(), recording.as_deref())?;
    let spec = spec.clone();
    Ok(Some(Arc::new(move |_: &CloneContext| {
        spec.build_with(ctx.clone(), recording.as_deref())
            .expect("the policy was built once when the factory was made")
    })))
}
