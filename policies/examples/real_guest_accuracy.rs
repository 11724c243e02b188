//! Boot the real kscope kernel (with the `ktest` init program), pause it, color its memory and
//! print the coloring time, the color counts and the accuracy against the kernel's ground
//! truth as JSON: `real_guest_accuracy [MiB]` (default 64).

use std::sync::Arc;
use std::time::{Duration, Instant};

use kscope_colorer::accuracy;
use kscope_guest::abi::kinfo::file_kind;
use kscope_vmm::{Vm, VmConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mib: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(64);
    let mut fs = kscope_guest::mkfs::FsBuilder::new();
    for (path, elf) in kscope_guest::PROGRAMS {
        fs.add(path, file_kind::EXEC, elf)
            .map_err(|e| format!("{e:?}"))?;
    }
    let vm = Vm::boot(VmConfig {
        name: "color-accuracy".into(),
        mem_bytes: mib << 20,
        vcpus: 1,
        kernel: Arc::from(kscope_guest::KERNEL_ELF),
        cmdline: "init=/bin/ktest".into(),
        disk: Arc::from(fs.build()),
        net: None,
        guest_mode: kscope_vmm::GuestMode::process_default(),
    })?;
    if let Err(e) = vm.wait_ready(Duration::from_secs(60)) {
        return Err(format!("kernel not ready: {e}\n{}", vm.serial_output()).into());
    }
    vm.pause()?;
    let mut mem = vec![0u8; vm.mem_bytes() as usize];
    vm.read_phys(0, &mut mem)?;
    let t = Instant::now();
    let map = kscope_colorer::color_kscope(&mem, None)?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let report = accuracy::measure(&mem, &map)?;
    println!(
        "{{\"mem_mib\":{mib},\"color_ms\":{ms:.2},\"stats\":{}}}",
        serde_json::to_string(&map.stats)?
    );
    println!("{}", serde_json::to_string_pretty(&report)?);
    vm.stop()?;
    Ok(())
}
