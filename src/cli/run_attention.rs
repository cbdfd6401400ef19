//! `flowstep run-attention` (hidden): runs a graph of flowstep's `com.flowstep` attention
//! operators (reference_ops.pair_model: FlashAttention, then FlashAttentionGrad on its o and lse)
//! on the CPU kernels, with float32 inputs read by name from a safetensors file, and writes every
//! output as float32. For export/tests/test_attention_sdpa.py, which compares the kernels with
//! PyTorch's SDPA forward and backward computed at run time.

use std::path::PathBuf;
use std::process::ExitCode;

use flowstep::runtime::{AttentionImpl, load_session};
use flowstep::tensor_file::{OutTensor, SaveDtype, TensorFile, encode, write_atomic};
use ort::value::Tensor;

use super::{DeviceArgs, Globals, init_runtime};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The ONNX graph (float32 inputs and outputs).
    #[arg(long, value_name = "FILE")]
    pub graph: PathBuf,
    /// Its inputs, by name.
    #[arg(long, value_name = "FILE")]
    pub inputs: PathBuf,
    /// Where the outputs go (.safetensors, float32).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(args: Args, globals: &Globals) -> anyhow::Result<ExitCode> {
    let options = flowstep::runtime::SessionOptions { attention: AttentionImpl::Fused, ..init_runtime(globals, &args.device)? };
    let mut session = load_session(&args.graph, &options)?;
    let file = TensorFile::open(&args.inputs)?;
    let mut inputs = Vec::new();
    for input in session.inputs().iter().map(|i| i.name().to_string()).collect::<Vec<_>>() {
        let (shape, values) = file.read_f32(&input)?;
        inputs.push((input, Tensor::from_array((shape, values))?.into_dyn()));
    }
    let outputs = session.run(inputs)?;
    let mut tensors = Vec::new();
    for (name, value) in outputs.iter() {
        let (shape, values) = value.try_extract_tensor::<f32>()?;
        tensors.push(OutTensor { name: name.to_string(), shape: shape.iter().map(|&d| d as usize).collect(), values: values.to_vec() });
    }
    write_atomic(&args.out, &encode(&tensors, SaveDtype::F32, None)?)?;
    Ok(ExitCode::SUCCESS)
}
