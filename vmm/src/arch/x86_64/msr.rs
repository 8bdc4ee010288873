//! Boot MSRs: the values Linux expects at its 64-bit entry, restricted to
//! the MSRs the host's KVM lists (KVM_GET_MSR_INDEX_LIST). A listed MSR that
//! KVM still refuses is reported by index, never silently dropped.

use kvm_bindings::kvm_msr_entry;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// IA32_MISC_ENABLE: fast string operations on.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRR default type: MTRRs enabled, write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// The boot MSRs Linux expects (Firecracker's list).
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Keep only the MSRs in the host's list; return the kept ones and the
/// indices dropped.
pub fn supported_only(
    wanted: Vec<kvm_msr_entry>,
    host_list: &[u32],
) -> (Vec<kvm_msr_entry>, Vec<u32>) {
    let (keep, drop): (Vec<_>, Vec<_>) = wanted
        .into_iter()
        .partition(|m| host_list.contains(&m.index));
    (keep, drop.into_iter().map(|m| m.index).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_capabilities_is_never_requested() {
        assert!(boot_msrs().iter().all(|m| m.index != 0x10a));
    }

    #[test]
    fn unlisted_msrs_are_dropped_and_reported() {
        let host = [MSR_IA32_TSC, MSR_STAR, MSR_MTRR_DEF_TYPE];
        let (keep, dropped) = supported_only(boot_msrs(), &host);
        let kept: Vec<u32> = keep.iter().map(|m| m.index).collect();
        assert_eq!(kept, vec![MSR_STAR, MSR_IA32_TSC, MSR_MTRR_DEF_TYPE]);
        assert_eq!(dropped.len(), boot_msrs().len() - 3);
        assert!(dropped.contains(&MSR_IA32_MISC_ENABLE));
        let mtrr = keep.iter().find(|m| m.index == MSR_MTRR_DEF_TYPE).unwrap();
        assert_eq!(mtrr.data, 0x806);
    }
}
