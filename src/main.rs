//! The `flowstep` binary: parse flags, run one command, print any error once.

use std::process::ExitCode;

fn main() -> ExitCode {
    flowstep_cli::run()
}

#[path = "cli/mod.rs"]
mod flowstep_cli;
