//! Whole-VM state with one home (Firecracker's `persist.rs` is the model): what a VM needs to
//! resume elsewhere ([`MachineState`]: vCPUs, devices, clock, the host CPU it ran on), how it
//! is captured from a paused VM ([`capture`]), how it is restored into a new one
//! ([`create_vcpus`], [`restore_into`]), and the version of its serialized form ([`STATE_VERSION`]).
//!
//! **Changing the serialized form.** [`MachineState`] and everything in it
//! ([`VcpuState`], [`ArchState`](crate::hypervisor::ArchState), [`DeviceStates`],
//! [`ClockState`], [`HostCpu`]) are written into snapshots. Any change to them needs a bump of
//! [`STATE_VERSION`]: the minor number when this build still reads what older builds of the
//! same major wrote (e.g. a new field with a serde default), the major number otherwise. The
//! rule checked on restore ([`FormatVersion::can_read`]): same major, and a minor no newer than
//! this build's.

use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::devices::{DeviceSet, DeviceStates};
use crate::error::VmError;
use crate::hypervisor::{ClockState, HvVcpu, HvVm, VcpuState};
use crate::vcpu::{VcpuControl, VcpuMsg};

/// A semver-style version of a serialized format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FormatVersion {
    /// Incompatible changes.
    pub major: u16,
    /// Compatible additions.
    pub minor: u16,
}

impl FormatVersion {
    /// True if a build writing `self` can read data written as `written`: same major, and
    /// `written` no newer than `self`.
    pub fn can_read(self, written: FormatVersion) -> bool {
        written.major == self.major && written.minor <= self.minor
    }
}

impl std::fmt::Display for FormatVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Version of the serialized [`MachineState`] (and the snapshot payload around it).
/// 2.0: neutral vCPU state (registers and MSRs as values, backend part tagged), clock as
/// nanoseconds, the host CPU recorded.
/// 2.1: the snapshot records a CRC-32 per memory page (state file format 2,
/// [`crate::snapfile`]), checked when a page is first read; a 2.1 payload without that table
/// is refused as corrupt. 2.0 snapshots (format 1, no table) are still read: their memory is
/// verified whole when opened.
/// 2.2: the virtio-net transport in [`DeviceStates`] (`net`, absent before 2.2).
/// 3.0: the MMIO window moved from 3 GiB to 8 GiB (guest RAM up to 8 GiB). A 2.x guest maps
/// its devices at 3 GiB in its own page tables, so 2.x snapshots cannot resume here and are
/// refused.
pub const STATE_VERSION: FormatVersion = FormatVersion { major: 3, minor: 0 };

/// The first [`STATE_VERSION`] whose snapshots carry a per-page CRC-32 table.
pub const PAGE_CRC_VERSION: FormatVersion = FormatVersion { major: 2, minor: 1 };

/// Everything a VM needs to resume: vCPU and device state, the clock and the host CPU it was
/// saved on. Serializable (see the module docs before changing it).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MachineState {
    /// One state per vCPU.
    pub vcpus: Vec<VcpuState>,
    /// Device state.
    pub devices: DeviceStates,
    /// The VM clock (`None` if the hypervisor could not read it).
    pub clock: Option<ClockState>,
    /// The parent's READY value.
    pub ready_value: u32,
    /// The CPU of the host the state was saved on.
    pub cpu: HostCpu,
}

/// Save the state of every vCPU (the VM must be paused: the vCPU threads answer).
pub(crate) fn save_vcpus(controls: &[Arc<VcpuControl>]) -> Result<Vec<VcpuState>, VmError> {
    controls
        .iter()
        .map(|c| {
            let (tx, rx) = mpsc::channel();
            c.send(VcpuMsg::GetState(tx));
            rx.recv_timeout(Duration::from_secs(5))
                .map_err(|_| VmError::Internal("vCPU did not answer GetState".into()))?
        })
        .collect()
}

/// Restore one state per vCPU into a paused VM's vCPU threads.
pub(crate) fn load_vcpus(
    controls: &[Arc<VcpuControl>],
    states: &[VcpuState],
) -> Result<(), VmError> {
    if states.len() != controls.len() {
        return Err(VmError::BadConfig(format!(
            "{} vCPU states for {} vCPUs",
            states.len(),
            controls.len()
        )));
    }
    for (c, st) in controls.iter().zip(states) {
        let (tx, rx) = mpsc::channel();
        c.send(VcpuMsg::SetState(Box::new(st.clone()), tx));
        rx.recv_timeout(Duration::from_secs(5))
            .map_err(|_| VmError::Internal("vCPU did not answer SetState".into()))??;
    }
    Ok(())
}

/// Capture a paused VM's whole machine state (its vCPUs' states asked for unless `vcpus`
/// brings them).
pub(crate) fn capture(
    controls: &[Arc<VcpuControl>],
    devices: &DeviceSet,
    hv: &dyn HvVm,
    ready_value: u32,
    vcpus: Option<Vec<VcpuState>>,
) -> Result<MachineState, VmError> {
    let vcpus = match vcpus {
        Some(v) => v,
        None => save_vcpus(controls)?,
    };
    Ok(MachineState {
        vcpus,
        devices: devices.save_states(),
        clock: hv.clock().ok(),
        ready_value,
        cpu: HostCpu::current(),
    })
}

/// Create `n` vCPUs with their CPUID set: the part of a restore that does not depend on the
/// saved state (a pool can do it ahead of time, see [`crate::pool`]).
pub(crate) fn create_vcpus(hv: &dyn HvVm, n: u32) -> Result<Vec<Box<dyn HvVcpu>>, VmError> {
    let mut vcpus = Vec::with_capacity(n as usize);
    for i in 0..n {
        let mut v = hv.create_vcpu(i)?;
        v.cpuid(n)?;
        vcpus.push(v);
    }
    Ok(vcpus)
}

/// Restore `state`'s clock and saved vCPU states into a VM and its vCPUs made by
/// [`create_vcpus`] (one per saved state). `just_saved`: the state was saved by this process
/// (a clone, a move onto a standby), so it is loaded the fast way ([`HvVcpu::load_state`]);
/// otherwise (a snapshot file) every part is set and checked now.
pub(crate) fn restore_into(
    hv: &dyn HvVm,
    state: &MachineState,
    vcpus: &mut [Box<dyn HvVcpu>],
    name: &str,
    just_saved: bool,
) -> Result<(), VmError> {
    if vcpus.len() != state.vcpus.len() {
        return Err(VmError::Internal(format!(
            "{} vCPUs made for a state of {}",
            vcpus.len(),
            state.vcpus.len()
        )));
    }
    if let Some(c) = &state.clock {
        if let Err(e) = hv.set_clock(c) {
            tracing::debug!(vm = %name, "setting the clock: {e}");
        }
    }
    for (v, st) in vcpus.iter_mut().zip(&state.vcpus) {
        match just_saved {
            true => v.load_state(st)?,
            false => v.restore_state(st)?,
        }
    }
    Ok(())
}

/// The host CPU as far as saved guest state depends on it: the vendor, and the instruction-set
/// features the guest may have used (KVM passes them through), by name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCpu {
    /// CPUID vendor string (e.g. `GenuineIntel`, `AuthenticAMD`).
    pub vendor: String,
    /// Features present, by name (see [`HostCpu::current`]).
    pub features: Vec<String>,
}

/// (name, CPUID leaf, register index (0 = ebx of leaf 7, 1 = ecx, 2 = edx), bit).
const FEATURES: &[(&str, u32, u8, u32)] = &[
    ("sse3", 1, 1, 0),
    ("pclmulqdq", 1, 1, 1),
    ("ssse3", 1, 1, 9),
    ("fma", 1, 1, 12),
    ("sse4.1", 1, 1, 19),
    ("sse4.2", 1, 1, 20),
    ("x2apic", 1, 1, 21),
    ("popcnt", 1, 1, 23),
    ("aes", 1, 1, 25),
    ("xsave", 1, 1, 26),
    ("avx", 1, 1, 28),
    ("rdrand", 1, 1, 30),
    ("sse", 1, 2, 25),
    ("sse2", 1, 2, 26),
    ("fsgsbase", 7, 0, 0),
    ("bmi1", 7, 0, 3),
    ("avx2", 7, 0, 5),
    ("bmi2", 7, 0, 8),
    ("erms", 7, 0, 9),
    ("avx512f", 7, 0, 16),
    ("rdseed", 7, 0, 18),
    ("adx", 7, 0, 19),
];

impl HostCpu {
    /// This host's CPU (CPUID leaves 0, 1 and 7), read once per process: CPUID may exit to an
    /// outer hypervisor, and a freeze captures the state while the VM is paused.
    pub fn current() -> HostCpu {
        static HOST: OnceLock<HostCpu> = OnceLock::new();
        HOST.get_or_init(Self::read).clone()
    }

    fn read() -> HostCpu {
        #[allow(unused_unsafe)]
        // SAFETY: CPUID is available on every x86-64 CPU and has no side effects.
        let (l0, l1, l7) = unsafe {
            use std::arch::x86_64::{__cpuid, __cpuid_count};
            (__cpuid(0), __cpuid(1), __cpuid_count(7, 0))
        };
        let mut vendor = Vec::with_capacity(12);
        for r in [l0.ebx, l0.edx, l0.ecx] {
            vendor.extend_from_slice(&r.to_le_bytes());
        }
        let has_leaf7 = l0.eax >= 7;
        let features = FEATURES
            .iter()
            .filter(|&&(_, leaf, reg, bit)| {
                let v = match (leaf, reg) {
                    (1, 1) => l1.ecx,
                    (1, 2) => l1.edx,
                    (7, 0) if has_leaf7 => l7.ebx,
                    _ => 0,
                };
                v & (1 << bit) != 0
            })
            .map(|&(name, ..)| name.to_string())
            .collect();
        HostCpu {
            vendor: String::from_utf8_lossy(&vendor).into_owned(),
            features,
        }
    }

    /// Why state saved on `saved` cannot run on this CPU: another vendor, or features the
    /// guest may use that this CPU lacks. `None` if it can.
    pub fn incompatibility(&self, saved: &HostCpu) -> Option<String> {
        if saved.vendor != self.vendor {
            return Some(format!(
                "saved on a {} CPU, this host is {}; restore on a host of the same vendor",
                saved.vendor, self.vendor
            ));
        }
        let missing: Vec<&str> = saved
            .features
            .iter()
            .filter(|f| !self.features.contains(f))
            .map(String::as_str)
            .collect();
        (!missing.is_empty()).then(|| {
            format!(
                "the saved guest may use CPU features this host lacks ({}); restore on a host \
                 with at least the saving host's features",
                missing.join(", ")
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_follow_the_stated_rule() {
        let v = |major, minor| FormatVersion { major, minor };
        assert!(v(2, 1).can_read(v(2, 0)));
        assert!(v(2, 1).can_read(v(2, 1)));
        assert!(!v(2, 1).can_read(v(2, 2)), "newer minor");
        assert!(!v(2, 1).can_read(v(1, 0)), "older major");
        assert!(!v(2, 1).can_read(v(3, 0)), "newer major");
        assert_eq!(STATE_VERSION.to_string(), "3.0");
        assert!(
            !STATE_VERSION.can_read(v(2, 2)),
            "2.x guests map their devices at 3 GiB: refused"
        );
        assert!(STATE_VERSION >= PAGE_CRC_VERSION, "3.0 records page CRCs");
    }

    #[test]
    fn the_host_check_names_vendor_and_missing_features() {
        let here = HostCpu::current();
        assert!(here.vendor.len() == 12, "{here:?}");
        assert!(here.features.iter().any(|f| f == "sse2"), "{here:?}");
        assert_eq!(here.incompatibility(&here), None);
        let other = HostCpu {
            vendor: "SomeOtherCPU".into(),
            ..here.clone()
        };
        assert!(here
            .incompatibility(&other)
            .unwrap()
            .contains("SomeOtherCPU"));
        let mut more = here.clone();
        more.features.push("quantum".into());
        assert!(here.incompatibility(&more).unwrap().contains("quantum"));
        let mut fewer = here.clone();
        fewer.features.clear();
        assert_eq!(here.incompatibility(&fewer), None);
    }
}
