//! `keystone`: microVM sandboxes for coding agents.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keystone_cli::doctor::HostReport;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Doctor => {
            let report = HostReport::inspect();
            println!("{report}");
            ExitCode::from(report.exit_code())
        }
    }
}
