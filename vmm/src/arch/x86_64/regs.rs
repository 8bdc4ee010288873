//! Register state for entering a 64-bit kernel: identity page tables, GDT,
//! segment registers, control registers, general registers, FPU and the
//! LAPIC's LINT0/LINT1 wiring.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt::{boot_gdt, segment_from_gdt};
use super::layout::{
    BOOT_STACK_POINTER, GDT_ADDR, IDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR, ZERO_PAGE_ADDR,
};

/// Errors writing boot structures into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// The page tables do not fit in guest memory.
    #[error("cannot write the boot page tables into guest memory: {0}")]
    PageTables(vm_memory::GuestMemoryError),
    /// The GDT or IDT does not fit in guest memory.
    #[error("cannot write the boot GDT/IDT into guest memory: {0}")]
    DescriptorTables(vm_memory::GuestMemoryError),
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Page table entry bits.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_HUGE: u64 = 1 << 7;

/// Number of page directories: each maps 1 GiB with 2 MiB pages.
pub const IDENTITY_MAPPED_GIB: u64 = 4;

/// Write an identity map of the first 4 GiB (2 MiB pages): RAM below the gap
/// for the kernel, and the MMIO gap (boot timer, LAPIC, IOAPIC) for the
/// probe guest, which runs on these tables.
pub fn setup_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    let w = |addr: u64, val: u64| {
        mem.write_obj(val, GuestAddress(addr))
            .map_err(RegsError::PageTables)
    };
    w(PML4_ADDR, PDPT_ADDR | PTE_PRESENT | PTE_WRITABLE)?;
    for gib in 0..IDENTITY_MAPPED_GIB {
        let pd = PD_ADDR + gib * 0x1000;
        w(PDPT_ADDR + gib * 8, pd | PTE_PRESENT | PTE_WRITABLE)?;
        for i in 0..512u64 {
            let phys = (gib << 30) | (i << 21);
            w(pd + i * 8, phys | PTE_PRESENT | PTE_WRITABLE | PTE_HUGE)?;
        }
    }
    Ok(())
}

/// Write the GDT and an empty IDT, and return the special registers for
/// 64-bit long mode with paging on `PML4_ADDR`.
pub fn long_mode_sregs(
    mem: &GuestMemoryMmap,
    mut sregs: kvm_sregs,
) -> Result<kvm_sregs, RegsError> {
    let gdt = boot_gdt();
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + i as u64 * 8))
            .map_err(RegsError::DescriptorTables)?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(RegsError::DescriptorTables)?;

    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;

    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    sregs.cr0 = (sregs.cr0 | X86_CR0_PE | X86_CR0_ET | X86_CR0_PG) & !(1 << 30 | 1 << 29);
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    Ok(sregs)
}

/// General registers at entry: `rip` the 64-bit entry point, `rsi` the zero
/// page (Linux 64-bit boot protocol), a small stack, interrupts off.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_ADDR,
        ..Default::default()
    }
}

/// FPU state at reset: x87 control word 0x37f, MXCSR 0x1f80.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &state.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        state.regs[offset + i] = *byte as _;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Wire LINT0 as ExtINT (the legacy PIC) and LINT1 as NMI, as a PC BIOS
/// leaves them (and as the MP table we write says).
pub fn set_lint(state: &mut kvm_lapic_state) {
    let lvt0 = lapic_reg(state, APIC_LVT0);
    set_lapic_reg(state, APIC_LVT0, with_delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(state, APIC_LVT1);
    set_lapic_reg(state, APIC_LVT1, with_delivery_mode(lvt1, APIC_MODE_NMI));
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn page_tables_identity_map_four_gib() {
        let m = mem();
        setup_page_tables(&m).unwrap();
        let pml4: u64 = m.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4, PDPT_ADDR | 3);
        // Walk a few addresses: 0, the kernel, the boot timer, the LAPIC.
        for addr in [0u64, 0x100_0000, 0xc000_0000, 0xfee0_0000, 0xffff_ffff] {
            let pdpte: u64 = m
                .read_obj(GuestAddress(PDPT_ADDR + ((addr >> 30) & 511) * 8))
                .unwrap();
            assert_eq!(pdpte & 1, 1);
            let pde: u64 = m
                .read_obj(GuestAddress((pdpte & !0xfff) + ((addr >> 21) & 511) * 8))
                .unwrap();
            assert_eq!(pde & 0x83, 0x83, "present, writable, 2 MiB page");
            assert_eq!(pde & !0x1f_ffff, addr & !0x1f_ffff, "identity");
        }
        // Nothing past 4 GiB is mapped.
        let pdpte4: u64 = m.read_obj(GuestAddress(PDPT_ADDR + 4 * 8)).unwrap();
        assert_eq!(pdpte4, 0);
    }

    #[test]
    fn sregs_enter_long_mode() {
        let m = mem();
        let s = long_mode_sregs(&m, kvm_sregs::default()).unwrap();
        assert_eq!(s.cr3, PML4_ADDR);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.cr0 & X86_CR0_PE, 0);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.gdt.base, GDT_ADDR);
        assert_eq!(s.gdt.limit, 31);
        let code: u64 = m.read_obj(GuestAddress(GDT_ADDR + 8)).unwrap();
        assert_eq!(code, 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn regs_follow_the_64bit_boot_protocol() {
        let r = boot_regs(0x100_0000);
        assert_eq!(r.rip, 0x100_0000);
        assert_eq!(r.rsi, ZERO_PAGE_ADDR);
        assert_eq!(r.rflags, 2, "interrupts off");
        let f = boot_fpu();
        assert_eq!((f.fcw, f.mxcsr), (0x37f, 0x1f80));
    }

    #[test]
    fn lint_pins_get_extint_and_nmi() {
        let mut st = kvm_lapic_state::default();
        set_lapic_reg(&mut st, APIC_LVT0, 0x0001_0700 | 0x200);
        set_lint(&mut st);
        assert_eq!(lapic_reg(&st, APIC_LVT0), 0x0001_0700);
        assert_eq!((lapic_reg(&st, APIC_LVT1) >> 8) & 7, APIC_MODE_NMI);
    }
}
