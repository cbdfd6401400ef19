//! `flowstep draws` (hidden): the random draws a `flowstep train` run with the same seed and
//! options makes, written to a safetensors file so that an independent reference loop
//! (export/tests/test_reference_loop.py) can replay them.

use std::path::PathBuf;
use std::process::ExitCode;

use flowstep::artifacts::Artifacts;
use flowstep::data::{DataOrder, Dataset, SampleSpec};
use flowstep::sft::SftSampler;
use flowstep::tensor_file::{OutTensor, SaveDtype, TensorFile, encode, write_atomic};

use super::{Globals, ModelArgs};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Dataset directory (as for train).
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,

    /// Output .safetensors: `sample` [N] (index into the sorted dataset files),
    /// `timestep_index` [N], `timestep` [N] (fed to the model), `sigma` [N], `weight` [N],
    /// `timestep_range` [2] (the half-open index range drawn from), `noise.{i}` (ε of
    /// micro-step i) and, for musubi's --timestep-sampling modes, `timestep_uniform` [N] (the
    /// uniform variate each timestep was computed from).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,

    /// Micro-steps (samples) to draw, from the start of training.
    #[arg(long, value_name = "N")]
    pub micro_steps: u64,

    /// Leave out the noise (distribution tests over many draws).
    #[arg(long)]
    pub timesteps_only: bool,

    /// The train options that change the draws (same meaning and defaults as there).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    #[command(flatten)]
    pub sft: super::SftArgs,
}

pub fn run(args: Args, _globals: &Globals) -> anyhow::Result<ExitCode> {
    let artifacts = Artifacts::open(&args.model.artifacts)?;
    let dataset = Dataset::open(&args.data, SampleSpec::for_model(&artifacts.manifest.model))?;
    let (config, _) = args.sft.config(&artifacts.manifest, &args.data, false)?;
    let sampler = SftSampler::new(config, args.seed)?;
    let order = DataOrder { seed: args.seed, len: dataset.len(), repeat: args.repeat };
    let n = args.micro_steps as usize;
    let (mut samples, mut indices, mut timesteps, mut tensors) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut sigmas, mut weights, mut uniforms) = (Vec::new(), Vec::new(), Vec::new());
    for counter in 0..args.micro_steps {
        let sample = order.sample(counter);
        let draw = sampler.draw_timestep(counter);
        samples.push(sample as f32);
        indices.push(draw.index as f32);
        timesteps.push(draw.timestep);
        sigmas.push(draw.sigma);
        weights.push(draw.weight);
        uniforms.push(sampler.timestep_variate(counter));
        if args.timesteps_only {
            continue;
        }
        let shape = TensorFile::open(&dataset.files[sample])?
            .info(flowstep::data::LATENTS)
            .map(|i| i.shape)
            .ok_or_else(|| anyhow::anyhow!("{}: no latents", dataset.files[sample].display()))?;
        let mut noise = vec![0.0f32; shape.iter().product()];
        sampler.fill_noise(counter, &mut noise);
        tensors.push(OutTensor { name: format!("noise.{counter}"), shape, values: noise });
    }
    tensors.push(OutTensor { name: "sample".into(), shape: vec![n], values: samples });
    tensors.push(OutTensor { name: "timestep_index".into(), shape: vec![n], values: indices });
    tensors.push(OutTensor { name: "timestep".into(), shape: vec![n], values: timesteps });
    tensors.push(OutTensor { name: "sigma".into(), shape: vec![n], values: sigmas });
    tensors.push(OutTensor { name: "weight".into(), shape: vec![n], values: weights });
    if sampler.config.sampling != flowstep::timesteps::TimestepSampling::Uniform {
        tensors.push(OutTensor { name: "timestep_uniform".into(), shape: vec![n], values: uniforms });
    }
    let (lo, hi) = sampler.index_range();
    tensors.push(OutTensor { name: "timestep_range".into(), shape: vec![2], values: vec![lo as f32, hi as f32] });
    write_atomic(&args.out, &encode(&tensors, SaveDtype::F32, None)?)?;
    Ok(ExitCode::SUCCESS)
}
