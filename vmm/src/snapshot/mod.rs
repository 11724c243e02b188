//! Saving a VM to a directory and restoring it (Picocenter/Firecracker style).
//!
//! A snapshot directory holds:
//! - `state.ksnap`: the [`snapfile`](crate::snapfile) state file (magic, format version,
//!   CRC-32) whose payload is a [`SnapshotPayload`]: the machine state (vCPUs, devices, clock)
//!   and the VM's configuration, with the kernel and disk recorded by length and CRC-32;
//! - `memory.kmem`: the sparse memory file (zero pages are holes);
//! - `kernel.elf`, `disk.img`: the kernel and disk images, so the VM can be restored by
//!   another process.
//!
//! [`Vm::snapshot`] freezes the VM like a clone does (short pause, no copy while paused) and
//! writes the files from the frozen image while the VM runs on. [`Vm::restore`] validates
//! everything (state checksum, the payload's version against the rule of
//! [`crate::state::FormatVersion::can_read`], the host CPU against the saving host's, memory
//! file size, kernel and disk checksums, every field of the machine state against the
//! configuration: [`validate`]) before it creates anything. Guest memory is checked page by
//! page against the CRC-32 table of the state file (state version 2.1 and later) when a page
//! is first read: eagerly before the VM starts, lazily on the first fault, where a corrupt
//! page fails the VM with [`VmError::SnapshotCorrupt`] naming the memory file and is never
//! given to the guest; a 2.0 snapshot's memory is verified whole when opened. Both start by
//! removing leftovers of a writer killed mid-write.

mod validate;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::clone::child::{spawn, ChildSpec};
use crate::clone::MemoryMode;
use crate::config::VmConfig;
use crate::error::VmError;
use crate::generation::{FreezeReport, Generation};
use crate::hypervisor::VcpuState;
use crate::snapfile::{self, MemoryInfo, SnapError, SnapshotPaths};
use crate::state::{FormatVersion, HostCpu, MachineState, PAGE_CRC_VERSION, STATE_VERSION};
use crate::vm::Vm;
const KERNEL_FILE: &str = "kernel.elf";
const DISK_FILE: &str = "disk.img";

/// A file stored next to the state file, recorded by length and CRC-32.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    /// File name inside the snapshot directory.
    pub file: String,
    /// Length in bytes.
    pub len: u64,
    /// CRC-32 of the contents.
    pub crc32: u32,
}

/// The state file's payload.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotPayload {
    /// Version of this payload and the machine state in it ([`STATE_VERSION`] when written).
    pub version: FormatVersion,
    /// Name of the VM at the time of the snapshot.
    pub name: String,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Kernel command line.
    pub cmdline: String,
    /// The kernel image.
    pub kernel: BlobRef,
    /// The disk image.
    pub disk: BlobRef,
    /// vCPU, device and clock state.
    pub machine: MachineState,
}

/// What [`Vm::snapshot`] did.
#[derive(Clone, Debug)]
pub struct SnapshotReport {
    /// The directory.
    pub dir: PathBuf,
    /// How long the VM was paused (zero extra if it was paused already).
    pub pause: Duration,
    /// The freeze breakdown.
    pub freeze: FreezeReport,
    /// The memory file's description.
    pub memory: MemoryInfo,
    /// Total wall time.
    pub total: Duration,
}

fn snap_err(e: SnapError) -> VmError {
    match e {
        SnapError::UnsupportedVersion { ref path, .. } => VmError::SnapshotIncompatible {
            path: path.display().to_string(),
            what: e.to_string(),
        },
        SnapError::BadMagic { ref path, .. }
        | SnapError::Length { ref path, .. }
        | SnapError::Checksum { ref path, .. }
        | SnapError::MemoryMismatch { ref path, .. } => VmError::SnapshotCorrupt {
            path: path.display().to_string(),
            what: e.to_string(),
        },
        SnapError::Payload(_) => VmError::SnapshotCorrupt {
            path: "state payload".into(),
            what: e.to_string(),
        },
        SnapError::Memory(ref m @ crate::lazy::LazyError::Corrupt { .. }) => VmError::from_lazy(m),
        SnapError::Io { .. } | SnapError::NoSpace { .. } | SnapError::Memory(_) => {
            VmError::SnapshotIo(e.to_string())
        }
    }
}

/// Decode a state payload: its version first (any payload has one), checked against
/// [`STATE_VERSION`] with the stated rule (and against the state file: from
/// [`PAGE_CRC_VERSION`] on, `page_table` must be true), then the serialized vCPU states'
/// binary blocks ([`VcpuState::check_serialized`]), then the rest.
fn decode_payload(bytes: &[u8], path: &str, page_table: bool) -> Result<SnapshotPayload, VmError> {
    #[derive(Deserialize)]
    struct Versioned {
        version: serde_json::Value,
    }
    let corrupt = |what: String| VmError::SnapshotCorrupt {
        path: path.to_string(),
        what,
    };
    let v: Versioned =
        serde_json::from_slice(bytes).map_err(|e| corrupt(format!("state payload: {e}")))?;
    let written: FormatVersion = match serde_json::from_value(v.version.clone()) {
        Ok(w) => w,
        // Builds before 2.0 wrote a bare integer.
        Err(_) => FormatVersion {
            major: v.version.as_u64().unwrap_or(0) as u16,
            minor: 0,
        },
    };
    if !STATE_VERSION.can_read(written) {
        return Err(VmError::SnapshotIncompatible {
            path: path.to_string(),
            what: format!(
                "state version {written}, this build reads {}.0 to {STATE_VERSION} (same major, \
                 no newer minor); take the snapshot again with this build",
                STATE_VERSION.major
            ),
        });
    }
    if written >= PAGE_CRC_VERSION && !page_table {
        return Err(corrupt(format!(
            "state version {written} records a CRC-32 per memory page, but the state file has no \
             page table (format 1): the file was altered; take the snapshot again"
        )));
    }
    let raw: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| corrupt(format!("state payload: {e}")))?;
    let Some(vcpus) = raw.pointer("/machine/vcpus").and_then(|v| v.as_array()) else {
        return Err(corrupt("machine.vcpus is missing or not a list".into()));
    };
    for (i, v) in vcpus.iter().enumerate() {
        VcpuState::check_serialized(v).map_err(|e| corrupt(format!("vCPU {i}: {e}")))?;
    }
    serde_json::from_value(raw).map_err(|e| corrupt(format!("state payload: {e}")))
}

fn write_blob(dir: &Path, file: &str, data: &[u8]) -> Result<BlobRef, VmError> {
    let path = dir.join(file);
    let tmp = dir.join(format!(".{file}.tmp"));
    let io = |e: std::io::Error| VmError::SnapshotIo(format!("writing {}: {e}", path.display()));
    std::fs::write(&tmp, data).map_err(io)?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    Ok(BlobRef {
        file: file.into(),
        len: data.len() as u64,
        crc32: crc32fast::hash(data),
    })
}

fn read_blob(dir: &Path, r: &BlobRef) -> Result<Arc<[u8]>, VmError> {
    let path = dir.join(&r.file);
    if r.file.contains('/') || r.file.starts_with('.') {
        return Err(VmError::SnapshotCorrupt {
            path: path.display().to_string(),
            what: "blob name escapes the snapshot directory".into(),
        });
    }
    let data = std::fs::read(&path).map_err(|e| match e.kind() {
        // The state file names a file the directory does not have: an incomplete snapshot or
        // an altered state file, either way not restorable.
        std::io::ErrorKind::NotFound => VmError::SnapshotCorrupt {
            path: path.display().to_string(),
            what: format!(
                "the state file names {:?}, which is missing from the snapshot directory; \
                 the snapshot is incomplete or its state file was altered: take it again",
                r.file
            ),
        },
        _ => VmError::SnapshotIo(format!("reading {}: {e}", path.display())),
    })?;
    let crc = crc32fast::hash(&data);
    if data.len() as u64 != r.len || crc != r.crc32 {
        return Err(VmError::SnapshotCorrupt {
            path: path.display().to_string(),
            what: format!(
                "{} bytes with CRC-32 {crc:#010x}, the state file records {} bytes with {:#010x}",
                data.len(),
                r.len,
                r.crc32
            ),
        });
    }
    Ok(Arc::from(data))
}

/// Removes leftovers of an interrupted snapshot write in `dir` (logged).
fn clean(dir: &Path) {
    for p in snapfile::clean_leftovers(dir) {
        tracing::info!(file = %p.display(), "removed the leftover of an interrupted snapshot write");
    }
}

impl Vm {
    /// Save this VM (running: paused briefly; paused: stays paused) into `dir` (created if
    /// missing; existing snapshot files are replaced atomically).
    pub fn snapshot(&self, dir: &Path) -> Result<SnapshotReport, VmError> {
        let t0 = Instant::now();
        std::fs::create_dir_all(dir)
            .map_err(|e| VmError::SnapshotIo(format!("creating {}: {e}", dir.display())))?;
        clean(dir);
        let generation = self.freeze()?;
        let freeze = *generation.freeze_report();
        let kernel = write_blob(dir, KERNEL_FILE, &self.cfg.kernel)?;
        let disk = write_blob(dir, DISK_FILE, &self.cfg.disk)?;
        let payload = SnapshotPayload {
            version: STATE_VERSION,
            name: self.name().to_string(),
            mem_bytes: self.mem_bytes(),
            cmdline: self.cfg.cmdline.clone(),
            kernel,
            disk,
            machine: generation.state.clone(),
        };
        let memory = snapfile::write_snapshot(
            &SnapshotPaths::in_dir(dir),
            &payload,
            generation.image.as_ref(),
        )
        .map_err(snap_err)?;
        Ok(SnapshotReport {
            dir: dir.to_path_buf(),
            pause: freeze.pause,
            freeze,
            memory,
            total: t0.elapsed(),
        })
    }

    /// Restore a VM saved by [`Vm::snapshot`] as a new, running VM named `name`, with its
    /// memory served lazily from the memory file or copied eagerly. Everything is validated
    /// first: a corrupt snapshot gives [`VmError::SnapshotCorrupt`], another format version
    /// [`VmError::SnapshotIncompatible`], and nothing is created.
    pub fn restore(dir: &Path, mode: MemoryMode, name: &str) -> Result<Vm, VmError> {
        Self::restore_with(dir, mode, name, false)
    }

    /// [`Vm::restore`], optionally leaving the VM paused.
    pub fn restore_with(
        dir: &Path,
        mode: MemoryMode,
        name: &str,
        start_paused: bool,
    ) -> Result<Vm, VmError> {
        let paths = SnapshotPaths::in_dir(dir);
        clean(dir);
        let snap = snapfile::open_snapshot_bytes_verified(&paths).map_err(snap_err)?;
        let (info, image) = (snap.memory, snap.image);
        let state_path = paths.state.display().to_string();
        let p = decode_payload(&snap.payload, &state_path, snap.page_table)?;
        if let Some(why) = HostCpu::current().incompatibility(&p.machine.cpu) {
            return Err(VmError::SnapshotIncompatible {
                path: state_path,
                what: why,
            });
        }
        let corrupt = |what: String| VmError::SnapshotCorrupt {
            path: state_path.clone(),
            what,
        };
        validate::validate_payload(&p, &info).map_err(corrupt)?;
        let n = p.machine.vcpus.len();
        let kernel = read_blob(dir, &p.kernel)?;
        let disk = read_blob(dir, &p.disk)?;
        let cfg = VmConfig {
            name: name.into(),
            mem_bytes: p.mem_bytes,
            vcpus: n as u32,
            kernel,
            cmdline: p.cmdline,
            disk,
            net: None,
            // The mode comes from the saved vCPU state (see `clone::child::spawn`).
            guest_mode: crate::mode::GuestMode::Auto,
        };
        let generation = Arc::new(Generation {
            id: 0,
            image,
            state: p.machine,
            cfg,
            created: Instant::now(),
            freeze: FreezeReport::default(),
        });
        spawn(
            &generation,
            &ChildSpec {
                name: name.into(),
                index: 0,
                memory: mode,
                prefetcher: None,
                start_paused,
                fault_spin: crate::clone::FAULT_SPIN,
                anon_memory: false,
                identity: false,
                pool: None,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_table_goes_with_the_state_version() {
        let at = |major: u16, minor: u16| {
            format!(r#"{{"version":{{"major":{major},"minor":{minor}}}}}"#)
        };
        // 3.0 promises a CRC-32 per page: a state file without the table is altered.
        let e = decode_payload(at(3, 0).as_bytes(), "s", false).unwrap_err();
        assert!(
            matches!(&e, VmError::SnapshotCorrupt { what, .. } if what.contains("no page table")),
            "{e}"
        );
        // With the table it passes the version checks (and fails later, on the missing state).
        let e = decode_payload(at(3, 0).as_bytes(), "s", true).unwrap_err();
        assert!(e.to_string().contains("machine.vcpus"), "{e}");
        // 2.x guests map their devices at 3 GiB; a newer minor or major is from a newer build.
        for (major, minor) in [(2, 0), (2, 1), (2, 2), (3, 1), (4, 0)] {
            let e = decode_payload(at(major, minor).as_bytes(), "s", true).unwrap_err();
            assert!(
                matches!(e, VmError::SnapshotIncompatible { .. }),
                "{major}.{minor}: {e}"
            );
        }
    }
}
