//! `keystone-vmm`: boot a kernel in a KVM microVM.
//!
//! Exit codes: 0 the guest reset or powered off, or SIGTERM/SIGINT stopped
//! the VM; 1 the guest failed (triple fault, KVM internal error) or the VMM
//! could not run it; 2 bad arguments.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use keystone_devices::boot_timer::Timestamp;
use keystone_vmm::{host, Cli, VmConfig};

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("keystone-vmm: error: {msg}");
    ExitCode::from(code)
}

fn main() -> ExitCode {
    // First thing: the boot timer measures from here.
    let start = Timestamp::now();

    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line: clap's message up to its usage hint, joined.
            let text = e.render().to_string();
            let msg: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty() && !l.starts_with("Usage:"))
                .map(str::trim)
                .collect();
            return fail(2, msg.join(" ").trim_start_matches("error: "));
        }
    };
    let config = match VmConfig::from_cli(&cli, host::host_mem_mib()) {
        Ok(c) => c,
        Err(e) => return fail(2, e),
    };
    if let Some(jail) = &config.jail {
        // Nothing the parent left open (without close-on-exec) comes in.
        // SAFETY: close_range(2) with integer arguments; fds 0-2 stay, and
        // nothing of ours is open above them yet.
        unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
        // Before anything else starts a thread: fork into a PID namespace.
        match keystone_vmm::jail::enter_pid_namespace(jail) {
            Ok(keystone_vmm::jail::Side::Vmm) => {}
            Ok(keystone_vmm::jail::Side::Supervisor(code)) => {
                // The jailed VMM could not remove what it made outside.
                if let Some(v) = &config.vsock {
                    let _ = std::fs::remove_file(&v.uds_path);
                }
                let _ = std::fs::remove_dir(&jail.root);
                return ExitCode::from(code.clamp(0, 255) as u8);
            }
            Err(e) => return fail(1, e),
        }
    }
    let level =
        keystone_vmm::config::check_log_level(&cli.log_level).unwrap_or(tracing::Level::INFO);
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .without_time()
        .init();
    // Lets a benchmark place the VMM's own phases on its clock.
    tracing::debug!("VMM start: monotonic {} us", start.wall_us);

    match keystone_vmm::run(&config, start, None) {
        Ok(exit) => {
            let code = exit.exit_code();
            match &exit {
                keystone_vmm::VmExit::GuestError(msg) => return fail(1, msg),
                other => tracing::info!("VM stopped: {other:?}"),
            }
            ExitCode::from(code as u8)
        }
        Err(e) => fail(1, e),
    }
}
