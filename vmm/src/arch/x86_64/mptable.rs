//! The Intel MultiProcessor table (MP spec 1.4) in the BIOS area at 0xf0000: how a guest
//! without ACPI (Linux with `acpi=off`, the probe guest) finds its CPUs, the
//! IOAPIC and the routing of the 16 ISA interrupts plus the other IOAPIC pins.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{IOAPIC_ADDR, IOAPIC_PINS, LAPIC_ADDR, MPTABLE_START};

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// More vCPUs than the table (and this VMM) supports.
    #[error("the MP table cannot describe {0} vCPUs (at most {MAX_CPUS})")]
    TooManyCpus(u8),
    /// The table does not fit in guest memory.
    #[error("cannot write the MP table into guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
}

/// Most vCPUs a VM can have.
pub const MAX_CPUS: u8 = 64;

const MPF_SIZE: usize = 16;
const MPC_HEADER_SIZE: usize = 44;
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_FPU: u32 = 1 << 0;
const CPU_FEATURE_APIC: u32 = 1 << 9;
const SPEC_REV: u8 = 4;
const BUS_ISA: u8 = 0;

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, b| s.wrapping_sub(*b))
}

/// Size in bytes of the table for `cpus` vCPUs (floating pointer included).
pub fn table_size(cpus: u8) -> usize {
    MPF_SIZE
        + MPC_HEADER_SIZE
        + 20 * usize::from(cpus)
        + 8 // bus
        + 8 // ioapic
        + 8 * usize::from(IOAPIC_PINS)
        + 8 * 2 // lint0, lint1
}

/// The MP floating pointer and configuration table for `cpus` vCPUs, as
/// bytes to place at `MPTABLE_START`.
pub fn build(cpus: u8) -> Result<Vec<u8>, MptableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MptableError::TooManyCpus(cpus));
    }
    let ioapic_id = cpus; // the first id after the LAPICs
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        entries.extend_from_slice(&[MP_PROCESSOR, id, APIC_VERSION]);
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.push(flags);
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_BUS, BUS_ISA]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id, IOAPIC_VERSION, CPU_ENABLED]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        // ISA IRQ n -> IOAPIC pin n, bus-default polarity and trigger.
        entries.extend_from_slice(&[MP_INTSRC, MP_IRQ_INT, 0, 0, BUS_ISA, pin, ioapic_id, pin]);
        count += 1;
    }
    // LINT0: ExtINT from the PIC to every LAPIC; LINT1: NMI.
    entries.extend_from_slice(&[MP_LINTSRC, MP_IRQ_EXTINT, 0, 0, BUS_ISA, 0, 0xff, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_IRQ_NMI, 0, 0, BUS_ISA, 0, 0xff, 1]);
    count += 2;

    let table_addr = MPTABLE_START as u32 + MPF_SIZE as u32;
    let table_len = (MPC_HEADER_SIZE + entries.len()) as u16;

    let mut mpc = Vec::with_capacity(usize::from(table_len));
    mpc.extend_from_slice(b"PCMP");
    mpc.extend_from_slice(&table_len.to_le_bytes());
    mpc.push(SPEC_REV);
    mpc.push(0); // checksum, below
    mpc.extend_from_slice(b"KEYSTONE");
    mpc.extend_from_slice(b"MICROVM     ");
    mpc.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    mpc.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    mpc.extend_from_slice(&count.to_le_bytes());
    mpc.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    mpc.extend_from_slice(&0u32.to_le_bytes()); // extended table, reserved
    debug_assert_eq!(mpc.len(), MPC_HEADER_SIZE);
    mpc.extend_from_slice(&entries);
    mpc[7] = checksum(&mpc);

    let mut mpf = Vec::with_capacity(MPF_SIZE);
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&table_addr.to_le_bytes());
    mpf.push(1); // length in 16-byte units
    mpf.push(SPEC_REV);
    mpf.push(0); // checksum, below
    mpf.extend_from_slice(&[0u8; 5]); // feature bytes: a config table is present
    mpf[10] = checksum(&mpf);

    mpf.extend_from_slice(&mpc);
    debug_assert_eq!(mpf.len(), table_size(cpus));
    Ok(mpf)
}

/// Write the MP table for `cpus` vCPUs at `MPTABLE_START`.
pub fn setup_mptable(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MptableError> {
    let table = build(cpus)?;
    mem.write_slice(&table, GuestAddress(MPTABLE_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::super::layout::MPTABLE_MAX_SIZE;
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_pointers_are_valid() {
        for cpus in [1u8, 4, 64] {
            let t = build(cpus).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[0..16]), 0);
            let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            assert_eq!(ptr, MPTABLE_START + 16);
            let mpc = &t[16..];
            assert_eq!(&mpc[0..4], b"PCMP");
            let len = u16::from_le_bytes([mpc[4], mpc[5]]) as usize;
            assert_eq!(len, mpc.len());
            assert_eq!(sum(mpc), 0);
            assert_eq!(
                u32::from_le_bytes(mpc[36..40].try_into().unwrap()),
                LAPIC_ADDR
            );
            assert!(
                t.len() as u64 <= MPTABLE_MAX_SIZE,
                "{cpus} cpus overflow the BIOS area"
            );
        }
    }

    #[test]
    fn lists_each_cpu_once_with_the_bsp_first() {
        let t = build(4).unwrap();
        let mpc = &t[16..];
        let count = u16::from_le_bytes([mpc[34], mpc[35]]);
        let mut off = MPC_HEADER_SIZE;
        let mut cpus = Vec::new();
        let mut ioapics = Vec::new();
        let mut intsrc = 0;
        for _ in 0..count {
            match mpc[off] {
                MP_PROCESSOR => {
                    cpus.push((mpc[off + 1], mpc[off + 3]));
                    off += 20;
                }
                MP_IOAPIC => {
                    ioapics.push(u32::from_le_bytes(
                        mpc[off + 4..off + 8].try_into().unwrap(),
                    ));
                    off += 8;
                }
                MP_INTSRC => {
                    intsrc += 1;
                    off += 8;
                }
                _ => off += 8,
            }
        }
        assert_eq!(off, mpc.len());
        assert_eq!(cpus, vec![(0, 3), (1, 1), (2, 1), (3, 1)]);
        assert_eq!(ioapics, vec![IOAPIC_ADDR]);
        assert_eq!(intsrc, IOAPIC_PINS);
    }

    #[test]
    fn rejects_zero_and_too_many_cpus() {
        assert!(matches!(build(0), Err(MptableError::TooManyCpus(0))));
        assert!(matches!(build(65), Err(MptableError::TooManyCpus(65))));
    }
}
