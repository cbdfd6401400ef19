//! `flowstep export-lora`: the LoRA file of a training checkpoint, as training writes to
//! `OUT/loras/` at each checkpoint, in any layout and precision.

use std::path::PathBuf;
use std::process::ExitCode;

use flowstep::lora_io::{self, LoraFormat};
use flowstep::tensor_file::SaveDtype;

use super::Globals;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Checkpoint directory: OUT/checkpoints/step-XXXXXX (checksums verified).
    #[arg(value_name = "CHECKPOINT_DIR")]
    pub checkpoint: PathBuf,

    /// LoRA file to write; an existing file is not replaced.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,

    /// Key layout: comfyui loads in ComfyUI, diffusers, musubi-tuner (convert_lora.py) and
    /// DiffSynth-Studio; diffsynth in DiffSynth-Studio only.
    #[arg(long, value_enum, default_value_t = LoraFormat::Comfyui)]
    pub lora_format: LoraFormat,

    /// Precision of the file (the checkpoint holds float32).
    #[arg(long, value_enum, default_value_t = SaveDtype::Bf16)]
    pub dtype: SaveDtype,

    /// For a checkpoint of a Wan2.2 A14B pair job (`flowstep train --expert-artifacts`): the
    /// expert whose LoRA to write, high_noise or low_noise.
    #[arg(long, value_name = "ROLE")]
    pub expert: Option<String>,
}

pub fn run(args: Args, globals: &Globals) -> anyhow::Result<ExitCode> {
    if args.out.exists() {
        anyhow::bail!("--out {}: already exists; remove it or choose another file", args.out.display());
    }
    let (spec, params) = match &args.expert {
        Some(role) => flowstep::checkpoint::load_expert_lora(&args.checkpoint, role)?,
        None => flowstep::checkpoint::load_lora(&args.checkpoint)?,
    };
    lora_io::save(&args.out, &spec.info, &params, args.lora_format, args.dtype, &spec.metadata)?;
    if !globals.quiet {
        let step = spec.metadata.get("ss_steps").map_or("?", String::as_str);
        eprintln!("wrote {} (step {step}, rank {}, alpha {})", args.out.display(), spec.info.rank, spec.info.alpha);
    }
    Ok(ExitCode::SUCCESS)
}
