//! `keystone`: microVM sandboxes for coding agents.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use keystone_cli::bench::{self, BootBench, Guest, Peer};
use keystone_cli::doctor::{self, HostReport};
use keystone_cli::image;

#[derive(Debug, Parser)]
#[command(
    name = "keystone",
    version,
    about = "microVM sandboxes for coding agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check whether this host can run Keystone sandboxes (exit 0 yes, 4 no).
    Doctor,
    /// Guest images: build the sandbox image (cached by content hash).
    Image {
        #[command(subcommand)]
        what: ImageCommand,
    },
    /// Agent sandboxes: one microVM per git project.
    Agent {
        #[command(subcommand)]
        verb: keystone_cli::agent::cli::AgentCommand,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Build the guest image (kernel, rootfs.ext4, manifest.json) unless the
    /// cache already holds one built from the same inputs; print its directory.
    Build(ImageBuildArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum BuilderName {
    /// Nix where a Nix store exists, else Debian.
    Auto,
    /// debootstrap + Debian packages (needs root or sudo).
    Debian,
    /// nix build guest-image#image.
    Nix,
}

#[derive(Debug, Args)]
struct ImageBuildArgs {
    /// Which builder.
    #[arg(long, value_enum, default_value_t = BuilderName::Auto)]
    builder: BuilderName,
    /// The Debian builder's kernel: `stock` (Debian's linux-image-amd64,
    /// nothing compiled) or `minimal` (compiled from linux-source-6.1; the
    /// fastest boot).
    #[arg(long, value_enum, default_value_t = KernelName::Stock)]
    kernel: KernelName,
    /// Rebuild even if the cache holds this image.
    #[arg(long)]
    force: bool,
    /// Print the manifest as JSON instead of the directory.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum KernelName {
    /// Debian's own kernel from the mirror.
    Stock,
    /// Our kernel, compiled from linux-source-6.1.
    Minimal,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Boot a guest N times and report every boot phase (min / median / p90
    /// / max), optionally side by side with a peer VMM in alternating runs.
    Boot(BootArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum PeerName {
    Qemu,
    Firecracker,
}

#[derive(Debug, Args)]
struct BootArgs {
    /// Boots per VMM.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=10000))]
    runs: u64,
    /// Boot the probe guest (the default when no --kernel is given).
    #[arg(long, conflicts_with_all = ["kernel", "rootfs"])]
    probe: bool,
    /// Linux kernel (vmlinux or bzImage) of a guest image.
    #[arg(long, requires = "rootfs")]
    kernel: Option<PathBuf>,
    /// Root filesystem image (ext4) of a guest image.
    #[arg(long, requires = "kernel")]
    rootfs: Option<PathBuf>,
    /// Initial ramdisk of a guest image (the stock-kernel image's).
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line for --kernel.
    #[arg(
        long,
        default_value = "console=ttyS0 reboot=k panic=1 pci=off acpi=off nomodule i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd root=/dev/vda ro quiet"
    )]
    cmdline: String,
    /// vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=64))]
    vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(128..))]
    memory: u64,
    /// Compare with a peer VMM, alternating runs.
    #[arg(long, value_enum)]
    against: Option<PeerName>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write an SVG plot of every phase's distribution here.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("keystone: error: {msg}");
    ExitCode::from(code)
}

fn bench_boot(a: BootArgs) -> ExitCode {
    let report = HostReport::inspect();
    if report.kvm_usable.is_err() {
        return fail(
            doctor::exit::NO_KVM,
            report.to_string().lines().next().unwrap_or("no KVM"),
        );
    }
    let Some(vmm) = std::env::var_os("KEYSTONE_VMM")
        .map(PathBuf::from)
        .or_else(|| keystone_cli::binaries::find_binary("keystone-vmm"))
    else {
        return fail(
            1,
            "keystone-vmm not found next to keystone or on PATH (or set KEYSTONE_VMM)",
        );
    };
    let guest = match (a.kernel, a.rootfs) {
        (Some(kernel), Some(rootfs)) => Guest::Linux {
            kernel,
            initrd: a.initrd,
            rootfs,
            cmdline: a.cmdline,
        },
        _ => match bench::probe_path() {
            Ok(p) => Guest::Probe(p),
            Err(e) => return fail(1, e),
        },
    };
    let against = match a.against {
        None => None,
        Some(PeerName::Qemu) => match keystone_cli::binaries::find_binary("qemu-system-x86_64") {
            Some(p) => Some(Peer::Qemu(p)),
            None => {
                return fail(
                    1,
                    "--against qemu needs qemu-system-x86_64: apt-get install qemu-system-x86 (benches/setup-peers.sh)",
                )
            }
        },
        Some(PeerName::Firecracker) => match keystone_cli::binaries::find_binary("firecracker") {
            Some(p) => Some(Peer::Firecracker(p)),
            None => return fail(1, "--against firecracker needs a firecracker binary on PATH"),
        },
    };
    let b = BootBench {
        runs: a.runs as usize,
        guest,
        vcpus: a.vcpus,
        memory_mib: a.memory,
        vmm,
        against,
        progress: std::io::stderr().is_terminal(),
    };
    let r = match bench::run(&b) {
        Ok(r) => r,
        Err(e) => return fail(1, e),
    };
    if let Some(path) = &a.svg {
        if let Err(e) = bench::write_atomic(path, &bench::svg(&r)) {
            return fail(1, e);
        }
    }
    if a.json {
        match serde_json::to_string_pretty(&r) {
            Ok(j) => println!("{j}"),
            Err(e) => return fail(1, e),
        }
    } else {
        print!("{}", bench::table(&r));
    }
    ExitCode::SUCCESS
}

fn image_build(a: ImageBuildArgs) -> ExitCode {
    let builder = match a.builder {
        BuilderName::Auto => image::Builder::auto(),
        BuilderName::Debian => image::Builder::Debian,
        BuilderName::Nix => image::Builder::Nix,
    };
    let opts = image::BuildOptions {
        builder,
        force: a.force,
        kernel: match a.kernel {
            KernelName::Stock => image::KernelVariant::Stock,
            KernelName::Minimal => image::KernelVariant::Minimal,
        },
        ..image::BuildOptions::default()
    };
    match image::build(&opts) {
        Ok(img) if a.json => match serde_json::to_string_pretty(&img.manifest) {
            Ok(j) => {
                println!("{j}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(1, e),
        },
        Ok(img) => {
            println!("{}", img.dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, e),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Doctor => {
            let report = HostReport::inspect();
            println!("{report}");
            ExitCode::from(report.exit_code())
        }
        Command::Agent { verb } => ExitCode::from(keystone_cli::agent::cli::run(verb)),
        Command::Bench {
            what: BenchCommand::Boot(a),
        } => bench_boot(a),
        Command::Image {
            what: ImageCommand::Build(a),
        } => image_build(a),
    }
}
