//! `flowstep train --config FILE` and `OUT/config.toml`: every `train` flag is a TOML key (its
//! long name). The keys the command line does not give become command-line tokens before clap
//! parses, so a new flag needs no code here, and the resolved flags are written back as TOML.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, CommandFactory};

use super::Cli;

/// The resolved config's file name in `--out`.
pub const FILE_NAME: &str = "config.toml";

/// Flags that act on one invocation: neither read from a file nor stored.
const PER_INVOCATION: [&str; 4] = ["config", "resume", "allow-changed-hyperparameters", "stop-after"];

/// A config file is a few hundred bytes; anything near this is not one.
const SIZE_LIMIT: u64 = 1 << 20;

/// What clap parses: the user's arguments plus the config file's keys they do not give, and
/// the config stored in `--out` when this is a resume (to report what changed).
pub struct Expanded {
    pub argv: Vec<OsString>,
    pub stored: Option<(PathBuf, toml::Table)>,
}

fn train_command() -> clap::Command {
    Cli::command().find_subcommand("train").cloned().unwrap_or_else(|| clap::Command::new("train"))
}

/// Adds the config's keys to `argv` for `flowstep train`: those of `--config FILE`, else on
/// `--resume` those of `OUT/config.toml`. Any other command, and arguments clap will refuse
/// anyway, pass through unchanged.
pub fn expand(mut argv: Vec<OsString>) -> anyhow::Result<Expanded> {
    let unchanged = |argv| Ok(Expanded { argv, stored: None });
    // Required flags may be in the file: this first look only reads what the user gave.
    let lenient = Cli::command().ignore_errors(true).mut_subcommand("train", |c| c.ignore_errors(true));
    let Ok(matches) = lenient.try_get_matches_from(&argv) else { return unchanged(argv) };
    let Some(("train", given)) = matches.subcommand() else { return unchanged(argv) };
    // try_get: after a parse error clap leaves even flags' defaults unset.
    let path = |id| given.try_get_one::<PathBuf>(id).ok().flatten();
    let stored_path = match (given.try_get_one::<bool>("resume"), path("out")) {
        (Ok(Some(true)), Some(out)) => Some(out.join(FILE_NAME)).filter(|p| p.exists()),
        _ => None,
    };
    let stored = stored_path.map(|p| read(&p).map(|table| (p, table))).transpose()?;
    let file = match (path("config"), &stored) {
        (Some(path), _) => Some((path.clone(), read(path)?)),
        (None, Some(stored)) => Some(stored.clone()),
        (None, None) => None,
    };
    if let Some((path, table)) = file {
        argv.extend(tokens(&path, &table, given)?);
    }
    Ok(Expanded { argv, stored })
}

fn read(path: &Path) -> anyhow::Result<toml::Table> {
    let text = flowstep::small_file::read_text(path, "run config (TOML)", SIZE_LIMIT)?;
    text.parse::<toml::Table>().map_err(|e| {
        let line = e.span().map_or(1, |s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        anyhow::anyhow!("{}: not a TOML run config (line {line}): {}", path.display(), e.message().trim())
    })
}

/// The file's keys as `--flag=value` tokens, leaving out those the command line gives (or
/// any flag they conflict with, such as --epochs for --steps).
fn tokens(path: &Path, table: &toml::Table, given: &ArgMatches) -> anyhow::Result<Vec<OsString>> {
    let command = train_command();
    let on_command_line = |arg: &Arg| given.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine);
    let bad = |key: &str, reason: String| anyhow::anyhow!("{}: `{key}`: {reason}", path.display());
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (key, value) in table {
        let name = key.replace('_', "-");
        if !seen.insert(name.clone()) {
            return Err(bad(key, format!("given twice (as {name} and with underscores)")));
        }
        let arg = command
            .get_arguments()
            .find(|a| a.get_long() == Some(name.as_str()))
            .ok_or_else(|| bad(key, "not a flag of `flowstep train` (keys are the flags' long names, as `grad-accum = 4`)".into()))?;
        if PER_INVOCATION.contains(&name.as_str()) {
            return Err(bad(key, format!("acts on one run only; give --{name} on the command line")));
        }
        let conflicts = command.get_arguments().any(|a| {
            on_command_line(a) && (command.get_arg_conflicts_with(a).contains(&arg) || command.get_arg_conflicts_with(arg).contains(&a))
        });
        if on_command_line(arg) || conflicts {
            continue;
        }
        if !arg.get_action().takes_values() {
            match value {
                toml::Value::Boolean(true) => out.push(format!("--{name}").into()),
                toml::Value::Boolean(false) => {}
                other => return Err(bad(key, format!("an on/off flag takes true or false, got {}", other.type_str()))),
            }
            continue;
        }
        let text = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            other => return Err(bad(key, format!("takes a number or a string, got {}", other.type_str()))),
        };
        // The flag alone, without the relations (--requires) it has to the others.
        let alone = Arg::new("value").value_parser(arg.get_value_parser().clone()).allow_hyphen_values(true);
        let check = clap::Command::new("train").no_binary_name(true).arg(alone).try_get_matches_from([&text]);
        if let Err(e) = check {
            return Err(bad(key, clap_reason(&e).replace("'[value]'", &format!("--{name}"))));
        }
        out.push(format!("--{name}={text}").into());
    }
    Ok(out)
}

/// clap's message without its "error:" prefix and help footer, on one line.
fn clap_reason(e: &clap::Error) -> String {
    let text = e.to_string();
    let kept: Vec<&str> = text.lines().take_while(|l| !l.starts_with("For more information")).collect();
    kept.join(" ").trim_start_matches("error: ").split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Every stored `train` flag's effective value (given, from a file, or the default); flags
/// without a value are left out.
pub fn resolved(given: &ArgMatches) -> toml::Table {
    let command = train_command();
    let mut table = toml::Table::new();
    for arg in command.get_arguments() {
        let (id, Some(long)) = (arg.get_id().as_str(), arg.get_long()) else { continue };
        if PER_INVOCATION.contains(&long) {
            continue;
        }
        if matches!(arg.get_action(), ArgAction::SetTrue) {
            table.insert(long.into(), toml::Value::Boolean(given.get_flag(id)));
            continue;
        }
        if !arg.get_action().takes_values() {
            continue;
        }
        let Some(raw) = given.get_raw(id).and_then(|mut v| v.next()) else { continue };
        let text = raw.to_string_lossy().into_owned();
        table.insert(long.into(), typed(arg, text));
    }
    table
}

/// A number for a flag clap parses as one, so that the file reads as it would be written.
fn typed(arg: &Arg, text: String) -> toml::Value {
    let parser = arg.get_value_parser().type_id();
    let is = |p: clap::builder::ValueParser| p.type_id() == parser;
    let integer = is(clap::value_parser!(u64).into()) || is(clap::value_parser!(usize).into());
    let float = is(clap::value_parser!(f64).into()) || is(clap::value_parser!(f32).into());
    match (integer, float) {
        (true, _) => text.parse::<i64>().map_or(toml::Value::String(text), toml::Value::Integer),
        (_, true) => text.parse::<f64>().map_or(toml::Value::String(text), toml::Value::Float),
        _ => toml::Value::String(text),
    }
}

/// One line per flag this resume drops, adds or changes against the stored config.
pub fn changes(stored: &toml::Table, now: &toml::Table) -> Vec<String> {
    let mut keys: Vec<&String> = stored.keys().chain(now.keys()).collect();
    keys.sort();
    keys.dedup();
    let show = |v: &toml::Value| v.as_str().map_or_else(|| v.to_string(), str::to_string);
    keys.into_iter()
        .filter_map(|k| match (stored.get(k), now.get(k)) {
            (Some(a), None) => Some(format!("--{k} dropped (was {})", show(a))),
            (None, Some(b)) => Some(format!("--{k} added ({})", show(b))),
            (Some(a), Some(b)) if a != b => Some(format!("--{k} changed: {} → {}", show(a), show(b))),
            _ => None,
        })
        .collect()
}
