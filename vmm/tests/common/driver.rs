//! A hand-assembled guest that drives the kscope request device like the real kernel does:
//! it maps the MMIO window, negotiates VERSION_1, sets up the RX and TX queues, posts RX
//! buffers, reports READY, then loops: `hlt`; for every used RX buffer answer with a
//! response whose status is the request's kind and whose payload is empty; notify TX; repost
//! the buffer.

use super::*;
use kscope_guest::abi::layout::{KERNEL_PHYS_BASE, MMIO_BASE, MMIO_DEVICE_SIZE};
use kscope_vmm::boot::paging::DIRECT_PDPT_GPA;

const IMG: u64 = KERNEL_PHYS_BASE;
const RXD: i32 = 0x1000;
const RXA: i32 = 0x2000;
const RXU: i32 = 0x3000;
const TXD: i32 = 0x4000;
const TXB: i32 = 0x5000;
const TXA: i32 = 0x6000;
const TXU: i32 = 0x7000;
/// Guest-physical base of the RX buffers (8 x 4 KiB).
pub const RX_BUFS: u64 = 0x20_0000;
/// PD page used to map the MMIO window.
const MMIO_PD: u64 = 0x5000;
/// Request device registers.
const REQ: u64 = MMIO_BASE + MMIO_DEVICE_SIZE;

/// Map the first 2 MiB of the MMIO window at `dm(MMIO_BASE)` (uncached) and point rbx at
/// the request device's registers.
pub fn map_mmio(a: &mut Asm) {
    a.mov_imm(R::Rsi, dm(MMIO_PD))
        .mov_imm(R::Rax, MMIO_BASE | 0x93)
        .store64(R::Rsi, 0, R::Rax);
    a.mov_imm(R::Rsi, dm(DIRECT_PDPT_GPA))
        .mov_imm(R::Rax, MMIO_PD | 3);
    a.store64(R::Rsi, 8 * (MMIO_BASE >> 30) as i32, R::Rax);
    a.mov_from_cr(3).mov_cr3_rax();
    a.mov_imm(R::Rbx, dm(REQ));
}

fn setup_queue(a: &mut Asm, q: u32, desc: i32, avail: i32, used: i32) {
    a.store32_imm(R::Rbx, 0x30, q).store32_imm(R::Rbx, 0x38, 8);
    a.store32_imm(R::Rbx, 0x80, (IMG as i32 + desc) as u32)
        .store32_imm(R::Rbx, 0x84, 0);
    a.store32_imm(R::Rbx, 0x90, (IMG as i32 + avail) as u32)
        .store32_imm(R::Rbx, 0x94, 0);
    a.store32_imm(R::Rbx, 0xa0, (IMG as i32 + used) as u32)
        .store32_imm(R::Rbx, 0xa4, 0);
    a.store32_imm(R::Rbx, 0x44, 1);
}

/// The echo guest's kernel image (code + pre-built rings).
pub fn echo_guest() -> Vec<u8> {
    let mut a = Asm::new();
    map_mmio(&mut a);
    // Check the magic value and device id; panic(100) otherwise.
    a.load32(R::Rax, R::Rbx, 0)
        .mov_imm(R::Rcx, 0x7472_6976)
        .cmp(R::Rax, R::Rcx)
        .jcc(Cc::Ne, "bad");
    a.load32(R::Rax, R::Rbx, 8)
        .mov_imm(R::Rcx, 0x4b53)
        .cmp(R::Rax, R::Rcx)
        .jcc(Cc::Ne, "bad");
    // ACK, DRIVER, VERSION_1, FEATURES_OK.
    a.store32_imm(R::Rbx, 0x70, 1).store32_imm(R::Rbx, 0x70, 3);
    a.store32_imm(R::Rbx, 0x24, 1).store32_imm(R::Rbx, 0x20, 1);
    a.store32_imm(R::Rbx, 0x70, 0xb);
    a.load32(R::Rax, R::Rbx, 0x70)
        .mov_imm(R::Rcx, 0xb)
        .cmp(R::Rax, R::Rcx)
        .jcc(Cc::Ne, "bad");
    setup_queue(&mut a, 0, RXD, RXA, RXU);
    setup_queue(&mut a, 1, TXD, TXA, TXU);
    a.store32_imm(R::Rbx, 0x70, 0xf);
    a.mov_imm(R::Rsi, dm(IMG)).zero(R::Rdi).zero(R::Rbp);
    a.outl(ports::READY, 1);
    a.label("idle").hlt();
    a.label("check");
    a.load16(R::Rax, R::Rsi, RXU + 2)
        .cmp(R::Rax, R::Rdi)
        .jcc(Cc::E, "idle");
    // rax = descriptor id of used entry rdi.
    a.mov(R::Rcx, R::Rdi)
        .and_imm(R::Rcx, 7)
        .shl_imm(R::Rcx, 3)
        .add(R::Rcx, R::Rsi);
    a.load32(R::Rax, R::Rcx, RXU + 4);
    // rdx = direct-map address of its buffer.
    a.mov(R::Rdx, R::Rax)
        .shl_imm(R::Rdx, 12)
        .mov_imm(R::Rcx, dm(RX_BUFS))
        .add(R::Rdx, R::Rcx);
    a.push(R::Rax);
    // Response header: id, status = kind, len = 0.
    a.load64(R::Rax, R::Rdx, 0).store64(R::Rsi, TXB, R::Rax);
    a.load32(R::Rax, R::Rdx, 8).store32(R::Rsi, TXB + 8, R::Rax);
    a.zero(R::Rax).store32(R::Rsi, TXB + 12, R::Rax);
    // TX avail ring[rbp & 7] = descriptor 0; avail.idx = ++rbp; notify queue 1.
    a.mov(R::Rcx, R::Rbp)
        .and_imm(R::Rcx, 7)
        .shl_imm(R::Rcx, 1)
        .add(R::Rcx, R::Rsi);
    a.zero(R::Rax).store16(R::Rcx, TXA + 4, R::Rax);
    a.add_imm(R::Rbp, 1)
        .mov(R::Rax, R::Rbp)
        .store16(R::Rsi, TXA + 2, R::Rax);
    a.store32_imm(R::Rbx, 0x50, 1);
    // Repost the RX buffer: avail ring[(8 + rdi) & 7] = id; avail.idx = 8 + ++rdi.
    a.pop(R::Rax);
    a.mov(R::Rcx, R::Rdi)
        .and_imm(R::Rcx, 7)
        .shl_imm(R::Rcx, 1)
        .add(R::Rcx, R::Rsi);
    a.store16(R::Rcx, RXA + 4, R::Rax);
    a.add_imm(R::Rdi, 1)
        .mov(R::Rax, R::Rdi)
        .add_imm(R::Rax, 8)
        .store16(R::Rsi, RXA + 2, R::Rax);
    a.jmp("check");
    a.label("bad").outl(ports::PANIC, 100).hlt();
    let code = a.finish();
    assert!(code.len() < RXD as usize);

    let mut img = vec![0u8; 0x8000];
    img[..code.len()].copy_from_slice(&code);
    let put = |img: &mut Vec<u8>, off: usize, b: &[u8]| img[off..off + b.len()].copy_from_slice(b);
    for i in 0..8u64 {
        let d = RXD as usize + i as usize * 16;
        put(&mut img, d, &(RX_BUFS + i * 0x1000).to_le_bytes());
        put(&mut img, d + 8, &4096u32.to_le_bytes());
        put(&mut img, d + 12, &2u16.to_le_bytes()); // VIRTQ_DESC_F_WRITE
        put(
            &mut img,
            RXA as usize + 4 + i as usize * 2,
            &(i as u16).to_le_bytes(),
        );
    }
    put(&mut img, RXA as usize + 2, &8u16.to_le_bytes());
    put(&mut img, TXD as usize, &(IMG + TXB as u64).to_le_bytes());
    put(&mut img, TXD as usize + 8, &16u32.to_le_bytes());
    img
}

/// A guest that writes QueueNotify (for a queue index that does not exist) `n` times
/// between READY and POWEROFF.
pub fn notify_loop_guest(n: u64) -> Vec<u8> {
    let mut a = Asm::new();
    map_mmio(&mut a);
    a.outl(ports::READY, 1).mov_imm(R::Rcx, n).mov_eax(7);
    a.label("l")
        .store32(R::Rbx, 0x50, R::Rax)
        .dec(R::Rcx)
        .jcc(Cc::Ne, "l");
    a.outl(ports::POWEROFF, 0).hlt();
    a.finish()
}
