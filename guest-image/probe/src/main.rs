//! Prints the path of the probe guest ELF, for scripts:
//! `keystone-vmm --kernel "$(cargo run -q -p keystone-probe)" ...`

fn main() {
    println!("{}", keystone_probe::elf_path().display());
}
