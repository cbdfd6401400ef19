//! One load sequence for the commands that run a single graph with a fixed LoRA (`eval`,
//! `sample`): LoRA file, device memory, base weights, graph, parameters on the device. The
//! LoRA applies at its own file's alpha (ComfyUI's W += up·down·alpha/rank), whatever alpha
//! the export's manifest names.

use std::path::{Path, PathBuf};

use ort::value::Tensor;

use super::{BaseWeights, DeviceMemory, LossGraph, VelocityGraph, load_base_weights};
use crate::artifacts::Artifacts;
use crate::error::Result;
use crate::lora_io;
use crate::runtime::SessionOptions;

/// A graph that runs on the base weights with LoRA parameters as an input.
pub trait LoraGraph: Sized {
    fn load(artifacts: &Artifacts, options: &SessionOptions, base: &BaseWeights, lora_scale: f32) -> Result<Self>;
}

impl LoraGraph for LossGraph {
    fn load(artifacts: &Artifacts, options: &SessionOptions, base: &BaseWeights, lora_scale: f32) -> Result<Self> {
        LossGraph::load(artifacts, options, base, lora_scale)
    }
}

impl LoraGraph for VelocityGraph {
    fn load(artifacts: &Artifacts, options: &SessionOptions, base: &BaseWeights, lora_scale: f32) -> Result<Self> {
        VelocityGraph::load(artifacts, options, base, lora_scale)
    }
}

/// A graph ready to run with one LoRA.
pub struct WithLora<G> {
    pub graph: G,
    /// The flat LoRA parameters, on the device.
    pub params: Tensor<f32>,
    /// The LoRA file the parameters came from (the export's initial LoRA when none was given).
    pub lora: PathBuf,
    /// The alpha the parameters apply at: the LoRA file's.
    pub alpha: f64,
    /// Kept with the graph: its binding refers to the base weights on this memory.
    pub memory: DeviceMemory,
    pub base: BaseWeights,
}

impl<G: LoraGraph> WithLora<G> {
    /// Reads the LoRA first (the cheapest thing to get wrong), then the base weights
    /// (`base`, or the shipped ones) and the graph.
    pub fn load(artifacts: &Artifacts, options: &SessionOptions, base: Option<&Path>, lora: Option<&Path>) -> Result<Self> {
        let lora = artifacts.lora_file(lora)?;
        let (flat, alpha) = lora_io::load_for(&lora, &artifacts.manifest, None)?;
        let memory = DeviceMemory::new(options.device);
        let base = load_base_weights(artifacts, base, &memory)?;
        let graph = G::load(artifacts, options, &base, artifacts.manifest.lora.with_alpha(alpha).scale())?;
        let params = memory.tensor(&[flat.len()], &flat)?;
        Ok(Self { graph, params, lora, alpha, memory, base })
    }
}
