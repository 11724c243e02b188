//! The guest kernel must never execute SSE (PVM emulates CPL0 and cannot emulate SSE, see
//! PLATFORM.md). Disassemble the embedded kernel and fail on any xmm/ymm/zmm register use,
//! anywhere in the image (so no unreachable-but-linked code can hide one either).

#[test]
fn kernel_contains_no_sse_instruction() {
    let dir = std::env::temp_dir().join(format!("kscope-no-sse-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let elf = dir.join("kscope-kernel.elf");
    std::fs::write(&elf, kscope_guest::KERNEL_ELF).unwrap();
    let out = std::process::Command::new("objdump")
        .args(["-d", "--no-show-raw-insn", "-M", "intel"])
        .arg(&elf)
        .output()
        .expect("objdump (binutils) is needed to check the kernel for SSE");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "objdump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut function = String::new();
    let mut bad = Vec::new();
    let mut instructions = 0;
    for line in text.lines() {
        if line.ends_with(">:") {
            function = line.to_string();
            continue;
        }
        let Some((addr, _)) = line.split_once(":\t") else {
            continue;
        };
        if addr.trim().is_empty() || !addr.trim().chars().all(|c| c.is_ascii_hexdigit()) {
            continue;
        }
        instructions += 1;
        let l = line.to_ascii_lowercase();
        if ["xmm", "ymm", "zmm", "mxcsr"].iter().any(|r| l.contains(r)) {
            bad.push(format!("{function} {line}"));
        }
    }
    assert!(
        instructions > 1000,
        "disassembly looks empty ({instructions} instructions)"
    );
    assert!(bad.is_empty(), "SSE in the kernel:\n{}", bad.join("\n"));
}

#[test]
fn kernel_links_no_core_formatting() {
    // core::fmt is the usual way SSE sneaks in (precompiled with SSE); the kernel redirects
    // core's panic helpers so that none of it is linked (see build.rs).
    let s = String::from_utf8_lossy(kscope_guest::KERNEL_ELF);
    assert!(
        !s.contains("pad_integral"),
        "core::fmt::Formatter::pad_integral is linked"
    );
}
