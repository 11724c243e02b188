fn main() {
    println!("kernel: {} bytes", kscope_guest::KERNEL_ELF.len());
}
