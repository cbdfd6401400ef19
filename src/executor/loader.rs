//! One load sequence for the commands that run a single graph with a fixed LoRA (`eval`,
//! `sample`): LoRA file, device memory, base weights, graph, parameters on the device.

use std::path::{Path, PathBuf};

use ort::value::Tensor;

use super::{BaseWeights, DeviceMemory, LossGraph, VelocityGraph, load_base_weights};
use crate::artifacts::Artifacts;
use crate::error::Result;
use crate::lora_io;
use crate::runtime::SessionOptions;

/// A graph that runs on the base weights with LoRA parameters as an input.
pub trait LoraGraph: Sized {
    fn load(artifacts: &Artifacts, options: &SessionOptions, base: &BaseWeights) -> Result<Self>;
}

impl LoraGraph for LossGraph {
    fn load(artifacts: &Artifacts, options: &SessionOptions, base: &BaseWeights) -> Result<Self> {
        LossGraph::load(artifacts, options, base)
    }
}

impl LoraGraph for VelocityGraph {
    fn load(artifacts: &Artifacts, options: &SessionOptions, base: &BaseWeights) -> Result<Self> {
        VelocityGraph::load(artifacts, options, base)
    }
}

/// A graph ready to run with one LoRA.
pub struct WithLora<G> {
    pub graph: G,
    /// The flat LoRA parameters, on the device.
    pub params: Tensor<f32>,
    /// The LoRA file the parameters came from (the export's initial LoRA when none was given).
    pub lora: PathBuf,
    /// Kept with the graph: its binding refers to the base weights on this memory.
    pub memory: DeviceMemory,
    pub base: BaseWeights,
}

impl<G: LoraGraph> WithLora<G> {
    /// Reads the LoRA first (the cheapest thing to get wrong), then the base weights
    /// (`base`, or the shipped ones) and the graph.
    pub fn load(artifacts: &Artifacts, options: &SessionOptions, base: Option<&Path>, lora: Option<&Path>) -> Result<Self> {
        let lora = artifacts.lora_file(lora)?;
        let flat = lora_io::load_for(&lora, &artifacts.manifest)?;
        let memory = DeviceMemory::new(options.device);
        let base = load_base_weights(artifacts, base, &memory)?;
        let graph = G::load(artifacts, options, &base)?;
        let params = memory.tensor(&[flat.len()], &flat)?;
        Ok(Self { graph, params, lora, memory, base })
    }
}
