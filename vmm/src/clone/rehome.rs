//! The first freeze without a slot re-point: the parent moves onto a fresh KVM VM.
//!
//! At its first freeze a parent must stop writing its memfd `F` (from then on `F` is the
//! frozen image) and go on in a private copy-on-write view `P` of `F`. Re-pointing its KVM
//! memory slot from the shared mapping to `P` makes KVM drop every shadow mapping of the slot
//! while the parent is paused, which costs in proportion to what the guest has mapped
//! (`docs/BENCHMARKS.md`, "The first pause": 2.1 ms with 515 MiB populated, 10.5 ms with
//! 1.5 GiB).
//!
//! Instead, a *standby* VM is made before the pause ([`Standby`], ahead of time with
//! [`Vm::prepare_freeze`] or on the freeze call before pausing): a KVM VM whose slot 0 already
//! maps `P`, with its vCPUs created (CPUID set). While paused, the captured vCPU state and the
//! clock are loaded into the standby's vCPUs and each vCPU thread swaps its vCPU for the new
//! one ([`crate::vcpu::VcpuMsg::Swap`]); the VM's RAM handle becomes `P`. The devices, vCPU
//! threads, console and request path stay: only the KVM objects under them change, so the
//! parent keeps its name, network and everything it was doing. Nothing in the pause depends
//! on memory size. The old KVM VM, whose teardown drops the shadow mappings, and the old
//! shared mapping are released on a thread after the resume ([`Retired`]).
//!
//! The parent's shadow mappings are rebuilt on demand after the resume either way (the
//! re-point drops them too), from pages that are all resident: `P` reads `F`'s pages.

use std::sync::mpsc::Receiver;
use std::sync::Arc;

use super::cow::CowTracker;
use crate::error::VmError;
use crate::hypervisor::{self, HvVcpu, HvVm};
use crate::memory::GuestRam;
use crate::state::{self, MachineState};
use crate::vcpu::{SwapReply, VcpuMsg};
use crate::vm::{Vm, RAM_SLOT};

/// A KVM VM ready to take a parent over at its first freeze: slot 0 maps a private view of
/// the parent's memfd, its vCPUs exist with CPUID set.
///
/// It also carries the write-protect tracking of the view for the parent's later freezes
/// ([`CowTracker`]), registered ahead too, with every page of the view protected while the
/// view is not used yet, so that the parent's writes are recorded from its first freeze on
/// (`None` where the kernel refuses it: later freezes then copy while paused).
///
/// Fields drop in order: vCPUs, then the VM (which closes the slot), the tracker, then the
/// view.
pub(crate) struct Standby {
    vcpus: Vec<Box<dyn HvVcpu>>,
    hv: Box<dyn HvVm>,
    cow: Option<CowTracker>,
    view: Arc<GuestRam>,
}

impl std::fmt::Debug for Standby {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Standby")
            .field("vcpus", &self.vcpus.len())
            .field("cow", &self.cow.is_some())
            .field("bytes", &self.view.size())
            .finish()
    }
}

impl Standby {
    /// Makes a standby for VM `name` running on `ram` (a shared memfd mapping) with `vcpus`
    /// vCPUs; its tracker protects the whole view and records the writes if `recording`
    /// ([`CowTracker::new_recording`]).
    pub(crate) fn prepare(
        name: &str,
        ram: &GuestRam,
        vcpus: u32,
        recording: bool,
    ) -> Result<Standby, VmError> {
        if ram.is_private() {
            return Err(VmError::Internal(
                "a standby VM is made for shared guest RAM only (first freeze)".into(),
            ));
        }
        let file = ram
            .file()
            .ok_or_else(|| VmError::Internal("anonymous guest RAM cannot be frozen".into()))?
            .clone();
        let view = Arc::new(GuestRam::from_file(file, ram.size(), libc::MAP_PRIVATE)?);
        let hv = hypervisor::host().create_vm()?;
        // SAFETY: `view` is a live mapping of `view.size()` bytes; the standby keeps it until
        // after its KVM VM is dropped (field order), and a VM that takes the standby over keeps
        // it as its guest RAM, released only after that VM is closed.
        unsafe { hv.set_memory_slot(RAM_SLOT, 0, view.size(), view.host_addr())? };
        let vcpus = state::create_vcpus(hv.as_ref(), vcpus)?;
        let mut cow = CowTracker::try_new(view.clone(), name, recording);
        // Its handler thread waits from now on: the parent's first write after the freeze
        // does not wait for a thread to be made.
        if let Some(c) = cow.as_mut() {
            c.activate();
        }
        Ok(Standby {
            vcpus,
            hv,
            cow,
            view,
        })
    }

    /// Takes the write-protect tracker of the view out (the VM that takes this standby over
    /// keeps it for its later freezes).
    pub(crate) fn take_cow(&mut self) -> Option<CowTracker> {
        self.cow.take()
    }

    /// True if this standby was made for guest RAM backed by the same file as `ram`.
    fn fits(&self, ram: &GuestRam) -> bool {
        match (self.view.file(), ram.file()) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b) && self.view.size() == ram.size(),
            _ => false,
        }
    }
}

/// What a re-homed VM left behind: the old vCPUs, KVM VM and shared mapping. Release them
/// with [`Retired::release`] after the resume.
#[derive(Debug)]
pub(crate) struct Retired {
    vcpus: Vec<Box<dyn HvVcpu>>,
    hv: Option<Box<dyn HvVm>>,
    ram: Arc<GuestRam>,
}

impl Retired {
    /// Only the old RAM mapping (after a slot re-point, which kept the KVM VM).
    pub(crate) fn mapping(ram: Arc<GuestRam>) -> Retired {
        Retired {
            vcpus: Vec::new(),
            hv: None,
            ram,
        }
    }

    /// Releases everything on a short-lived thread: the vCPUs and the KVM VM first (KVM
    /// tears down their shadow page tables), then the old mapping's page tables in small
    /// chunks (unmapping holds the process's mmap lock, which new clones need), then the
    /// mapping. If no thread can start, the closure and so everything it holds is dropped
    /// right here instead.
    pub(crate) fn release(self) {
        let spawned = std::thread::Builder::new()
            .name("kscope-retire".into())
            .spawn(move || {
                let Retired { vcpus, hv, ram } = self;
                drop(vcpus);
                drop(hv);
                super::freeze::release_page_tables(&ram);
            });
        if let Err(e) = spawned {
            tracing::debug!("no thread to release a frozen VM's old VM and mapping ({e}): inline");
        }
    }
}

impl Vm {
    /// Makes the standby VM the first freeze moves this VM onto (see [`crate::clone::rehome`]
    /// docs), ahead of time, so that the first clone call does not spend the 1-20 ms of VM
    /// and memory slot creation. Does nothing if the VM was frozen before or has a standby
    /// already. A standby costs a KVM VM with its vCPUs and per-page slot metadata (about
    /// 2 MiB per GiB of guest memory), and the page tables that protect every page of its
    /// view (another 2 MiB per GiB), no guest memory.
    pub fn prepare_freeze(&self) -> Result<(), VmError> {
        let mut ps = self.parent.lock().unwrap_or_else(|p| p.into_inner());
        if ps.base.is_some() || ps.standby.is_some() || ps.repoint_first {
            return Ok(());
        }
        let ram = self.memory.load();
        if ram.is_anonymous() {
            return Ok(());
        }
        ps.standby = Some(Standby::prepare(
            self.name(),
            &ram,
            self.cfg.vcpus,
            !ps.full_layers,
        )?);
        Ok(())
    }

    /// With the VM paused and `state` captured from it: loads `state` into the standby's
    /// vCPUs, queues for every vCPU thread the swap onto its new vCPU (taken before the
    /// resume that follows it in the queue: no round trip inside the pause) and swaps the VM
    /// onto the standby's KVM VM and RAM view. Returns what the VM ran on so far, once the
    /// threads have handed their old vCPUs back ([`Retiring::collect`], after the resume). On
    /// error before the swap the VM is unchanged.
    pub(crate) fn rehome(
        &self,
        mut standby: Standby,
        state: &MachineState,
    ) -> Result<Retiring, VmError> {
        if !standby.fits(&self.memory.load()) {
            return Err(VmError::Internal(
                "the standby VM was made for other guest RAM".into(),
            ));
        }
        let controls = &self.core.controls;
        if standby.vcpus.len() != controls.len() {
            return Err(VmError::Internal(format!(
                "standby has {} vCPUs, the VM {}",
                standby.vcpus.len(),
                controls.len()
            )));
        }
        state::restore_into(
            standby.hv.as_ref(),
            state,
            &mut standby.vcpus,
            self.name(),
            true,
        )?;
        let Standby {
            vcpus, hv, view, ..
        } = standby;
        // From here on the VM runs on the new KVM VM, whatever happens.
        let old_hv = std::mem::replace(&mut *self.hv(), hv);
        let old_ram = self.memory.replace(view);
        let swaps = controls
            .iter()
            .zip(vcpus)
            .map(|(c, v)| {
                let (tx, rx) = std::sync::mpsc::channel();
                c.send(VcpuMsg::Swap(v, tx));
                rx
            })
            .collect();
        Ok(Retiring {
            swaps,
            retired: Retired {
                vcpus: Vec::new(),
                hv: Some(old_hv),
                ram: old_ram,
            },
            name: self.name().to_string(),
        })
    }
}

/// A re-homed VM's old KVM objects while its vCPU threads swap: the old vCPUs come back
/// through `swaps`.
pub(crate) struct Retiring {
    swaps: Vec<Receiver<SwapReply>>,
    retired: Retired,
    name: String,
}

impl Retiring {
    /// Only an old mapping, nothing to wait for (a slot re-point).
    pub(crate) fn done(retired: Retired) -> Retiring {
        Retiring {
            swaps: Vec::new(),
            retired,
            name: String::new(),
        }
    }

    /// Waits for every vCPU thread to hand its old vCPU back. A thread that could not take
    /// its new vCPU (it has ended: the VM is stopping) fails the freeze; the VM stays on the
    /// standby, and what came back is released.
    pub(crate) fn collect(self) -> Result<Retired, VmError> {
        let Retiring {
            swaps,
            mut retired,
            name,
        } = self;
        let mut failed = None;
        for rx in swaps {
            match crate::vcpu::recv_soon(&rx, Some(std::time::Duration::from_secs(5))) {
                Ok(Ok(old)) => retired.vcpus.push(old),
                Ok(Err(_)) => failed = Some("a vCPU was running during the swap"),
                Err(_) => failed = Some("a vCPU thread did not take its new vCPU"),
            }
        }
        if let Some(why) = failed {
            retired.release();
            return Err(VmError::Internal(format!(
                "moving {name} onto its standby VM: {why}"
            )));
        }
        Ok(retired)
    }
}
