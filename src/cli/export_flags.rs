//! Export-time options given to `flowstep train`: the LoRA's shape and the graphs' memory
//! and precision are fixed when `python -m flowstep_export` writes the artifacts, so such a
//! flag gets a line naming the export flag instead of clap's suggestion of an unrelated one.

use clap::error::{ContextKind, ContextValue, ErrorKind};

/// `python -m flowstep_export` flags that users of other trainers look for on `train`.
const EXPORT_OPTIONS: [&str; 7] =
    ["--lora-rank", "--lora-targets", "--lora-init", "--gradient-checkpointing", "--precision", "--attention", "--attention-chunk"];

/// The line for an unknown `train` argument that is an export option; None for any other error.
pub fn hint(err: &clap::Error) -> Option<String> {
    if err.kind() != ErrorKind::UnknownArgument {
        return None;
    }
    let Some(ContextValue::StyledStr(usage)) = err.get(ContextKind::Usage) else { return None };
    if !usage.to_string().contains("flowstep train ") {
        return None;
    }
    let Some(ContextValue::String(arg)) = err.get(ContextKind::InvalidArg) else { return None };
    let flag = arg.split('=').next().unwrap_or(arg);
    EXPORT_OPTIONS.contains(&flag).then(|| {
        format!(
            "{flag} is an export option, fixed in the artifacts: export again with `python -m flowstep_export --model MODEL --out DIR {flag} ...` \
             and train with --artifacts DIR"
        )
    })
}
