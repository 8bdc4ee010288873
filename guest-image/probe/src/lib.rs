//! The *probe guest*: a small freestanding x86-64 program that proves a VMM's
//! KVM path on hosts whose KVM cannot run Linux (this project's PVM hosts,
//! where guest kernel code is emulated about a million instructions a second
//! and only plain integer instructions, plus SSE moves, are emulated).
//!
//! `build.rs` compiles `guest/*.rs` into a static ELF; [`elf_path`] says
//! where it is. The VMM loads it like a 64-bit Linux `vmlinux` (it is linked
//! and loaded at [`LOAD_ADDR`], entered in long mode with `rsi` = the
//! `boot_params` zero page), and integration tests drive it through its
//! kernel command line and read what it prints on the serial port. The same
//! ELF also boots under loaders that speak Xen's PVH boot protocol, e.g.
//! `qemu-system-x86_64 -M microvm,acpi=off -kernel <elf>` (see
//! [below](#pvh-entry-qemu)).
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
//!   0xfec00000), local APICs at 0xfee00000 (their timers count at KVM's
//!   1 GHz), i8042 at 0x60/0x64, boot timer at MMIO 0xc000_0000.
//! - virtio-mmio devices (only for the `virtio`, `blk`, `blkbench`,
//!   `vsock`, `ready`, `net` and `netbench` steps):
//!   one `virtio_mmio.device=<size>@<base>:<gsi>` token per device on the
//!   command line (Linux's syntax; size with an optional K/M/G suffix, e.g.
//!   `4K@0xc0001000:5`), registers below 4 GiB, the interrupt on IOAPIC pin
//!   `<gsi>`, edge-triggered (KVM irqfd).
//! - Memory the probe itself uses below 1 MiB: 0x1000..0x2000 (AP
//!   trampoline, SIPI vector 1). Its image, .bss, 64 stacks of 16 KiB and
//!   the 192 KiB `.dma` area of the virtio drivers (virtqueues and buffers;
//!   both NOLOAD: in the last PT_LOAD's memory size, not in the file) and
//!   the 28 KiB NOLOAD `.pvh` area (used only by the PVH entry) and the
//!   NOLOAD `.noinit` area (state a step zeroes itself, e.g. the vsock
//!   connection table) end near 0x251000.
//!
//! ## PVH entry (QEMU)
//!
//! A PT_NOTE segment holds one ELF note (section `.note.Xen`, 4-byte
//! aligned): name `"Xen\0"`, type 18 (XEN_ELFNOTE_PHYS32_ENTRY), desc the
//! physical address of `_pvh_start` (inside `.text`) as 8 bytes, the high 4
//! zero, as Linux's x86-64 `vmlinux` has it: linux-loader and newer QEMU
//! read the first 4 bytes, QEMU up to 9.x reads 8 for a 64-bit ELF. The ELF
//! entry stays `_start` ([`LOAD_ADDR`]); keystone-vmm (linux-loader's
//! `Elf::load`) reads the note but enters at `_start` as above.
//!
//! A PVH loader enters `_pvh_start` in 32-bit protected mode, paging off,
//! flat CS/DS/ES/SS, interrupts off, no stack, `ebx` = physical address of
//! `struct hvm_start_info` (magic 0x336ec578 at offset 0, `cmdline_paddr`
//! u64 at 24). `_pvh_start` (`guest/pvh.rs`; integer instructions only)
//! takes the BSP's stack, writes identity page tables for the low 4 GiB (2
//! MiB pages: PML4, PDPT and 4 page directories in `.pvh`), sets CR4.PAE,
//! CR3, EFER.LME, CR0.PG|PE (CD/NW clear), loads a GDT with the VMM's
//! selectors (0x08 64-bit code, 0x10 flat data), far-jumps to long mode,
//! reloads the data segments, zeroes a 4 KiB fake zero page in `.pvh` and
//! sets its `cmd_line_ptr` to `cmdline_paddr` (0 if that is at or above 4
//! GiB or the magic is wrong) and its `cmdline_size` to 4095, then jumps to
//! `_start` with `rsi` = that zero page: from there on the boot is the VMM
//! one. Under QEMU there is no boot timer (the `timer` write goes nowhere)
//! and microvm may have no usable MP table (`smp` then reports what it
//! finds); `reset` ends QEMU when run with `-no-reboot` (needs `-device
//! i8042` on microvm). Tested: `qemu-system-x86_64 -accel kvm -M
//! microvm,acpi=off -cpu host,-arch-capabilities -m 128 -nodefaults
//! -no-user-config -nographic -serial stdio -device i8042 -kernel <elf>
//! -append 'probe=timer,reset' -no-reboot` (QEMU 7.2; on this PVM host
//! plain `-cpu host` fails to set MSR 0x10a), and the same with `-accel
//! tcg` and no `-cpu`.
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
//! | `virtio` | reads the `virtio_mmio.device=` tokens, checks each device's MagicValue (0x74726976) and Version (2), reads its DeviceID. `blk` and `vsock` do this first too; the lines are printed once per boot | `probe: virtio devices=<n>`, then per device (index = token order, from 0) `probe: virtio <i> id=<device id> base=<0xaddr> irq=<gsi>` or `probe: virtio <i> bad magic=<0x..> version=<v> base=<0x..>`; `probe: virtio bad token <token>` for a token that does not parse |
//! | `blk`   | drives the first virtio-blk device (id 2); see [virtio-blk](#virtio-blk-the-blk-step) | `probe: blk capacity=<sectors>` ... `probe: blk irqs=<n>` |
//! | `vsock` | drives the first virtio-vsock device (id 19); see [virtio-vsock](#virtio-vsock-the-vsock-step) | `probe: vsock cid=<cid>` ... `probe: vsock done` |
//! | `blkbench` | sequential write, FLUSH, then read of `probe.blkbench_mib=` MiB (16) in `probe.blkbench_kib=` KiB requests (128), one in flight, from/to plain RAM at 0x400000 | `probe: blkbench write start`, `probe: blkbench write done bytes=<n>`, `probe: blkbench read start`, `probe: blkbench read done bytes=<n>` |
//! | `net`   | drives the first virtio-net device (id 1): DHCP DISCOVER, ARP request; see [virtio-net](#virtio-net-the-net-and-netbench-steps) | `probe: net mac=<aa:bb:cc:dd:ee:ff>` ... `probe: net done` |
//! | `netbench` | sends `probe.netbench_frames=` (10000) 1514-byte broadcast frames (ethertype 0x88b5) as fast as the tx queue takes them | `probe: net mac=<mac>`, `probe: netbench start`, `probe: netbench done frames=<n> bytes=<n>` |
//! | `ready` | drives the first virtio-vsock device, sends `keystone agent`'s readiness message to host port 1024 and serves vsock until the VM is stopped; see [the `ready` step](#the-ready-step) | `probe: vsock cid=<cid>`, `probe: ready sent` (or `probe: ready failed`), `probe: ready idle` |
//! | `reset` | `out 0x64, 0xfe` (i8042 CPU reset: the VMM should exit 0), then halts | `probe: reset` |
//! | `fault` | loads an empty IDT and executes `ud2`: a triple fault (the VMM should exit non-zero) | `probe: fault` |
//! | `spin`  | `cli; hlt` forever (for signal handling tests) | `probe: spinning` |
//! | `fill` | writes `probe.fill_mib=` MiB (16) of RAM at 16 MiB with a pattern, then reads one word of every page of it forever (snapshot benchmark: a restored guest touches all it had) | `probe: fill done mib=<n>`, then `probe: fill pass <n> bad=<wrong words>` |
//! | `count` | counts forever in RAM (a static), printing each value after a spin of 10000 pauses (snapshot tests: a restored probe goes on from where it was) | `probe: count <n>` for n = 1, 2, ... |
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
//!
//! # The virtio drivers
//!
//! Minimal virtio 1.x drivers over virtio-mmio (register layout version 2,
//! 32-bit register accesses, split virtqueues). Initialization: Status = 0
//! (reset, read back until 0), ACKNOWLEDGE, DRIVER, read DeviceFeatures
//! (select 0 and 1), require VIRTIO_F_VERSION_1 (bit 32), write
//! DriverFeatures (select 0: the device-specific bits below if offered,
//! select 1: VERSION_1 only), FEATURES_OK (read back), queues (QueueNum a
//! power of two ≤ QueueNumMax, rings in one page of the `.dma` area:
//! descriptors at +0, available ring after them, used ring at +0x800;
//! QueueReady = 1), route the interrupt (IOAPIC pin `<gsi>` → vector 0x30 +
//! device index, edge, to the BSP), DRIVER_OK. No notification suppression
//! or event-idx: every buffer made available is followed by a QueueNotify
//! write of the queue index.
//!
//! Completions are waited for with `sti; hlt`, each sleep bounded by a
//! 10 ms one-shot local APIC timer (vector 0x40). The interrupt handler
//! counts, reads InterruptStatus and writes it to InterruptACK, then EOIs.
//! The driver reads the used rings itself after every wake-up, so a device
//! that never interrupts still completes (slowly); if used buffers show up
//! after a sleep that only the timer ended, and no interrupt came even after
//! one more tick, it prints `probe: virtio <index> no interrupt` (once per
//! device). Failures print one line and end the step:
//! `probe: <blk|vsock> no device`, `probe: <name> no VERSION_1
//! features=<0x..>`, `probe: <name> <reset did not complete:|FEATURES_OK not
//! accepted:|DRIVER_OK not accepted:> status=<0x..>`, `probe: <name> queue <q>
//! unusable max=<n> ready=<n>`. A device interrupt on a GSI ≥ 24 is not
//! routed (`probe: virtio <i> irq <gsi> is not an IOAPIC pin: polling`).
//!
//! ## virtio-blk: the `blk` step
//!
//! Features: VIRTIO_BLK_F_FLUSH (bit 9) if offered. One queue of 16
//! descriptors, requests one at a time (header, data, status descriptors;
//! the status byte pre-filled with 0xff), each waited for at most 2 s. In
//! order:
//!
//! 1. `probe: blk capacity=<sectors>` (config offset 0, u64), and
//!    `probe: blk read-only` if VIRTIO_BLK_F_RO (bit 5) is offered (the
//!    writes below are still attempted). A capacity of 0 prints
//!    `probe: blk empty disk` and skips to the last line.
//! 2. Writes [`blk_pattern`]`(s)` (byte i = (s * 31 + i) & 0xff) to sectors
//!    s = 0, capacity / 2 and capacity - 1, FLUSH, reads them back:
//!    `probe: blk pattern ok`, or `probe: blk pattern MISMATCH sector=<s>`
//!    (the first one that differs or failed).
//! 3. GET_ID (20 bytes): `probe: blk id=<serial>` (up to the first NUL,
//!    unprintable bytes as `?`).
//! 4. Malformed requests, each `probe: blk bad <name> status=<n>` with the
//!    status byte as returned (255: returned without it being written), or
//!    `probe: blk bad <name> timeout` if not returned within 2 s (its
//!    descriptors are then never reused):
//!    `read-past-end` (IN at sector = capacity), `overflow-sector` (IN at
//!    sector 0xffff_ffff_ffff_ffff), `write-only-header` (IN of sector 0
//!    whose header descriptor is device-writable), `readonly-status` (IN of
//!    sector 0 whose status descriptor is not device-writable),
//!    `unsupported-type` (type 99 with a device-writable 512-byte buffer),
//!    `bad-len` (IN of sector 0 into a 100-byte buffer).
//! 5. Reads sector 0 again: `probe: blk still ok` if it holds the pattern,
//!    else `probe: blk still MISMATCH`.
//! 6. Writes [`blk_marker`]`(capacity)` to the last sector and flushes:
//!    `probe: blk marker written sector=<capacity - 1>`.
//! 7. `probe: blk irqs=<interrupts taken>` (by this device since boot).
//!
//! A request that should succeed and does not prints
//! `probe: blk <write|flush|read|get-id|re-read|marker> sector=<s> status=<n>`
//! (or `... timeout`) where it happens; the FLUSHes are skipped with
//! `probe: blk no flush feature` if the device does not offer it. So after a
//! successful run the disk holds `blk_pattern(0)` in sector 0,
//! `blk_pattern(capacity / 2)` in sector capacity / 2 (if that is not the
//! last sector) and `blk_marker(capacity)` in the last sector; nothing else
//! was written.
//!
//! ## virtio-vsock: the `vsock` step
//!
//! No device-specific features. Queues: rx (32 descriptors: 16 buffers of a
//! 44-byte header descriptor chained to a 4 KiB data descriptor), tx (16:
//! 8 slots of header + data), event (4 buffers of 8 bytes). Stream sockets
//! only; the probe advertises `buf_alloc` = 64 KiB and its `fwd_cnt` in
//! every header, sends CREDIT_UPDATE after consuming half a window without
//! sending anything, answers CREDIT_REQUEST, sends CREDIT_REQUEST when the
//! peer's credit is 0, and never sends beyond the peer's credit. Packets
//! for another CID, of another type or with `len` > 4096 are dropped
//! (counted); a packet for no connection gets an RST. Guest-initiated
//! connections go to CID 2 from local ports 49152, 49153, ...
//!
//! `probe: vsock cid=<guest_cid>` (config offset 0, u64) comes once the rx
//! buffers are posted. Then, for each token present, in this order:
//!
//! - `probe.vsock_connect=<port>`: REQUEST to port `<port>`; an RST prints
//!   `probe: vsock connect refused` (no answer in 5 s: `probe: vsock connect
//!   timeout`). Sends [`VSOCK_GREETING`], reads until `\n` (at most 10 s,
//!   128 bytes kept): `probe: vsock echo: <line without the \n>` (with
//!   ` (incomplete)` appended if no `\n` came). Then SHUTDOWN (both
//!   directions) and waits up to 2 s for the RST (then sends one itself);
//!   if the peer had already shut down both directions, just RST.
//! - `probe.vsock_bulk=<port>:<kib>` (`:<kib>` optional, default 1024):
//!   connects the same way and sends `<kib>` KiB where byte i of the stream
//!   is i & 0xff, in packets of at most 4 KiB, within the peer's credit;
//!   waits for the device to take them: `probe: vsock bulk sent <bytes>`, or
//!   `probe: vsock bulk stalled sent=<bytes> credit=<n>` after 10 s without
//!   progress (or if the connection was reset). Then shuts down as above.
//! - `probe.vsock_listen=<port>` with `probe.vsock_accept=<count>` (default
//!   1): prints `probe: vsock listening port=<port> accept=<count>`, then
//!   answers REQUESTs to `<port>` with RESPONSE until `<count>` were
//!   accepted (later ones, and REQUESTs to other ports, get RST); up to 80
//!   connections are open at once. Every byte received is echoed back (an
//!   rx buffer is held until its echo fits the tx slots and the peer's
//!   credit). When the peer shuts down its sending side, the probe finishes
//!   the echo and sends SHUTDOWN (both), then waits for the RST (2 s, then
//!   sends RST itself); a peer SHUTDOWN of both directions or an RST closes
//!   the connection at once. Each closed connection prints
//!   `probe: vsock served <bytes received> bytes on conn <accept order from
//!   0>`. Waits without a time limit until all `<count>` were accepted and
//!   closed.
//!
//! Then `probe: vsock irqs=<interrupts taken by the device since boot>`, `probe: vsock dropped <n>
//! packets` if any were, and `probe: vsock done`. Other lines: `probe: vsock
//! event id=<id>` for an event-queue event (id 0, TRANSPORT_RESET, closes
//! every connection and re-reads the CID), `probe: vsock tx queue stuck`
//! (no tx slot came back in 2 s), `probe: vsock bad <token>` for a value
//! that is not a number, `probe: vsock connection table full`.
//!
//! ## The `ready` step
//!
//! What `keystone agent start` waits for (the probe image that
//! `keystone_cli::image::write_probe_image` writes has `probe=ready` on its
//! command line). The vsock device is set up as for `vsock` (same queues,
//! credit rules and failure lines; `probe: vsock cid=<cid>` once it is up).
//! Then the probe connects to the host (CID 2) port 1024, sends
//! `keystone-ready 1\nend\n` (the readiness message of protocol version 1
//! with no `hostkey` lines), waits for the device to take it, shuts the
//! connection down as in connect mode and prints `probe: ready sent`. A
//! refused or unanswered connection, or a message that could not be sent,
//! is tried again a second later, 5 times in all; then `probe: ready
//! failed`. Either way it prints `probe: ready idle` and serves the device
//! forever: packets are handled as in the `vsock` step with no listening
//! port (every REQUEST gets an RST), transport-reset events close every
//! connection. While no connection is open it sleeps in `sti; hlt` with no
//! timer armed, so an idle probe costs the host nothing; the step never
//! returns (`probe: halted` is not printed) unless there is no usable vsock
//! device (`probe: vsock no device`, ...), in which case the run goes on.
//!
//! ## virtio-net: the `net` and `netbench` steps
//!
//! Features: VIRTIO_NET_F_MAC (bit 5) if offered, nothing else (no
//! checksum offload, no GSO, no mergeable buffers, no control queue), so
//! every buffer starts with a 12-byte `virtio_net_hdr_v1`, all zero on tx.
//! Queues: rx (queue 0, 16 descriptors: 16 buffers of 12 + 1526 bytes, one
//! descriptor each, posted again once handled) and tx (queue 1, 16
//! descriptors; header and frame in one descriptor, as VERSION_1 allows).
//! Both steps first print `probe: net mac=<aa:bb:cc:dd:ee:ff>` (config
//! offset 0, read a byte at a time; without VIRTIO_NET_F_MAC the probe uses
//! 02:00:00:00:00:01 and appends ` (no MAC feature)`), or a failure line as
//! above (`probe: net no device`, ...). Each step resets the device.
//!
//! `net` (frames from 4 tx buffers of 1 KiB, waits counted in timer ticks):
//!
//! 1. DHCP, unless `probe.net_dhcp=0` (then `probe: net dhcp skipped`): a
//!    DISCOVER (342-byte frame: Ethernet broadcast, IPv4 0.0.0.0:68 →
//!    255.255.255.255:67 with the header checksum, UDP checksum 0, a
//!    300-byte BOOTP request: htype 1, hlen 6, xid 0x4b50xxxx (xxxx = last
//!    two MAC bytes), flags 0x8000, chaddr = our MAC, magic cookie, options
//!    53 = 1, 55 = [1, 3, 6], end), sent again every second, for at most
//!    3 s, until an OFFER comes (UDP to port 68, BOOTREPLY with our xid,
//!    option 53 = 2): `probe: net dhcp offer ip=<yiaddr> server=<option 54,
//!    else siaddr> router=<option 3's first address, 0.0.0.0 if none>`, or
//!    `probe: net dhcp none`.
//! 2. ARP: target `probe.net_arp=<a.b.c.d>`, else the offered router;
//!    sender IP `probe.net_ip=<a.b.c.d>`, else the offered ip. If either is
//!    unknown (or 0.0.0.0): `probe: net arp skipped`. Otherwise an ARP
//!    request (broadcast, 60 bytes), sent again every second, for at most
//!    3 s, until an ARP reply whose sender IP is the target:
//!    `probe: net arp reply ip=<target> mac=<its sender MAC>`, or
//!    `probe: net arp none`. A token that is not a dotted quad prints
//!    `probe: net bad probe.net_arp=<value>` (or `net_ip`) and counts as
//!    unknown.
//! 3. Waits (at most 2 s) for the device to return the tx buffers, then
//!    `probe: net tx=<frames made available> rx=<frames received>
//!    irqs=<interrupts taken by the device since boot>` and `probe: net
//!    done`.
//!
//! `netbench`: prepares one 1514-byte frame (broadcast destination, our MAC,
//! ethertype 0x88b5, payload byte i = i & 0xff) behind a zero header, points
//! every tx descriptor at it, prints `probe: netbench start`, then keeps the
//! tx ring full: reclaims used descriptors, makes them available again (one
//! QueueNotify per batch, not per frame), sleeps only when the ring is full
//! and nothing came back, until the device has used
//! `probe.netbench_frames=<n>` (10000) frames. Received frames are counted
//! and their buffers posted again. Then `probe: netbench done frames=<frames
//! the device used> bytes=<frames * 1514>`, preceded by `probe: netbench
//! stalled sent=<n> done=<n>` if 2 s passed without progress. `probe: net tx
//! queue stuck` in `net` means no tx buffer came back within 2 s.

use std::path::Path;

/// Physical (= virtual) address the probe is linked at; also its entry point.
pub const LOAD_ADDR: u64 = 0x10_0000;

/// The step names the probe understands in `probe=`.
pub const STEPS: &[&str] = &[
    "timer", "smp", "echo", "virtio", "blk", "blkbench", "vsock", "ready", "net", "netbench",
    "reset", "fault", "spin", "count", "fill",
];

/// Bytes of a disk sector as the `blk` step uses them.
pub const SECTOR_SIZE: usize = 512;

/// The first 16 bytes of [`blk_marker`].
pub const BLK_MARKER_MAGIC: &[u8; 16] = b"KEYSTONE-PROBE\0\0";

/// What the `blk` step writes to `sector` (0, capacity / 2, and at first
/// capacity - 1): byte i = (sector * 31 + i) & 0xff.
pub fn blk_pattern(sector: u64) -> [u8; SECTOR_SIZE] {
    let mut s = [0u8; SECTOR_SIZE];
    for (i, b) in s.iter_mut().enumerate() {
        *b = (sector.wrapping_mul(31).wrapping_add(i as u64) & 0xff) as u8;
    }
    s
}

/// What the `blk` step leaves in the last sector of a disk of `capacity`
/// sectors: bytes 0..16 [`BLK_MARKER_MAGIC`], bytes 16..24 `capacity`
/// (u64 little-endian, as the guest read it from the device), then byte
/// i = 255 - (i & 0xff) for i in 24..512.
pub fn blk_marker(capacity: u64) -> [u8; SECTOR_SIZE] {
    let mut s = [0u8; SECTOR_SIZE];
    s[..16].copy_from_slice(BLK_MARKER_MAGIC);
    s[16..24].copy_from_slice(&capacity.to_le_bytes());
    for (i, b) in s.iter_mut().enumerate().skip(24) {
        *b = 255 - (i & 0xff) as u8;
    }
    s
}

/// What `probe.vsock_connect=<port>` sends; it expects it echoed back.
pub const VSOCK_GREETING: &str = "hello from guest\n";

/// First local port of guest-initiated vsock connections.
pub const VSOCK_FIRST_LOCAL_PORT: u32 = 49152;

/// Receive window (`buf_alloc`) the `vsock` step advertises.
pub const VSOCK_BUF_ALLOC: u32 = 64 * 1024;

/// Ethernet frame length (no FCS) of every `netbench` frame.
pub const NETBENCH_FRAME_LEN: u64 = 1514;

/// Ethertype of the `netbench` frames (IEEE 802 local experimental 1).
pub const NETBENCH_ETHERTYPE: u16 = 0x88b5;

/// The probe guest ELF itself, for programs that ship it (`keystone bench
/// boot --probe` writes it to a cache file).
pub const ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/keystone-probe.elf"));

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
    const PT_NOTE: u32 = 4;
    /// XEN_ELFNOTE_PHYS32_ENTRY: the 32-bit PVH entry point.
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
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
        offset: u64,
        vaddr: u64,
        paddr: u64,
        filesz: u64,
        memsz: u64,
        align: u64,
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
                    offset: u64_at(b, p + 8),
                    vaddr: u64_at(b, p + 16),
                    paddr: u64_at(b, p + 24),
                    filesz: u64_at(b, p + 32),
                    memsz: u64_at(b, p + 40),
                    align: u64_at(b, p + 48),
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

    /// The PVH entry QEMU uses: a "Xen" note of type 18 in a PT_NOTE
    /// segment, naming an address in executable code; the ELF entry (the
    /// VMM's) is unchanged.
    #[test]
    fn pvh_note_names_an_entry_in_executable_code() {
        let b = elf();
        assert_eq!(u64_at(&b, 24), LOAD_ADDR, "ELF entry is still _start");
        let phdrs = phdrs(&b);
        let mut entries = Vec::new();
        for note in phdrs.iter().filter(|p| p.p_type == PT_NOTE) {
            assert_eq!(note.align, 4, "PT_NOTE aligned 4 (QEMU pads by p_align)");
            let (mut off, end) = (note.offset as usize, (note.offset + note.filesz) as usize);
            while off + 12 <= end {
                let (namesz, descsz, n_type) =
                    (u32_at(&b, off), u32_at(&b, off + 4), u32_at(&b, off + 8));
                let name_at = off + 12;
                let desc_at = name_at + (namesz as usize).next_multiple_of(4);
                off = desc_at + (descsz as usize).next_multiple_of(4);
                assert!(off <= end, "note runs past its PT_NOTE segment");
                if &b[name_at..name_at + namesz as usize] == b"Xen\0"
                    && n_type == XEN_ELFNOTE_PHYS32_ENTRY
                {
                    assert!(descsz == 4 || descsz == 8, "desc size {descsz}");
                    if descsz == 8 {
                        assert_eq!(u32_at(&b, desc_at + 4), 0, "entry below 4 GiB");
                    }
                    entries.push(u64::from(u32_at(&b, desc_at)));
                }
            }
        }
        assert_eq!(entries.len(), 1, "one PVH entry note");
        let entry = entries[0];
        assert_ne!(entry, LOAD_ADDR, "the PVH entry is its own 32-bit code");
        assert!(
            phdrs.iter().any(|p| p.p_type == PT_LOAD
                && p.flags & PF_X != 0
                && (p.paddr..p.paddr + p.filesz).contains(&entry)),
            "PVH entry {entry:#x} inside an executable PT_LOAD"
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
            "virtio_mmio.device=",
            "probe: virtio devices=",
            "probe: blk capacity=",
            "probe: blk pattern ok",
            "probe: blk pattern MISMATCH sector=",
            "probe: blk id=",
            "probe: blk bad ",
            "read-past-end",
            "overflow-sector",
            "write-only-header",
            "readonly-status",
            "unsupported-type",
            "bad-len",
            "probe: blk still ok",
            "probe: blk marker written sector=",
            "probe: blk irqs=",
            "probe.vsock_connect=",
            "probe.vsock_listen=",
            "probe.vsock_accept=",
            "probe.vsock_bulk=",
            "probe: vsock cid=",
            "probe: vsock connect refused",
            "probe: vsock echo: ",
            "probe: vsock served ",
            "probe: vsock bulk sent ",
            "probe: vsock irqs=",
            "probe: vsock done",
            "keystone-ready 1\nend\n",
            "probe: ready sent",
            "probe: ready failed",
            "probe: ready idle",
            "probe: net mac=",
            "probe: net dhcp offer ip=",
            " server=",
            " router=",
            "probe: net dhcp none",
            "probe: net dhcp skipped",
            "probe.net_dhcp=",
            "probe.net_arp=",
            "probe.net_ip=",
            "probe: net arp reply ip=",
            "probe: net arp none",
            "probe: net arp skipped",
            "probe: net tx=",
            "probe: net done",
            "probe.netbench_frames=",
            "probe: netbench start",
            "probe: netbench done frames=",
            VSOCK_GREETING,
        ] {
            assert!(has(s), "{s:?} missing from the image");
        }
        for step in STEPS {
            assert!(has(step), "step {step:?} missing from the image");
        }
        assert!(has(std::str::from_utf8(BLK_MARKER_MAGIC).unwrap()));
    }

    #[test]
    fn blk_pattern_and_marker_layout() {
        let p = blk_pattern(3);
        assert_eq!(&p[..3], &[93, 94, 95]);
        assert_eq!(p[511], ((93 + 511) & 0xff) as u8);
        let m = blk_marker(16384);
        assert_eq!(&m[..16], b"KEYSTONE-PROBE\0\0");
        assert_eq!(u64::from_le_bytes(m[16..24].try_into().unwrap()), 16384);
        assert_eq!(m[24], 255 - 24);
        assert_eq!(m[256], 255);
        assert_eq!(m[511], 0);
    }

    /// Symbols in .text that are not 64-bit code (the AP trampoline's 16/32-bit
    /// parts and its data), which objdump would decode as garbage.
    const NOT_64BIT_CODE: &[&str] = &[
        "probe_ap_trampoline_start",
        "probe_ap_pm32",
        "probe_ap_gdt",
        "probe_ap_gdt_ptr",
        "probe_ap_mailbox_cr3",
        "_pvh_start",
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
