//! ACPI tables, built with the rust-vmm `acpi_tables` crate: what a stock
//! distribution kernel (no `virtio_mmio.device=` command-line support, no
//! PCI) needs to find our devices and to power off.
//!
//! ```text
//! 0x000e_0000  RSDP (revision 2), also in boot_params.acpi_rsdp_addr
//!              XSDT -> FADT, MADT
//!              FADT: hardware-reduced ACPI; DSDT; sleep control/status
//!                    registers (ports 0x600/0x601); reset register
//!                    (port 0x64, value 0xfe: the i8042's reset)
//!              MADT: one local APIC per vCPU, the IOAPIC
//!              DSDT: COM1 (PNP0501, ports 0x3f8-0x3ff, GSI 4), each
//!                    virtio-mmio window (LNRO0005, 4 KiB, its GSI, edge,
//!                    active high), and \_S5_ (soft off)
//! ```
//!
//! The tables sit in the BIOS area below the MP table, which is not RAM in
//! the e820 map; the MP table and the command-line device list stay for
//! kernels built without ACPI (the minimal kernel has `CONFIG_ACPI=n`).

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use keystone_devices::acpi_sleep::{ACPI_SLEEP_BASE, CONTROL_OFFSET, S5_SLEEP_TYPE, STATUS_OFFSET};
use keystone_devices::i8042::I8042_BASE;
use keystone_devices::serial::{COM1_BASE, COM1_IRQ, COM1_LEN};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{IOAPIC_ADDR, LAPIC_ADDR, MPTABLE_START};

/// Where the RSDP goes (16-byte aligned, in the range Linux scans).
pub const RSDP_ADDR: u64 = 0xe_0000;
/// The tables' room: up to the MP table.
pub const ACPI_MAX_SIZE: u64 = MPTABLE_START - RSDP_ADDR;

const OEM_ID: [u8; 6] = *b"KEYSTN";
const OEM_TABLE_ID: [u8; 8] = *b"KEYSTONE";
const OEM_REVISION: u32 = 1;
/// FADT `IAPC_BOOT_ARCH`: no VGA, no MSI, no CMOS RTC.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
/// The i8042 command that pulses the reset line.
const I8042_RESET: u8 = 0xfe;
/// Offset of the i8042's command port.
const I8042_COMMAND_OFFSET: u64 = 4;

/// Errors writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit below the MP table.
    #[error("the ACPI tables need {0} bytes, more than the {ACPI_MAX_SIZE} reserved")]
    TooLarge(u64),
    /// Writing guest memory failed.
    #[error("cannot write the ACPI tables: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// One virtio-mmio window as the guest sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDevice {
    /// Base address.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
    /// Its interrupt (an IOAPIC pin).
    pub gsi: u32,
}

/// The tables, laid out from [`RSDP_ADDR`]: `(guest address, bytes)`.
pub fn build_tables(vcpus: u8, devices: &[MmioDevice]) -> Vec<(u64, Vec<u8>)> {
    let dsdt = dsdt(devices);
    let madt = madt(vcpus);

    let rsdp_len = Rsdp::len() as u64;
    let mut next = align(RSDP_ADDR + rsdp_len);
    let mut place = |len: usize| {
        let at = next;
        next = align(at + len as u64);
        at
    };
    let dsdt_addr = place(dsdt.len());
    let fadt = fadt(dsdt_addr);
    let fadt_addr = place(fadt.len());
    let madt_addr = place(madt.len());
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = bytes(&xsdt);
    let xsdt_addr = place(xsdt.len());
    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    vec![
        (RSDP_ADDR, rsdp),
        (dsdt_addr, dsdt),
        (fadt_addr, fadt),
        (madt_addr, madt),
        (xsdt_addr, xsdt),
    ]
}

/// Writes the tables into guest memory; returns the RSDP's address.
pub fn setup_acpi(
    mem: &GuestMemoryMmap,
    vcpus: u8,
    devices: &[MmioDevice],
) -> Result<u64, AcpiError> {
    let tables = build_tables(vcpus, devices);
    let end = tables
        .iter()
        .map(|(at, b)| at + b.len() as u64)
        .max()
        .unwrap_or(RSDP_ADDR);
    if end - RSDP_ADDR > ACPI_MAX_SIZE {
        return Err(AcpiError::TooLarge(end - RSDP_ADDR));
    }
    for (at, b) in &tables {
        mem.write_slice(b, GuestAddress(*at))?;
    }
    Ok(RSDP_ADDR)
}

fn align(addr: u64) -> u64 {
    addr.next_multiple_of(16)
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn io_gas(port: u64) -> GAS {
    GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port)
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // No fixed power or sleep button.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    f.iapc_boot_arch =
        (IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED | IAPC_CMOS_RTC_NOT_PRESENT).into();
    f.sleep_control_reg = io_gas(ACPI_SLEEP_BASE + CONTROL_OFFSET);
    f.sleep_status_reg = io_gas(ACPI_SLEEP_BASE + STATUS_OFFSET);
    f.reset_reg = io_gas(I8042_BASE + I8042_COMMAND_OFFSET);
    f.reset_value = I8042_RESET;
    bytes(&f.finalize())
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for id in 0..vcpus {
        m.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    // The IOAPIC's id follows the LAPICs', as in the MP table.
    m.add_structure(IoApic::new(vcpus, IOAPIC_ADDR, 0));
    bytes(&m)
}

fn dsdt(devices: &[MmioDevice]) -> Vec<u8> {
    let mut body = Vec::new();
    let com1_io = aml::IO::new(COM1_BASE as u16, COM1_BASE as u16, 1, COM1_LEN as u8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = aml::EISAName::new("PNP0501");
    let com1_uid: u8 = 0;
    let com1_hid_name = aml::Name::new("_HID".into(), &com1_hid);
    let com1_uid_name = aml::Name::new("_UID".into(), &com1_uid);
    let com1_crs_name = aml::Name::new("_CRS".into(), &com1_crs);
    aml::Device::new(
        "_SB_.COM1".into(),
        vec![&com1_hid_name, &com1_uid_name, &com1_crs_name],
    )
    .to_aml_bytes(&mut body);

    for (i, d) in devices.iter().enumerate() {
        // The windows sit in the 32-bit MMIO gap.
        let (Ok(base), Ok(len)) = (u32::try_from(d.base), u32::try_from(d.len)) else {
            continue;
        };
        let mem = aml::Memory32Fixed::new(true, base, len);
        let irq = aml::Interrupt::new(true, true, false, false, d.gsi);
        let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
        let hid: &'static str = "LNRO0005";
        let uid = i;
        let hid_name = aml::Name::new("_HID".into(), &hid);
        let uid_name = aml::Name::new("_UID".into(), &uid);
        let crs_name = aml::Name::new("_CRS".into(), &crs);
        let path = format!("_SB_.V{i:03X}");
        aml::Device::new(path.as_str().into(), vec![&hid_name, &uid_name, &crs_name])
            .to_aml_bytes(&mut body);
    }

    let s5_type = S5_SLEEP_TYPE;
    let s5 = aml::Package::new(vec![&s5_type]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut body);

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn checksum_ok(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    fn devices() -> Vec<MmioDevice> {
        (0..3)
            .map(|i| MmioDevice {
                base: 0xc000_1000 + i * 0x1000,
                len: 0x1000,
                gsi: 5 + i as u32,
            })
            .collect()
    }

    #[test]
    fn every_table_has_a_valid_checksum_and_its_length() {
        for (at, b) in build_tables(2, &devices()) {
            if at == RSDP_ADDR {
                assert_eq!(&b[..8], b"RSD PTR ");
                assert!(checksum_ok(&b[..20]), "RSDP v1 checksum");
                assert!(checksum_ok(&b), "RSDP extended checksum");
                assert_eq!(u32_at(&b, 20) as usize, b.len());
            } else {
                assert!(
                    checksum_ok(&b),
                    "{} checksum",
                    String::from_utf8_lossy(&b[..4])
                );
                assert_eq!(u32_at(&b, 4) as usize, b.len(), "header length");
            }
            assert_eq!(at % 16, 0);
        }
    }

    /// Walk RSDP -> XSDT -> FADT/MADT -> DSDT as a kernel does, with the
    /// tables laid out in a flat buffer.
    #[test]
    fn the_tables_chain_from_the_rsdp() {
        let tables = build_tables(4, &devices());
        let mut flat = vec![0u8; ACPI_MAX_SIZE as usize];
        for (at, b) in &tables {
            let o = (at - RSDP_ADDR) as usize;
            flat[o..o + b.len()].copy_from_slice(b);
        }
        let table = |addr: u64| {
            let o = (addr - RSDP_ADDR) as usize;
            let len = u32_at(&flat, o + 4) as usize;
            &flat[o..o + len]
        };
        let xsdt = table(u64_at(&flat, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(xsdt, o))
            .collect();
        let sigs: Vec<&[u8]> = entries.iter().map(|&a| &table(a)[..4]).collect();
        assert_eq!(sigs, [b"FACP", b"APIC"]);

        let fadt = table(entries[0]);
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        let dsdt = table(u64_at(fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        // Sleep control at 0x600, status at 0x601, both SystemIO bytes;
        // reset: port 0x64, value 0xfe.
        assert_eq!((fadt[244], fadt[245], u64_at(fadt, 248)), (1, 8, 0x600));
        assert_eq!((fadt[256], fadt[257], u64_at(fadt, 260)), (1, 8, 0x601));
        assert_eq!((fadt[116], u64_at(fadt, 120), fadt[128]), (1, 0x64, 0xfe));

        let madt = table(entries[1]);
        assert_eq!(u32_at(madt, 36), LAPIC_ADDR);
        let mut lapics = 0;
        let mut ioapics = Vec::new();
        let mut o = 44;
        while o < madt.len() {
            let (kind, len) = (madt[o], madt[o + 1] as usize);
            match kind {
                0 => {
                    assert_eq!((madt[o + 2], madt[o + 3]), (lapics, lapics), "uid, apic id");
                    lapics += 1;
                }
                1 => ioapics.push((madt[o + 2], u32_at(madt, o + 4), u32_at(madt, o + 8))),
                k => panic!("unexpected MADT structure {k}"),
            }
            o += len;
        }
        assert_eq!(lapics, 4);
        assert_eq!(ioapics, [(4, IOAPIC_ADDR, 0)]);
    }

    /// The DSDT names each device where a kernel's AML parser finds it:
    /// the virtio-mmio HID, each window's address and GSI, COM1, \_S5_.
    #[test]
    fn the_dsdt_describes_every_device() {
        let d = dsdt(&devices());
        let has = |needle: &[u8]| d.windows(needle.len()).any(|w| w == needle);
        assert_eq!(d.windows(9).filter(|w| w == b"LNRO0005\0").count(), 3);
        for dev in devices() {
            // Memory32Fixed: 0x86, length 9, read-write, base, length.
            let mut m = vec![0x86, 9, 0, 1];
            m.extend_from_slice(&(dev.base as u32).to_le_bytes());
            m.extend_from_slice(&(dev.len as u32).to_le_bytes());
            assert!(has(&m), "window {:#x}", dev.base);
            // Extended interrupt: 0x89, length 6, consumer|edge, 1, GSI.
            let mut i = vec![0x89, 6, 0, 0b011, 1];
            i.extend_from_slice(&dev.gsi.to_le_bytes());
            assert!(has(&i), "GSI {}", dev.gsi);
        }
        // COM1: EISA id PNP0501 (0x0105d041), I/O 0x3f8 length 8, GSI 4.
        assert!(has(&[0x0c, 0x41, 0xd0, 0x05, 0x01]));
        assert!(has(&[0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]));
        assert!(has(b"_S5_\x12"), "\\_S5_ package");
    }

    /// ACPICA's disassembler (`iasl -d`, the tool behind acpidump
    /// workflows) reads every table back without an error, and the DSDT
    /// says what we meant.
    #[test]
    fn iasl_disassembles_every_table() {
        let iasl = Path::new("/usr/bin/iasl");
        assert!(
            iasl.exists(),
            "this test needs ACPICA's iasl (apt-get install acpica-tools)"
        );
        let dir = std::env::temp_dir().join(format!("ks-acpi-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut dsl = std::collections::HashMap::new();
        // The RSDP is no table iasl reads on its own (its checksums are
        // checked above).
        for (_, b) in build_tables(2, &devices()).into_iter().skip(1) {
            let name = String::from_utf8_lossy(&b[..4]).to_lowercase();
            let aml = dir.join(format!("{name}.dat"));
            std::fs::write(&aml, &b).unwrap();
            let out = std::process::Command::new(iasl)
                .current_dir(&dir)
                .args(["-d"])
                .arg(&aml)
                .output()
                .unwrap();
            let text = std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap_or_default();
            assert!(
                out.status.success() && !text.is_empty(),
                "iasl -d {name}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                !text.contains("Invalid") && !text.contains("**** Unknown"),
                "{name}: {text}"
            );
            dsl.insert(name, text);
        }
        let dsdt = &dsl["dsdt"];
        for want in [
            "Name (_HID, \"LNRO0005\")",
            "Memory32Fixed (ReadWrite,",
            "0xC0001000",
            "0xC0003000",
            "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )",
            "EisaId (\"PNP0501\")",
            "IO (Decode16,",
            "Name (_S5, Package",
        ] {
            assert!(dsdt.contains(want), "DSDT lacks {want}:\n{dsdt}");
        }
        let fadt = &dsl["facp"];
        assert!(fadt.contains("Hardware Reduced (V5) : 1"), "{fadt}");
        let madt = &dsl["apic"];
        assert_eq!(madt.matches("Processor Local APIC").count(), 2, "{madt}");
        assert!(madt.contains("I/O APIC"), "{madt}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_tables_fit_below_the_mp_table_with_the_most_devices() {
        let many: Vec<MmioDevice> = (0..19)
            .map(|i| MmioDevice {
                base: 0xc000_1000 + i * 0x1000,
                len: 0x1000,
                gsi: 5 + i as u32,
            })
            .collect();
        let tables = build_tables(super::super::mptable::MAX_CPUS, &many);
        let end = tables
            .iter()
            .map(|(a, b)| a + b.len() as u64)
            .max()
            .unwrap();
        assert!(end <= MPTABLE_START);
    }
}
