//! The BootInfo block and the clone-generation page written before the first instruction.

use crate::error::VmError;
use crate::mode::CpuMode;
use kscope_guest::abi::boot::{
    BootInfo, DeviceDesc, GenPage, Identity, BOOT_INFO_MAGIC, BOOT_INFO_VERSION, CMDLINE_MAX,
    GENPAGE_MAGIC, MAX_DEVICES,
};
use kscope_guest::abi::layout::PVM_PAGE_GPA;

/// Build the [`BootInfo`] block.
pub fn boot_info(
    vcpus: u32,
    mem_bytes: u64,
    kernel_phys_end: u64,
    tsc_khz: u64,
    devices: &[DeviceDesc],
    cmdline: &str,
    mode: CpuMode,
) -> Result<BootInfo, VmError> {
    if devices.len() > MAX_DEVICES {
        return Err(VmError::BadConfig(format!(
            "{} devices, at most {MAX_DEVICES} fit in BootInfo",
            devices.len()
        )));
    }
    let cmd = cmdline.as_bytes();
    if cmd.len() >= CMDLINE_MAX {
        return Err(VmError::BadConfig(format!(
            "command line is {} bytes, at most {} allowed",
            cmd.len(),
            CMDLINE_MAX - 1
        )));
    }
    if cmd.contains(&0) {
        return Err(VmError::BadConfig(
            "command line contains a NUL byte".into(),
        ));
    }
    let mut info = BootInfo {
        magic: BOOT_INFO_MAGIC,
        version: BOOT_INFO_VERSION,
        vcpus,
        mem_bytes,
        kernel_phys_end,
        tsc_khz,
        device_count: devices.len() as u32,
        cmdline_len: cmd.len() as u32,
        devices: [DeviceDesc::default(); MAX_DEVICES],
        cmdline: [0; CMDLINE_MAX],
        guest_mode: mode.abi(),
        reserved: 0,
        pvm_page: match mode {
            CpuMode::Native => PVM_PAGE_GPA,
            CpuMode::Emulated => 0,
        },
    };
    info.devices[..devices.len()].copy_from_slice(devices);
    info.cmdline[..cmd.len()].copy_from_slice(cmd);
    Ok(info)
}

/// Fill `buf` with random bytes from the host (getrandom(2)).
pub fn host_random(buf: &mut [u8]) -> Result<(), VmError> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid writable buffer of `rest.len()` bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = vmm_sys_util::errno::Error::last();
            if e.errno() == libc::EINTR {
                continue;
            }
            return Err(VmError::kvm("getrandom", e));
        }
        done += n as usize;
    }
    Ok(())
}

/// Build a [`GenPage`] for `generation` / `clone_id` with fresh host randomness.
pub fn gen_page(generation: u64, clone_id: u64, identity: Identity) -> Result<GenPage, VmError> {
    let mut seed = [0u8; 32];
    host_random(&mut seed)?;
    Ok(GenPage {
        magic: GENPAGE_MAGIC,
        generation,
        clone_id,
        seed,
        identity,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kscope_guest::abi::{as_bytes, from_bytes, DeviceKind};
    use std::mem::offset_of;

    #[test]
    fn layout_is_stable() {
        // The offsets the guest kernel reads (repr(C), x86-64).
        assert_eq!(offset_of!(BootInfo, magic), 0);
        assert_eq!(offset_of!(BootInfo, version), 8);
        assert_eq!(offset_of!(BootInfo, vcpus), 12);
        assert_eq!(offset_of!(BootInfo, mem_bytes), 16);
        assert_eq!(offset_of!(BootInfo, kernel_phys_end), 24);
        assert_eq!(offset_of!(BootInfo, tsc_khz), 32);
        assert_eq!(offset_of!(BootInfo, device_count), 40);
        assert_eq!(offset_of!(BootInfo, cmdline_len), 44);
        assert_eq!(offset_of!(BootInfo, devices), 48);
        assert_eq!(offset_of!(BootInfo, cmdline), 48 + 24 * MAX_DEVICES);
        assert_eq!(offset_of!(BootInfo, guest_mode), 1264);
        assert_eq!(offset_of!(BootInfo, pvm_page), 1272);
        assert!(std::mem::size_of::<BootInfo>() <= 4096);
        assert!(std::mem::size_of::<GenPage>() <= 4096);
    }

    #[test]
    fn boot_info_round_trips_through_bytes() {
        let dev = DeviceDesc {
            kind: DeviceKind::Block as u32,
            irq: 0,
            gpa: 0xc000_0000,
            size: 0x1000,
        };
        let info = boot_info(
            1,
            64 << 20,
            0x20_0000,
            2_000_000,
            &[dev],
            "init=/bin/web",
            CpuMode::Native,
        )
        .unwrap();
        assert_eq!((info.guest_mode, info.pvm_page), (1, PVM_PAGE_GPA));
        let bytes = as_bytes(&info).to_vec();
        assert_eq!(&bytes[0..8], b"KSBOOT\0\0");
        let back: BootInfo = from_bytes(&bytes).unwrap();
        assert_eq!(back.cmdline(), b"init=/bin/web");
        assert_eq!(back.cmdline[13], 0);
        assert_eq!(back.device_count, 1);
        assert_eq!(back.devices[0].gpa, 0xc000_0000);
        assert_eq!(back.tsc_khz, 2_000_000);
        assert!(boot_info(1, 0, 0, 0, &[], &"x".repeat(CMDLINE_MAX), CpuMode::Emulated).is_err());
        assert!(boot_info(1, 0, 0, 0, &[dev; MAX_DEVICES + 1], "", CpuMode::Emulated).is_err());
    }

    #[test]
    fn gen_pages_get_fresh_seeds() {
        let a = gen_page(0, 0, Identity::default()).unwrap();
        let b = gen_page(0, 0, Identity::default()).unwrap();
        assert_eq!(a.magic, GENPAGE_MAGIC);
        assert_ne!(a.seed, b.seed);
    }
}
