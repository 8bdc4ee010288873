//! The *probe guest*: a small freestanding x86-64 program that proves a VMM's
//! KVM path on hosts whose KVM cannot run Linux (this project's PVM hosts,
//! where guest kernel code is emulated about a million instructions a second
//! and only plain integer instructions, plus SSE moves, are emulated).
//!
//! `build.rs` compiles `guest/*.rs` into a static ELF; [`elf_path`] says
//! where it is. The VMM loads it like a 64-bit Linux `vmlinux` (it is linked
//! and loaded at [`LOAD_ADDR`], entered in long mode with `rsi` = the
//! `boot_params` zero page), and integration tests drive it through its
//! kernel command line and read what it prints on the serial port.
//!
//! # Boot contract it relies on
//!
//! - Entry at the ELF entry point in 64-bit mode, CPL0, interrupts off,
//!   `rsi` = physical address of `boot_params`; the low 4 GiB identity-mapped
//!   (the AP trampoline reuses the BSP's CR3, e.g. 0x9000); a GDT whose 0x08
//!   selector is 64-bit code.
//! - `boot_params.hdr.cmd_line_ptr` (offset 0x228) → NUL-terminated command
//!   line, `cmdline_size` (0x238) its maximum length.
//! - MP table (Intel MP spec 1.4): floating pointer in 0x9fc00..0xa0000 or
//!   0xf0000..0x100000, one enabled processor entry per vCPU (APIC id =
//!   vCPU index, BSP flagged), an I/O APIC entry.
//! - 8250 UART at port 0x3f8 on IRQ 4 (GSI 4 of KVM's in-kernel IOAPIC at
//!   0xfec00000), local APICs at 0xfee00000, i8042 at 0x60/0x64, boot timer
//!   at MMIO 0xc000_0000.
//! - Memory the probe itself uses below 1 MiB: 0x1000..0x2000 (AP
//!   trampoline, SIPI vector 1). Its image, .bss and 64 stacks of 16 KiB
//!   (NOLOAD: in the last PT_LOAD's memory size, not in the file) end near
//!   0x207000.
//!
//! # Command-line protocol
//!
//! The first line is always
//!
//! ```text
//! keystone-probe: hello cmdline="<the exact command line>"
//! ```
//!
//! Then the probe runs, in order, the comma-separated steps of the first
//! space-separated token that starts with `probe=` (e.g.
//! `console=ttyS0 probe=timer,smp,reset`); other tokens are ignored, no
//! `probe=` means no steps, empty step names are skipped. Lines end in `\n`
//! only; numbers are decimal, addresses `0x` + lower-case hex. Steps:
//!
//! | step    | does | prints |
//! |---------|------|--------|
//! | `timer` | writes 123 to the boot timer (MMIO 0xc000_0000, 1 byte) | `probe: boot-timer written` |
//! | `smp`   | reads the MP table; starts each AP with INIT-SIPI-SIPI (one at a time, waiting for it); each AP prints and halts | `probe: mptable cpus=<N> ioapic=<0xaddr>`, `probe: cpuid apic-id=<id> logical=<n>` (CPUID.1 EBX bits 31:24 and 23:16), `probe: cpu 0 online`, then `probe: cpu <id> online` per AP, then `probe: smp online=<K>/<N>` |
//! | `echo`  | masks the 8259s, routes IOAPIC pin 4 → vector 0x24 on the BSP, enables the UART RX interrupt; echoes received bytes as they arrive until `\n` or `\r` | `probe: echo ready`; after the line: (a `\n` if anything was echoed) `probe: echo-line: <line>`, `probe: echo irqs=<interrupts taken>` |
//! | `reset` | `out 0x64, 0xfe` (i8042 CPU reset: the VMM should exit 0), then halts | `probe: reset` |
//! | `fault` | loads an empty IDT and executes `ud2`: a triple fault (the VMM should exit non-zero) | `probe: fault` |
//! | `spin`  | `cli; hlt` forever (for signal handling tests) | `probe: spinning` |
//!
//! After the last step (unless it never returns), it prints `probe: halted`
//! and halts with interrupts off. Other lines:
//!
//! - `probe: unknown step <name>` for a step not in [`STEPS`] (the run goes on);
//! - `probe: mptable error: <reason>` if the MP table is missing or a
//!   checksum/signature is wrong (the rest of `smp` is skipped);
//! - `probe: cpu <id> timeout` if an AP did not check in within the bounded
//!   wait, `probe: cpu <id> has no stack` for an APIC id ≥ 64;
//! - `probe: exception vector=<n> error=<0x..> rip=<0x..> rflags=<0x..>` on
//!   an unexpected CPU exception, and `probe: panic at <file>:<line>` on a
//!   Rust panic: both then triple-fault on purpose so the VMM exits non-zero.
//!
//! APs print concurrently with nothing else (the BSP only waits), and every
//! line is written under a spinlock, so lines never interleave.

use std::path::Path;

/// Physical (= virtual) address the probe is linked at; also its entry point.
pub const LOAD_ADDR: u64 = 0x10_0000;

/// The step names the probe understands in `probe=`.
pub const STEPS: &[&str] = &["timer", "smp", "echo", "reset", "fault", "spin"];

/// Path of the probe guest ELF built by `build.rs`.
pub fn elf_path() -> &'static Path {
    Path::new(concat!(env!("OUT_DIR"), "/keystone-probe.elf"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    const PT_LOAD: u32 = 1;
    const PT_DYNAMIC: u32 = 2;
    const PT_INTERP: u32 = 3;
    const PF_X: u32 = 1;
    /// `cpu::STACK_SIZE * cpu::MAX_CPUS` in the guest.
    const STACKS_LEN: u64 = 16 * 1024 * 64;

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    struct Phdr {
        p_type: u32,
        flags: u32,
        vaddr: u64,
        paddr: u64,
        filesz: u64,
        memsz: u64,
    }

    fn elf() -> Vec<u8> {
        std::fs::read(elf_path()).expect("probe ELF was built")
    }

    fn phdrs(b: &[u8]) -> Vec<Phdr> {
        let phoff = u64_at(b, 32) as usize;
        let phentsize = u16_at(b, 54) as usize;
        let phnum = u16_at(b, 56) as usize;
        (0..phnum)
            .map(|i| {
                let p = phoff + i * phentsize;
                Phdr {
                    p_type: u32_at(b, p),
                    flags: u32_at(b, p + 4),
                    vaddr: u64_at(b, p + 16),
                    paddr: u64_at(b, p + 24),
                    filesz: u64_at(b, p + 32),
                    memsz: u64_at(b, p + 40),
                }
            })
            .collect()
    }

    #[test]
    fn elf_header_is_a_static_x86_64_executable() {
        let b = elf();
        assert_eq!(&b[0..4], b"\x7fELF");
        assert_eq!(b[4], 2, "ELFCLASS64");
        assert_eq!(b[5], 1, "little endian");
        assert_eq!(u16_at(&b, 16), 2, "ET_EXEC");
        assert_eq!(u16_at(&b, 18), 62, "EM_X86_64");
        assert_eq!(
            u64_at(&b, 24),
            LOAD_ADDR,
            "entry is _start at the load address"
        );
    }

    #[test]
    fn segments_are_loaded_above_1mib_identity_mapped() {
        let b = elf();
        let phdrs = phdrs(&b);
        let loads: Vec<&Phdr> = phdrs.iter().filter(|p| p.p_type == PT_LOAD).collect();
        assert!(!loads.is_empty());
        assert!(phdrs
            .iter()
            .all(|p| p.p_type != PT_INTERP && p.p_type != PT_DYNAMIC));
        for p in &loads {
            assert!(p.paddr >= LOAD_ADDR, "PT_LOAD at {:#x}", p.paddr);
            assert_eq!(p.paddr, p.vaddr, "physical == virtual");
            assert!(p.filesz <= p.memsz);
        }
        let entry = u64_at(&b, 24);
        assert!(
            loads
                .iter()
                .any(|p| p.flags & PF_X != 0 && (p.vaddr..p.vaddr + p.memsz).contains(&entry)),
            "entry {entry:#x} inside an executable PT_LOAD"
        );
        let end = loads.iter().map(|p| p.vaddr + p.memsz).max().unwrap();
        let file_end = loads.iter().map(|p| p.vaddr + p.filesz).max().unwrap();
        assert!(
            end - file_end >= STACKS_LEN,
            "per-CPU stacks are in the image's memory size"
        );
        assert!(
            end <= 0x40_0000,
            "image ends at {end:#x}, expected well below 4 MiB"
        );
    }

    #[test]
    fn image_contains_the_protocol_strings() {
        let b = elf();
        let has = |s: &str| b.windows(s.len()).any(|w| w == s.as_bytes());
        for s in [
            "keystone-probe: hello cmdline=\"",
            "probe: boot-timer written",
            "probe: mptable cpus=",
            "probe: smp online=",
            "probe: echo-line: ",
            "probe: unknown step ",
            "probe: halted",
        ] {
            assert!(has(s), "{s:?} missing from the image");
        }
        for step in STEPS {
            assert!(has(step), "step {step:?} missing from the image");
        }
    }

    /// Symbols in .text that are not 64-bit code (the AP trampoline's 16/32-bit
    /// parts and its data), which objdump would decode as garbage.
    const NOT_64BIT_CODE: &[&str] = &[
        "probe_ap_trampoline_start",
        "probe_ap_pm32",
        "probe_ap_gdt",
        "probe_ap_gdt_ptr",
        "probe_ap_mailbox_cr3",
    ];

    /// Functions of the precompiled `core` that are linked in but only run
    /// when a panic message is formatted, which the probe never does.
    const PANIC_FORMATTING_ONLY: &[&str] = &[
        "core::fmt",
        "core::str::count",
        "4core3fmt",
        "4core3str5count",
    ];

    /// SSE instructions this host's emulator (KVM's) can execute.
    const EMULATED_SSE: &[&str] = &["movups", "movaps", "movdqu", "movdqa"];

    /// Instructions the emulator rejects (the VM stops with an internal error).
    const FORBIDDEN: &[&str] = &[
        "popcnt",
        "lzcnt",
        "tzcnt",
        "int3",
        "int",
        "into",
        "xsave",
        "xsaveopt",
        "xsavec",
        "xrstor",
        "fxsave",
        "fxrstor",
        "cmpxchg16b",
        "clac",
        "stac",
        "mfence",
        "lfence",
        "sfence",
        "rdrand",
        "rdseed",
    ];

    /// Disassembles the probe and checks every instruction it may execute is
    /// one the emulator knows. Skipped (with a note) where objdump is missing.
    #[test]
    fn no_instructions_the_emulator_rejects() {
        let output = match Command::new("objdump")
            .args(["-d", "-C", "-M", "intel", "--no-show-raw-insn"])
            .arg(elf_path())
            .output()
        {
            Ok(output) if output.status.success() => output,
            _ => {
                eprintln!("objdump not available: skipping the instruction check");
                return;
            }
        };
        let text = String::from_utf8_lossy(&output.stdout);
        let mut symbol = String::new();
        let mut bad = Vec::new();
        for line in text.lines() {
            if let Some(name) = line
                .strip_suffix(">:")
                .and_then(|l| l.split_once(" <"))
                .map(|(_, n)| n)
            {
                symbol = name.to_string();
                continue;
            }
            let Some((_, insn)) = line.split_once(":\t") else {
                continue;
            };
            if NOT_64BIT_CODE.contains(&symbol.as_str()) {
                continue;
            }
            let mnemonic = insn
                .split_whitespace()
                .find(|w| !["lock", "rep", "repz", "repnz"].contains(w));
            let Some(mnemonic) = mnemonic else { continue };
            let panic_only = PANIC_FORMATTING_ONLY.iter().any(|p| symbol.contains(p));
            if FORBIDDEN.contains(&mnemonic)
                || (insn.contains("xmm") && !EMULATED_SSE.contains(&mnemonic) && !panic_only)
            {
                bad.push(format!("{symbol}: {}", line.trim()));
            }
        }
        assert!(
            bad.is_empty(),
            "instructions this host's emulator rejects:\n{}",
            bad.join("\n")
        );
        assert!(
            text.contains("rust_main"),
            "disassembly has the probe's symbols"
        );
    }
}
