//! Placeholder kernel entry (replaced by the real kernel).
#![no_std]
#![no_main]

#[no_mangle]
#[link_section = ".text.entry"]
pub extern "C" fn _start() -> ! {
    loop {
        // SAFETY: halting the CPU has no memory effects.
        unsafe { core::arch::asm!("hlt") };
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// Required by the precompiled `core` of the host target.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
