//! The boot GDT: null, 64-bit code, data, TSS — the selectors Linux's
//! 64-bit boot protocol expects (`__BOOT_CS` = 0x10 is not required by the
//! 64-bit entry; it reloads its own GDT).

use kvm_bindings::kvm_segment;

/// Selector of the 64-bit code segment.
pub const CODE_SELECTOR: u16 = 0x08;
/// Selector of the data segment.
pub const DATA_SELECTOR: u16 = 0x10;
/// Selector of the TSS.
pub const TSS_SELECTOR: u16 = 0x18;

/// Flags of the four entries: 64-bit code (L, P, S, type 0xb), 32-bit data
/// (DB, G, P, S, type 3), 32-bit busy TSS.
const CODE_FLAGS: u16 = 0xa09b;
const DATA_FLAGS: u16 = 0xc093;
const TSS_FLAGS: u16 = 0x808b;

/// A GDT entry from flags, base and limit, in the packed descriptor format.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT, in table order.
pub fn boot_gdt() -> [u64; 4] {
    [
        gdt_entry(0, 0, 0),
        gdt_entry(CODE_FLAGS, 0, 0xfffff),
        gdt_entry(DATA_FLAGS, 0, 0xfffff),
        gdt_entry(TSS_FLAGS, 0, 0xfffff),
    ]
}

/// The KVM segment register value for GDT entry `index`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let limit = ((entry >> 32) & 0x000f_0000) as u32 | (entry & 0x0000_ffff) as u32;
    let granular = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        // With 4 KiB granularity the limit counts pages.
        limit: if granular == 1 {
            (limit << 12) | 0xfff
        } else {
            limit
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(((entry >> 47) & 1) == 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_encode_like_linux() {
        let gdt = boot_gdt();
        assert_eq!(gdt[0], 0);
        // The values Linux's boot code and every x86 VMM use.
        assert_eq!(gdt[1], 0x00af_9b00_0000_ffff);
        assert_eq!(gdt[2], 0x00cf_9300_0000_ffff);
        assert_eq!(gdt[3], 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn segments_decode_back() {
        let gdt = boot_gdt();
        let cs = segment_from_gdt(gdt[1], 1);
        assert_eq!(cs.selector, CODE_SELECTOR);
        assert_eq!((cs.l, cs.db, cs.present, cs.s, cs.type_), (1, 0, 1, 1, 0xb));
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.base, 0);
        assert_eq!(cs.unusable, 0);
        let ds = segment_from_gdt(gdt[2], 2);
        assert_eq!(ds.selector, DATA_SELECTOR);
        assert_eq!((ds.l, ds.db, ds.type_), (0, 1, 3));
        let tss = segment_from_gdt(gdt[3], 3);
        assert_eq!(tss.selector, TSS_SELECTOR);
        assert_eq!((tss.s, tss.type_), (0, 0xb));
        let null = segment_from_gdt(gdt[0], 0);
        assert_eq!(null.unusable, 1);
        // A non-zero base is split across the descriptor.
        let e = gdt_entry(0x0093, 0x1234_5678, 0xabcde);
        let s = segment_from_gdt(e, 5);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0xabcde);
    }
}
