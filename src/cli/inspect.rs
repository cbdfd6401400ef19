//! `flowstep inspect`: validate an artifacts directory and summarise it.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use flowstep::artifacts::{Artifacts, check_session_io};
use flowstep::runtime::AttentionImpl;

use super::{DeviceArgs, Globals};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Artifacts directory written by `python -m flowstep_export`.
    #[arg(long, value_name = "DIR")]
    pub artifacts: PathBuf,

    /// Only check the manifest and sha256s; do not load the graphs in ONNX Runtime.
    #[arg(long)]
    pub no_load: bool,

    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(args: Args, globals: &Globals) -> anyhow::Result<ExitCode> {
    let session = if args.no_load { None } else { Some(super::init_runtime(globals, &args.device)?) };
    let artifacts = Artifacts::open(&args.artifacts)?;
    let m = &artifacts.manifest;
    let md = &m.model;
    // A reader that stops early (`| head`) ends the output, not the program: see `super::run`.
    let mut out = std::io::stdout().lock();
    writeln!(out, "artifacts   {} (format {})", artifacts.dir.display(), m.format_version)?;
    writeln!(out, "model       {} ({}): dim {}, ffn {}, {} heads, {} layers, in {} out {}, text {}×{}",
        md.name, md.variant, md.dim, md.ffn_dim, md.num_heads, md.num_layers, md.in_dim, md.out_dim, md.text_len, md.text_dim)?;
    if !md.conditioning.is_empty() {
        writeln!(out, "condition   {}", md.conditioning.iter().map(|c| format!("{} {}", c.name, c.describe())).collect::<Vec<_>>().join(", "))?;
    }
    if let Some(e) = &m.expert {
        writeln!(out, "expert      {} of a Wan2.2 pair: timestep boundaries [{}, {}), sampling switches at t = {}",
            e.role.as_str(), e.min_timestep_boundary, e.max_timestep_boundary, e.switch_timestep)?;
    }
    let base_values: usize = m.base_weights.tensors.iter().map(|t| t.shape.iter().product::<usize>()).sum();
    writeln!(out, "base        {} tensors, {:.1} M values, {}", m.base_weights.tensors.len(), base_values as f64 / 1e6,
        m.base_weights.file.as_deref().unwrap_or("not shipped: pass --base"))?;
    writeln!(out, "LoRA        rank {}, alpha {}, targets {}, {} tensors, {} parameters",
        m.lora.rank, m.lora.alpha, m.lora.targets.join(","), m.lora.tensors.len(), m.lora.num_params)?;
    writeln!(out, "scheduler   {} (shift {}, {} timesteps)", m.scheduler.template, m.scheduler.shift, m.scheduler.num_train_timesteps)?;
    let t = &m.training;
    let attention = match (AttentionImpl::from_manifest(&t.attention), t.attention.get("chunk")) {
        (Ok(AttentionImpl::Fused), _) => "fused (flowstep's kernels: cpu; cuda with a --features cuda-attention build, bf16)".to_string(),
        (Ok(AttentionImpl::Chunked), Some(chunk)) => format!("chunked ({chunk} queries per chunk: every provider)"),
        (Ok(AttentionImpl::Chunked), None) => "chunked (every provider)".to_string(),
        (Err(reason), _) => reason,
    };
    writeln!(out, "training    {}, attention {attention}, gradient checkpointing {}{}", t.precision, if t.gradient_checkpointing { "on" } else { "off" },
        if t.onnxruntime_disabled_optimizers.is_empty() { String::new() } else { format!(", ONNX Runtime optimizers off: {}", t.onnxruntime_disabled_optimizers.join(",")) })?;
    if !t.operators.is_empty() {
        writeln!(out, "operators   {} (com.flowstep: flowstep's own kernels)", t.operators.join(", "))?;
    }
    writeln!(out, "exporter    {}", m.exporter)?;
    writeln!(out, "sha256      {} files verified", m.files.len())?;
    if let Some(session) = session {
        for (name, sig) in &m.graphs {
            let s = flowstep::runtime::load_session(&artifacts.graph_path(name)?, &session.for_artifacts(m)?)?;
            check_session_io(&artifacts, name, &s)?;
            let size = std::fs::metadata(artifacts.graph_path(name)?).map(|x| x.len()).unwrap_or(0);
            writeln!(out, "graph       {name:<16} {:>7.1} MB, {} inputs, {} outputs: loaded on {} and matches the manifest",
                size as f64 / 1e6, sig.inputs.len(), sig.outputs.len(), session.device)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
