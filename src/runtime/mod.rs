//! ONNX Runtime set-up: finding and loading the shared library once per process, and
//! building sessions on the requested execution provider.

#[cfg(feature = "cuda-attention")]
pub mod cuda_attention;
mod device;
pub mod fused_attention;
mod fused_pointwise;
mod library;
mod placement;
mod simd;

pub use device::{CudaOptions, Device};
pub use fused_attention::AttentionImpl;
pub use placement::{NodePlacement, arena_peak_bytes, cpu_nodes};
pub use library::{OrtLibrary, environment, init, locate_library};

use std::path::Path;

use ort::session::{Session, builder::GraphOptimizationLevel};

use crate::error::{Error, Result};

/// Session options shared by every graph flowstep runs.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub device: Device,
    /// Intra-op threads; `None` lets ONNX Runtime use every physical core. The pool itself is
    /// the process's, made by [`init`] with the same count; this sizes the fused kernels' tasks.
    pub threads: Option<usize>,
    /// Write an ONNX Runtime profile (JSON) with this prefix.
    pub profile: Option<std::path::PathBuf>,
    /// CUDA / TensorRT provider settings.
    pub cuda: CudaOptions,
    /// Let nodes without a kernel on the GPU provider run on the CPU instead of failing.
    pub allow_cpu_fallback: bool,
    /// ONNX Runtime graph optimizers to turn off, from the manifest: CSE would merge a graph's
    /// recomputation with its forward (docs/DESIGN.md §6a).
    pub disabled_optimizers: Vec<String>,
    /// From the manifest: fused graphs need flowstep's `com.flowstep` operators registered.
    pub attention: AttentionImpl,
}

impl SessionOptions {
    pub fn cpu() -> Self {
        Self {
            device: Device::Cpu,
            threads: None,
            profile: None,
            cuda: CudaOptions::default(),
            allow_cpu_fallback: false,
            disabled_optimizers: Vec::new(),
            attention: AttentionImpl::Chunked,
        }
    }

    /// These options with the optimizers that `manifest` says must stay off and the attention
    /// operators it needs; an error if the graphs' precision or fused attention has no kernels
    /// on this device. Cheap: call it before any work to refuse early.
    pub fn for_artifacts(&self, manifest: &crate::artifacts::Manifest) -> Result<Self> {
        if manifest.training.precision != "float32" && !self.device.is_gpu() {
            return Err(Error::Device(format!(
                "these artifacts compute in {} ({}), which ONNX Runtime's CPU provider has no kernels for: use --device cuda, or export with --precision float32 for the CPU",
                manifest.training.precision, manifest.model.name
            )));
        }
        let attention = AttentionImpl::from_manifest(&manifest.training.attention)
            .map_err(|reason| Error::Config(format!("{} artifacts: {reason}", manifest.model.name)))?;
        if attention == AttentionImpl::Fused {
            fused_attention::check_device(self.device, &manifest.training.precision)?;
        }
        for name in &manifest.training.operators {
            check_operator(name, attention, self.device).map_err(|reason| match self.device {
                Device::Cpu => Error::Config(format!("{} artifacts: {reason}", manifest.model.name)),
                _ => Error::Device(format!("{} artifacts: {reason}", manifest.model.name)),
            })?;
        }
        Ok(Self { disabled_optimizers: manifest.training.onnxruntime_disabled_optimizers.clone(), attention, ..self.clone() })
    }
}

/// Whether this flowstep runs the `com.flowstep` operator `name` (from the manifest's
/// `training.operators`) on `device`: the attention pair wherever [`fused_attention::check_device`]
/// allows, the pointwise ones ([`fused_pointwise::OPERATORS`]) on the CPU only (float32 exports:
/// the exporter keeps them nowhere else).
fn check_operator(name: &str, attention: AttentionImpl, device: Device) -> std::result::Result<(), String> {
    let op = format!("{}::{name}", fused_attention::DOMAIN);
    match name {
        fused_attention::FORWARD | fused_attention::BACKWARD => Ok(()),
        _ if attention != AttentionImpl::Fused => Err(format!("training.operators lists {op}, but training.attention is not fused")),
        _ if fused_pointwise::OPERATORS.contains(&name) && device == Device::Cpu => Ok(()),
        _ if fused_pointwise::OPERATORS.contains(&name) => {
            Err(format!("the graphs use {op}, which flowstep implements for cpu only, not {device}: use --device cpu, or re-export with --attention chunked"))
        }
        _ => Err(format!("the graphs use {op}, which this flowstep does not implement (a newer exporter's artifacts?)")),
    }
}

/// Loads one ONNX graph on the configured provider; a provider that fails to register
/// is an error, never a silent fall back to CPU, and on a GPU provider so is a compute node
/// that lands on the CPU (unless `allow_cpu_fallback`).
pub fn load_session(model: &Path, options: &SessionOptions) -> Result<Session> {
    load_graph(GraphSource::File(model), options)
}

/// A graph flowstep carries in its binary (`assets/`), loaded like an exported one.
pub fn load_embedded_session(name: &'static str, bytes: &'static [u8], options: &SessionOptions) -> Result<Session> {
    load_graph(GraphSource::Embedded { name, bytes }, options)
}

/// Where a graph comes from; `Display` names it in errors.
#[derive(Clone, Copy)]
enum GraphSource<'a> {
    File(&'a Path),
    Embedded { name: &'static str, bytes: &'static [u8] },
}

impl std::fmt::Display for GraphSource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GraphSource::File(path) => write!(f, "{}", path.display()),
            GraphSource::Embedded { name, .. } => write!(f, "flowstep's built-in {name}"),
        }
    }
}

fn load_graph(model: GraphSource<'_>, options: &SessionOptions) -> Result<Session> {
    let session = build_session(model, options)?;
    if options.device.is_gpu() && !options.allow_cpu_fallback {
        let compute: Vec<String> = cpu_nodes(&session)?.into_iter().filter(|n| !n.is_shape_arithmetic()).map(|n| n.to_string()).collect();
        if !compute.is_empty() {
            return Err(Error::Device(format!(
                "{} has {} compute node(s) that {} cannot run, which ONNX Runtime would put on the CPU: {}{} \
                 (re-export for this provider, or pass --allow-cpu-fallback to run them on the CPU anyway)",
                model,
                compute.len(),
                options.device,
                compute.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
                if compute.len() > 5 { ", ..." } else { "" }
            )));
        }
    }
    Ok(session)
}

fn build_session(model: GraphSource<'_>, options: &SessionOptions) -> Result<Session> {
    let during = format!("loading {model}");
    let mut builder = Session::builder(environment()?)
        .map_err(Error::ort(during.clone()))?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(|e| Error::Ort { during: during.clone(), source: ort::Error::<()>::from(e) })?
        // The memory-pattern plan preallocates one block for the whole training graph's
        // activations: off, peak RSS on the small config drops 885 -> 510 MB at equal speed.
        .with_memory_pattern(false)
        .map_err(|e| Error::Ort { during: during.clone(), source: ort::Error::<()>::from(e) })?;
    if let Some(profile) = &options.profile {
        builder = builder
            .with_profiling(profile)
            .map_err(|e| Error::Ort { during: during.clone(), source: ort::Error::<()>::from(e) })?;
    }
    let config = |builder: ort::session::builder::SessionBuilder, key: &str, value: &str| {
        builder.with_config_entry(key, value).map_err(|e| Error::Ort { during: format!("{during}: setting {key}"), source: ort::Error::<()>::from(e) })
    };
    if !options.disabled_optimizers.is_empty() {
        // Names separated by ';' (a ',' list silently disables nothing, docs/DESIGN.md §6a).
        builder = config(builder, "optimization.disable_specified_optimizers", &options.disabled_optimizers.join(";"))?;
    }
    if options.device.is_gpu() {
        builder = config(builder, "session.record_ep_graph_assignment_info", "1")?;
    }
    if options.attention == AttentionImpl::Fused {
        let domain = fused_attention::domain_for(options.device, options.threads)?;
        builder = builder.with_operators(domain).map_err(|e| Error::Ort {
            during: format!("{during}: registering {}", fused_attention::DOMAIN),
            source: ort::Error::<()>::from(e),
        })?;
    }
    if let Some(provider) = options.device.execution_provider(&options.cuda) {
        builder = builder.with_execution_providers([provider]).map_err(|e| {
            let message = ort::Error::<()>::from(e).to_string().split_whitespace().collect::<Vec<_>>().join(" ");
            let hint = if message.contains("Failed to load library") {
                "the provider library is there but its CUDA 13 / cuDNN 9 dependencies are not: add their directories to LD_LIBRARY_PATH"
            } else {
                "GPU providers need the onnxruntime-gpu library: scripts/setup_ort.sh --gpu, then --ort-lib .ort/gpu/libonnxruntime.so"
            };
            Error::Device(format!("cannot use {} for {model}: {message} ({hint})", options.device))
        })?;
    }
    match model {
        GraphSource::File(path) => builder.commit_from_file(path).map_err(|e| Error::Manifest {
            path: path.to_path_buf(),
            reason: format!("ONNX Runtime cannot load this graph: {e}"),
        }),
        GraphSource::Embedded { bytes, .. } => builder.commit_from_memory(bytes).map_err(Error::ort(during)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_operators_are_checked_per_device() {
        use AttentionImpl::{Chunked, Fused};
        for name in [fused_attention::FORWARD, fused_attention::BACKWARD].into_iter().chain(fused_pointwise::OPERATORS) {
            assert_eq!(check_operator(name, Fused, Device::Cpu), Ok(()), "{name}");
        }
        let gelu_on_cuda = check_operator(fused_pointwise::GELU_GRAD, Fused, Device::Cuda(0)).unwrap_err();
        assert!(gelu_on_cuda.contains("com.flowstep::GeluTanhGrad") && gelu_on_cuda.contains("cuda:0"), "{gelu_on_cuda}");
        assert!(check_operator(fused_pointwise::RMS_NORM, Chunked, Device::Cpu).unwrap_err().contains("not fused"));
        assert!(check_operator("RingAttention", Fused, Device::Cpu).unwrap_err().contains("com.flowstep::RingAttention"));
    }
}
