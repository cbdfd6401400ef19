//! `flowstep clean-prompts` (hidden): each JSON string on stdin (one per line) cleaned as the
//! text encoder cleans a prompt before tokenizing (DiffSynth's `whitespace_clean(basic_clean(.))`),
//! one JSON string per line on stdout, so that export/tests/test_prompt_clean.py can compare
//! flowstep's cleaning with DiffSynth's own functions.

use std::io::{BufRead, Write};
use std::process::ExitCode;

use flowstep::prompt_clean::clean;

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    let (stdin, stdout) = (std::io::stdin().lock(), std::io::stdout().lock());
    let mut out = std::io::BufWriter::new(stdout);
    for (i, line) in stdin.lines().enumerate() {
        let text: String = serde_json::from_str(&line?).map_err(|e| anyhow::anyhow!("stdin line {}: not a JSON string: {e}", i + 1))?;
        serde_json::to_writer(&mut out, &clean(&text)?)?;
        writeln!(out)?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
