//! Hand-assembled test guests: a tiny x86-64 assembler for the few instructions the tests
//! need, and helpers to boot the result as a kscope kernel ELF.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kscope_guest::abi::layout::{ports, DIRECT_MAP_BASE, KERNEL_PHYS_BASE, KERNEL_VIRT_BASE};
use kscope_vmm::loader::build_test_elf;
use kscope_vmm::{Vm, VmConfig};

pub mod driver;

/// Registers by encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum R {
    Rax = 0,
    Rcx = 1,
    Rdx = 2,
    Rbx = 3,
    Rsp = 4,
    Rbp = 5,
    Rsi = 6,
    Rdi = 7,
}

/// Condition codes for `jcc`.
#[derive(Clone, Copy, Debug)]
#[repr(u8)]
pub enum Cc {
    E = 0x4,
    Ne = 0x5,
}

/// A minimal assembler with labels (rel32 jumps only).
#[derive(Default)]
pub struct Asm {
    pub code: Vec<u8>,
    labels: HashMap<&'static str, usize>,
    fixups: Vec<(usize, &'static str)>,
}

fn modrm_disp32(reg: u8, base: R) -> Vec<u8> {
    assert!(base != R::Rsp, "rsp base needs a SIB byte");
    let mut v = vec![0x80 | (reg << 3) | base as u8];
    v.extend_from_slice(&0i32.to_le_bytes());
    v
}

impl Asm {
    pub fn new() -> Asm {
        Asm::default()
    }
    fn b(&mut self, bytes: &[u8]) -> &mut Self {
        self.code.extend_from_slice(bytes);
        self
    }
    /// Current offset.
    pub fn here(&self) -> usize {
        self.code.len()
    }
    /// Define a label here.
    pub fn label(&mut self, name: &'static str) -> &mut Self {
        self.labels.insert(name, self.code.len());
        self
    }
    fn rel32(&mut self, name: &'static str) -> &mut Self {
        self.fixups.push((self.code.len(), name));
        self.b(&[0; 4])
    }
    /// `jmp label`.
    pub fn jmp(&mut self, name: &'static str) -> &mut Self {
        self.b(&[0xe9]).rel32(name)
    }
    /// `jcc label`.
    pub fn jcc(&mut self, cc: Cc, name: &'static str) -> &mut Self {
        self.b(&[0x0f, 0x80 | cc as u8]).rel32(name)
    }
    /// `mov r64, imm64`.
    pub fn mov_imm(&mut self, r: R, imm: u64) -> &mut Self {
        self.b(&[0x48, 0xb8 + r as u8]).b(&imm.to_le_bytes())
    }
    /// `mov r64, r64` (dst <- src).
    pub fn mov(&mut self, dst: R, src: R) -> &mut Self {
        self.b(&[0x48, 0x89, 0xc0 | ((src as u8) << 3) | dst as u8])
    }
    /// `mov dword [base + disp], src32`.
    pub fn store32(&mut self, base: R, disp: i32, src: R) -> &mut Self {
        let mut m = modrm_disp32(src as u8, base);
        m[1..5].copy_from_slice(&disp.to_le_bytes());
        self.b(&[0x89]).b(&m)
    }
    /// `mov qword [base + disp], src`.
    pub fn store64(&mut self, base: R, disp: i32, src: R) -> &mut Self {
        let mut m = modrm_disp32(src as u8, base);
        m[1..5].copy_from_slice(&disp.to_le_bytes());
        self.b(&[0x48, 0x89]).b(&m)
    }
    /// `mov word [base + disp], src16`.
    pub fn store16(&mut self, base: R, disp: i32, src: R) -> &mut Self {
        let mut m = modrm_disp32(src as u8, base);
        m[1..5].copy_from_slice(&disp.to_le_bytes());
        self.b(&[0x66, 0x89]).b(&m)
    }
    /// `mov dst32, dword [base + disp]` (zero-extends).
    pub fn load32(&mut self, dst: R, base: R, disp: i32) -> &mut Self {
        let mut m = modrm_disp32(dst as u8, base);
        m[1..5].copy_from_slice(&disp.to_le_bytes());
        self.b(&[0x8b]).b(&m)
    }
    /// `mov dst, qword [base + disp]`.
    pub fn load64(&mut self, dst: R, base: R, disp: i32) -> &mut Self {
        let mut m = modrm_disp32(dst as u8, base);
        m[1..5].copy_from_slice(&disp.to_le_bytes());
        self.b(&[0x48, 0x8b]).b(&m)
    }
    /// `movzx dst32, word [base + disp]`.
    pub fn load16(&mut self, dst: R, base: R, disp: i32) -> &mut Self {
        let mut m = modrm_disp32(dst as u8, base);
        m[1..5].copy_from_slice(&disp.to_le_bytes());
        self.b(&[0x0f, 0xb7]).b(&m)
    }
    /// `cmp a64, b64`.
    pub fn cmp(&mut self, a: R, b: R) -> &mut Self {
        self.b(&[0x48, 0x39, 0xc0 | ((b as u8) << 3) | a as u8])
    }
    /// `add r64, imm32` (sign-extended).
    pub fn add_imm(&mut self, r: R, imm: i32) -> &mut Self {
        self.b(&[0x48, 0x81, 0xc0 | r as u8]).b(&imm.to_le_bytes())
    }
    /// `or r32, imm32`.
    pub fn or_imm(&mut self, r: R, imm: u32) -> &mut Self {
        self.b(&[0x81, 0xc8 | r as u8]).b(&imm.to_le_bytes())
    }
    /// `and r32, imm32`.
    pub fn and_imm(&mut self, r: R, imm: u32) -> &mut Self {
        self.b(&[0x81, 0xe0 | r as u8]).b(&imm.to_le_bytes())
    }
    /// `shl r64, imm8`.
    pub fn shl_imm(&mut self, r: R, n: u8) -> &mut Self {
        self.b(&[0x48, 0xc1, 0xe0 | r as u8, n])
    }
    /// `add dst64, src64`.
    pub fn add(&mut self, dst: R, src: R) -> &mut Self {
        self.b(&[0x48, 0x01, 0xc0 | ((src as u8) << 3) | dst as u8])
    }
    /// `mov dword [base + disp], imm32` via eax (clobbers eax).
    pub fn store32_imm(&mut self, base: R, disp: i32, v: u32) -> &mut Self {
        self.mov_eax(v).store32(base, disp, R::Rax)
    }
    /// `inc qword [base + disp]`.
    pub fn inc_mem64(&mut self, base: R, disp: i32) -> &mut Self {
        let mut m = modrm_disp32(0, base);
        m[1..5].copy_from_slice(&disp.to_le_bytes());
        self.b(&[0x48, 0xff]).b(&m)
    }
    /// `dec r64`.
    pub fn dec(&mut self, r: R) -> &mut Self {
        self.b(&[0x48, 0xff, 0xc8 | r as u8])
    }
    /// `xor r32, r32` (zero).
    pub fn zero(&mut self, r: R) -> &mut Self {
        self.b(&[0x31, 0xc0 | ((r as u8) << 3) | r as u8])
    }
    /// `push r64`.
    pub fn push(&mut self, r: R) -> &mut Self {
        self.b(&[0x50 + r as u8])
    }
    /// `pop r64`.
    pub fn pop(&mut self, r: R) -> &mut Self {
        self.b(&[0x58 + r as u8])
    }
    /// `mov rax, cr0` / `cr3` / `cr4`.
    pub fn mov_from_cr(&mut self, cr: u8) -> &mut Self {
        self.b(&[0x0f, 0x20, 0xc0 | (cr << 3)])
    }
    /// `mov cr3, rax`.
    pub fn mov_cr3_rax(&mut self) -> &mut Self {
        self.b(&[0x0f, 0x22, 0xd8])
    }
    /// `mov eax, cs` (zero-extended selector).
    pub fn mov_eax_cs(&mut self) -> &mut Self {
        self.b(&[0x8c, 0xc8])
    }
    /// `str eax` (task register selector).
    pub fn str_eax(&mut self) -> &mut Self {
        self.b(&[0x0f, 0x00, 0xc8])
    }
    /// `mov edx, imm32`.
    pub fn mov_edx(&mut self, v: u32) -> &mut Self {
        self.b(&[0xba]).b(&v.to_le_bytes())
    }
    /// `mov eax, imm32`.
    pub fn mov_eax(&mut self, v: u32) -> &mut Self {
        self.b(&[0xb8]).b(&v.to_le_bytes())
    }
    /// `out dx, al`.
    pub fn out_al(&mut self) -> &mut Self {
        self.b(&[0xee])
    }
    /// `out dx, eax`.
    pub fn out_eax(&mut self) -> &mut Self {
        self.b(&[0xef])
    }
    /// `outl port, value`.
    pub fn outl(&mut self, port: u16, v: u32) -> &mut Self {
        self.mov_edx(port as u32).mov_eax(v).out_eax()
    }
    /// `out port, eax` with the current eax.
    pub fn out_eax_to(&mut self, port: u16) -> &mut Self {
        self.mov_edx(port as u32).out_eax()
    }
    /// Write `s` to COM1.
    pub fn print(&mut self, s: &str) -> &mut Self {
        self.mov_edx(ports::SERIAL_COM1 as u32);
        for c in s.bytes() {
            self.b(&[0xb0, c]).out_al();
        }
        self
    }
    /// `hlt`.
    pub fn hlt(&mut self) -> &mut Self {
        self.b(&[0xf4])
    }
    /// `ud2`.
    pub fn ud2(&mut self) -> &mut Self {
        self.b(&[0x0f, 0x0b])
    }
    /// `jmp $` (spin forever).
    pub fn spin(&mut self) -> &mut Self {
        self.b(&[0xeb, 0xfe])
    }
    /// Resolve labels and return the code.
    pub fn finish(&mut self) -> Vec<u8> {
        for &(at, name) in &self.fixups {
            let target = *self
                .labels
                .get(name)
                .unwrap_or_else(|| panic!("label {name}"));
            let rel = target as i64 - (at as i64 + 4);
            self.code[at..at + 4].copy_from_slice(&(rel as i32).to_le_bytes());
        }
        self.code.clone()
    }
}

/// Virtual address of code offset `off` in a test kernel.
pub fn code_va(off: usize) -> u64 {
    KERNEL_VIRT_BASE + KERNEL_PHYS_BASE + off as u64
}

/// Direct-map address of a guest-physical address.
pub fn dm(gpa: u64) -> u64 {
    DIRECT_MAP_BASE + gpa
}

/// A config for a hand-assembled guest.
pub fn config(name: &str, code: &[u8]) -> VmConfig {
    VmConfig {
        name: name.into(),
        mem_bytes: 16 << 20,
        vcpus: 1,
        kernel: Arc::from(build_test_elf(code, KERNEL_PHYS_BASE)),
        cmdline: "test=1".into(),
        disk: Arc::from(vec![0u8; 4096]),
        net: None,
        guest_mode: kscope_vmm::GuestMode::Emulated,
    }
}

/// Boot `code` and return the VM.
pub fn boot(name: &str, code: &[u8]) -> Vm {
    Vm::boot(config(name, code)).expect("boot")
}

/// Wait until the VM leaves Booting/Running/Paused (or panic after `t`).
pub fn wait_end(vm: &Vm, t: Duration) {
    let start = std::time::Instant::now();
    while matches!(
        vm.state(),
        kscope_vmm::VmState::Booting | kscope_vmm::VmState::Running | kscope_vmm::VmState::Paused
    ) {
        assert!(
            start.elapsed() < t,
            "VM {} did not end within {t:?}",
            vm.name()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}
