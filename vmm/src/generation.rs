//! A generation: a VM's memory and machine state frozen at a clone point, from which children
//! are spawned ([`Generation::spawn`](crate::clone)). Made by [`crate::Vm::freeze`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::VmConfig;
use crate::error::VmError;
use crate::hostmem::PAGE_SIZE;
use crate::lazy::{DeferredImage, PageSource};
use crate::state::MachineState;

/// A frozen generation image: the parent's memory and machine state at the clone point. Lives
/// as long as the parent or any child refers to it; never written.
pub struct Generation {
    pub(crate) id: u64,
    pub(crate) image: Arc<dyn PageSource>,
    pub(crate) state: MachineState,
    pub(crate) cfg: VmConfig,
    pub(crate) created: Instant,
    pub(crate) freeze: FreezeReport,
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("id", &self.id)
            .field("parent", &self.cfg.name)
            .field("pages", &self.image.pages())
            .finish()
    }
}

impl Generation {
    /// Process-unique id of this image.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The frozen memory.
    pub fn image(&self) -> &Arc<dyn PageSource> {
        &self.image
    }

    /// Name of the VM it was frozen from.
    pub fn parent_name(&self) -> &str {
        &self.cfg.name
    }

    /// Guest RAM size.
    pub fn mem_bytes(&self) -> u64 {
        self.cfg.mem_bytes
    }

    /// Guest pages.
    pub fn pages(&self) -> u64 {
        self.image.pages()
    }

    /// The captured machine state.
    pub fn machine_state(&self) -> &MachineState {
        &self.state
    }

    /// When it was frozen.
    pub fn created(&self) -> Instant {
        self.created
    }

    /// How the freeze that made it went (parent pause and its parts).
    pub fn freeze_report(&self) -> &FreezeReport {
        &self.freeze
    }

    /// Read guest-physical memory of the image.
    pub fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError> {
        let end = gpa
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.mem_bytes())
            .ok_or(VmError::GuestMemory {
                gpa,
                len: buf.len(),
            })?;
        let mut page = [0u8; PAGE_SIZE];
        let mut at = gpa;
        while at < end {
            let g = at / PAGE_SIZE as u64;
            let off = (at % PAGE_SIZE as u64) as usize;
            self.image.read_page(g, &mut page)?;
            let n = (PAGE_SIZE - off).min((end - at) as usize);
            let dst = (at - gpa) as usize;
            buf[dst..dst + n].copy_from_slice(&page[off..off + n]);
            at += n as u64;
        }
        Ok(())
    }
}

/// A VM's state as a parent: the frozen base image its copy-on-write view reads through.
#[derive(Default)]
pub struct ParentState {
    /// The memfd frozen by the first freeze (`None` until then).
    pub(crate) base: Option<Arc<DeferredImage>>,
    /// Number of freezes so far.
    pub(crate) freezes: u64,
    /// Write-protect tracking of the private view for copy-on-write later freezes (`None`
    /// before the first freeze, or where the kernel refused it).
    pub(crate) cow: Option<crate::clone::cow::CowTracker>,
    /// Later freezes copy the dirty pages while paused (the method before copy-on-write
    /// capture; a baseline for benchmarks), see [`crate::Vm::set_capture_by_copy`].
    pub(crate) copy_while_paused: bool,
    /// The VM the first freeze moves this one onto (see [`crate::clone::rehome`]), made ahead
    /// of time by [`crate::Vm::prepare_freeze`] or on the first freeze call.
    pub(crate) standby: Option<crate::clone::rehome::Standby>,
    /// The first freeze re-points the KVM slot instead of moving onto a standby VM (the
    /// method before the standby; a baseline for benchmarks), see
    /// [`crate::Vm::set_first_freeze_by_repoint`].
    pub(crate) repoint_first: bool,
    /// Every later freeze captures all pages written since the first (the method before
    /// incremental layers; a baseline for benchmarks), see [`crate::Vm::set_full_layers`].
    pub(crate) full_layers: bool,
}

/// Where the time of a freeze went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FreezeReport {
    /// Waiting, before the pause, for the previous layer's copier to finish (later freezes
    /// with copy-on-write capture).
    pub settle: Duration,
    /// vCPUs out of the guest: from the pause request to the resume.
    pub pause: Duration,
    /// Taking the vCPUs out of the guest (pause acknowledged).
    pub stop_vcpus: Duration,
    /// Capturing vCPU and device state and the clock.
    pub capture: Duration,
    /// Memory work while paused (view swap; or dirty scan and write-protection, or delta copy).
    pub memory: Duration,
    /// Pages copied while paused (later freezes without copy-on-write capture).
    pub pages_copied: u64,
    /// Pages write-protected while paused and copied after the resume (later freezes with
    /// copy-on-write capture: the parent's dirty set).
    pub pages_protected: u64,
    /// Building the image after the resume (hole scan, old mapping release).
    pub after_resume: Duration,
    /// Completing a lazily served VM before the freeze (installing missing pages).
    pub complete: Duration,
    /// Later freezes: the layer holds every page written since the first freeze (the first
    /// later freeze, every `MAX_LAYERS`-th, and all of them with full layers or copy while
    /// paused); `false`: only the pages written since the previous freeze.
    pub full_layer: bool,
    /// Later freezes: the written pages came from the record the copy-on-write handler keeps
    /// of the parent's writes (every page of its view protected since its first freeze), not
    /// from a scan of its page tables.
    pub recorded: bool,
    /// Later freezes: layers over the base in the generation's image.
    pub layers: u64,
    /// True for the first freeze (zero-copy view swap).
    pub first: bool,
    /// First freeze: making the standby VM on this call, before the pause (zero when it was
    /// made ahead of time with [`crate::Vm::prepare_freeze`]).
    pub prepare: Duration,
    /// First freeze: the VM moved onto a standby VM (`false`: the KVM slot was re-pointed).
    pub rehomed: bool,
}
