//! CPUID: start from what the host's KVM supports (KVM_GET_SUPPORTED_CPUID)
//! and make it describe this VM: the hypervisor bit, each vCPU's APIC id,
//! and a topology of N single-threaded cores in one socket.

use kvm_bindings::kvm_cpuid_entry2;

/// Options that change what the guest sees.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidOptions {
    /// Hide VMX/SVM: no nested virtualization for the guest.
    pub no_nested: bool,
}

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;

// Leaf 1.
const ECX_VMX: u32 = 1 << 5;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
// Leaf 0x8000_0001.
const ECX_SVM: u32 = 1 << 2;

// Leaf 0xb / 0x1f level types (ecx[15:8]).
const LEVEL_TYPE_INVALID: u32 = 0;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Bits needed to hold APIC ids 0..count-1 (the "shift" of the core level).
fn core_id_bits(count: u8) -> u32 {
    let mut bits = 0;
    while (1u32 << bits) < u32::from(count) {
        bits += 1;
    }
    bits
}

/// The CPUID entries for vCPU `id` of `count`, from the host-supported set.
pub fn filter_cpuid(
    supported: &[kvm_cpuid_entry2],
    id: u8,
    count: u8,
    opts: CpuidOptions,
) -> Vec<kvm_cpuid_entry2> {
    let mut out = supported.to_vec();
    for e in out.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ecx |= ECX_HYPERVISOR;
                if opts.no_nested {
                    e.ecx &= !ECX_VMX;
                }
                // ebx: [31:24] initial APIC id, [23:16] logical processors
                // per package, [15:8] CLFLUSH line size, [7:0] brand index.
                e.ebx = (u32::from(id) << 24) | (u32::from(count) << 16) | (e.ebx & 0xffff);
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // eax[31:26]: cores per package - 1; eax[25:14]: logical
                // processors sharing this cache - 1 (L3 is shared by all,
                // L1 and L2 belong to one core).
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { u32::from(count) - 1 } else { 0 };
                e.eax &= 0x3fff;
                e.eax |= ((u32::from(count) - 1) & 0x3f) << 26;
                e.eax |= (sharing & 0xfff) << 14;
            }
            LEAF_EXT_TOPOLOGY | LEAF_EXT_TOPOLOGY_V2 => {
                // One thread per core, `count` cores in one package.
                e.edx = u32::from(id);
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (LEVEL_TYPE_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_id_bits(count);
                        e.ebx = u32::from(count);
                        e.ecx = (LEVEL_TYPE_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = (LEVEL_TYPE_INVALID << 8) | e.index;
                    }
                }
            }
            LEAF_EXT_FEATURES if opts.no_nested => e.ecx &= !ECX_SVM,
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0x0000_0800,
            ecx: ECX_VMX,
            edx: 0,
            ..Default::default()
        }
    }

    fn find(v: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *v.iter().find(|e| e.function == f && e.index == i).unwrap()
    }

    fn host() -> Vec<kvm_cpuid_entry2> {
        let mut cache_l1 = entry(LEAF_CACHE_PARAMS, 0);
        cache_l1.eax = 1 << 5 | 0x1; // level 1 data cache
        let mut cache_l3 = entry(LEAF_CACHE_PARAMS, 3);
        cache_l3.eax = 3 << 5 | 0x3; // level 3 unified
        let mut ext = entry(LEAF_EXT_FEATURES, 0);
        ext.ecx = ECX_SVM | 1;
        vec![
            entry(LEAF_FEATURES, 0),
            cache_l1,
            cache_l3,
            entry(LEAF_EXT_TOPOLOGY, 0),
            entry(LEAF_EXT_TOPOLOGY, 1),
            entry(LEAF_EXT_TOPOLOGY, 2),
            ext,
        ]
    }

    #[test]
    fn apic_ids_and_counts_per_vcpu() {
        for (id, count) in [(0u8, 1u8), (2, 4), (63, 64)] {
            let c = filter_cpuid(&host(), id, count, CpuidOptions::default());
            let l1 = find(&c, LEAF_FEATURES, 0);
            assert_eq!(l1.ebx >> 24, u32::from(id));
            assert_eq!((l1.ebx >> 16) & 0xff, u32::from(count));
            assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
            assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
            assert_eq!(l1.edx & EDX_HTT != 0, count > 1);
            for sub in 0..3 {
                assert_eq!(find(&c, LEAF_EXT_TOPOLOGY, sub).edx, u32::from(id));
            }
        }
    }

    #[test]
    fn topology_is_count_cores_of_one_thread() {
        let c = filter_cpuid(&host(), 1, 4, CpuidOptions::default());
        let smt = find(&c, LEAF_EXT_TOPOLOGY, 0);
        assert_eq!(
            (smt.eax, smt.ebx, (smt.ecx >> 8) & 0xff),
            (0, 1, LEVEL_TYPE_SMT)
        );
        let core = find(&c, LEAF_EXT_TOPOLOGY, 1);
        assert_eq!(
            (core.eax, core.ebx, (core.ecx >> 8) & 0xff),
            (2, 4, LEVEL_TYPE_CORE)
        );
        let end = find(&c, LEAF_EXT_TOPOLOGY, 2);
        assert_eq!(((end.ecx >> 8) & 0xff, end.ebx), (LEVEL_TYPE_INVALID, 0));
        let l1 = find(&c, LEAF_CACHE_PARAMS, 0);
        assert_eq!(l1.eax >> 26, 3);
        assert_eq!((l1.eax >> 14) & 0xfff, 0);
        assert_eq!(l1.eax & 0x3fff, 1 << 5 | 1, "cache description kept");
        let l3 = find(&c, LEAF_CACHE_PARAMS, 3);
        assert_eq!((l3.eax >> 14) & 0xfff, 3);
        assert_eq!(core_id_bits(1), 0);
        assert_eq!(core_id_bits(5), 3);
        assert_eq!(core_id_bits(64), 6);
    }

    #[test]
    fn no_nested_hides_vmx_and_svm() {
        let keep = filter_cpuid(&host(), 0, 1, CpuidOptions::default());
        assert_ne!(find(&keep, LEAF_FEATURES, 0).ecx & ECX_VMX, 0);
        assert_ne!(find(&keep, LEAF_EXT_FEATURES, 0).ecx & ECX_SVM, 0);
        let hide = filter_cpuid(&host(), 0, 1, CpuidOptions { no_nested: true });
        assert_eq!(find(&hide, LEAF_FEATURES, 0).ecx & ECX_VMX, 0);
        let ext = find(&hide, LEAF_EXT_FEATURES, 0);
        assert_eq!(ext.ecx & ECX_SVM, 0);
        assert_eq!(ext.ecx & 1, 1, "other bits untouched");
    }
}
