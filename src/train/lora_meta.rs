//! The metadata of the LoRA files a run writes (`OUT/loras/`, the final LoRA, and
//! `flowstep export-lora` from a checkpoint): the keys ComfyUI, Civitai and kohya-based
//! tools read, named and formatted as musubi-tuner writes them for Wan (kohya's `ss_*`,
//! Stability's `modelspec.*`), and flowstep's own `flowstep.*`.

use std::collections::BTreeMap;

use crate::artifacts::Manifest;
use crate::lora_io;
use crate::data::Bucket;
use crate::sft::SftConfig;

use super::TrainConfig;

/// musubi-tuner's values for Wan LoRAs (`ARCHITECTURE_WAN_FULL`, `networks.lora_wan`,
/// `sai_model_spec.ARCH_WAN` + `/lora`, `IMPL_WAN`).
const BASE_MODEL_VERSION: &str = "wan";
const NETWORK_MODULE: &str = "networks.lora_wan";
const MODELSPEC_ARCHITECTURE: &str = "wan2.1/lora";
const MODELSPEC_IMPLEMENTATION: &str = "https://github.com/Wan-Video/Wan2.1";

/// Pixels per latent pixel of Wan's VAEs (by latent channels: Wan2.1's VAE, 16, compresses
/// 8×; Wan2.2's TI2V VAE, 48, 16×); both compress time 4× after the first frame.
fn pixels_per_latent(latent_channels: usize) -> Option<usize> {
    match latent_channels {
        16 => Some(8),
        48 => Some(16),
        _ => None,
    }
}

/// A bucket's video size: (width, height, frames).
fn video_size(bucket: &Bucket, scale: usize) -> (usize, usize, usize) {
    let s = &bucket.latent_shape;
    (s[3] * scale, s[2] * scale, (s[1] - 1) * 4 + 1)
}

/// What a run's LoRA files share; [`RunMetadata::at_step`] adds the per-save keys.
pub(super) struct RunMetadata {
    keys: BTreeMap<String, String>,
}

/// The run facts the metadata records besides the configuration.
pub(super) struct RunFacts<'a> {
    pub manifest: &'a Manifest,
    /// sha256 of the export's manifest.json, which pins every file of the export.
    pub export_sha256: String,
    pub output_name: &'a str,
    pub buckets: &'a [Bucket],
    pub dataset_len: usize,
    pub total_steps: u64,
    pub sft: &'a SftConfig,
    /// Unix time this process started training.
    pub started_at: f64,
}

impl RunMetadata {
    pub fn new(config: &TrainConfig, facts: &RunFacts<'_>) -> Self {
        let m = facts.manifest;
        let mut keys = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            keys.insert(k.to_string(), v);
        };
        put("ss_base_model_version", BASE_MODEL_VERSION.into());
        put("ss_sd_model_name", m.model.name.clone());
        put("ss_network_module", NETWORK_MODULE.into());
        put("ss_network_dim", m.lora.rank.to_string());
        put("ss_network_alpha", config.lora(m).alpha.to_string());
        put("ss_output_name", facts.output_name.into());
        put("ss_training_started_at", facts.started_at.to_string());
        put("ss_learning_rate", config.lr.to_string());
        put("ss_lr_scheduler", config.schedule.to_string());
        let a = &config.adamw;
        put("ss_optimizer", format!("AdamW(betas=({}, {}),eps={},weight_decay={})", a.beta1, a.beta2, a.eps, a.weight_decay));
        put("ss_gradient_accumulation_steps", config.grad_accum.to_string());
        put("ss_max_train_steps", facts.total_steps.to_string());
        put("ss_num_train_items", (facts.dataset_len * config.repeat).to_string());
        put("ss_seed", config.seed.to_string());
        put("ss_discrete_flow_shift", facts.sft.shift.to_string());
        put("modelspec.sai_model_spec", "1.0.0".into());
        put("modelspec.architecture", MODELSPEC_ARCHITECTURE.into());
        put("modelspec.implementation", MODELSPEC_IMPLEMENTATION.into());
        put("modelspec.title", facts.output_name.into());
        if let Some(scale) = pixels_per_latent(m.model.latent_channels()) {
            // Buckets come largest first: the largest is the run's resolution.
            if let Some((w, h, _)) = facts.buckets.first().map(|b| video_size(b, scale)) {
                put("ss_resolution", format!("{w},{h}"));
                put("modelspec.resolution", format!("{w}x{h}"));
            }
            let buckets: serde_json::Map<String, serde_json::Value> = facts
                .buckets
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    let (w, h, frames) = video_size(b, scale);
                    (i.to_string(), serde_json::json!({"resolution": [w, h], "frames": frames, "count": b.samples}))
                })
                .collect();
            put("ss_bucket_info", serde_json::json!({ "buckets": buckets }).to_string());
        }
        let latent: Vec<String> = facts.buckets.iter().map(|b| format!("{}×{}", b.samples, b.latent_shape.iter().map(usize::to_string).collect::<Vec<_>>().join("×"))).collect();
        put("flowstep.latent_buckets", latent.join(", "));
        put(lora_io::BASE_MODEL, m.model.name.clone());
        put("flowstep.export_sha256", facts.export_sha256.clone());
        put("flowstep.seed", config.seed.to_string());
        if let Some(e) = &m.expert {
            put(lora_io::EXPERT, e.role.as_str().to_string());
            put("flowstep.timestep_boundaries", format!("[{}, {})", facts.sft.min_boundary, facts.sft.max_boundary));
        }
        Self { keys }
    }

    /// The metadata of a LoRA saved after `step` optimizer steps, in `epoch` (1-based).
    pub fn at_step(&self, step: u64, epoch: u64) -> BTreeMap<String, String> {
        let mut keys = self.keys.clone();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        keys.insert("ss_steps".into(), step.to_string());
        keys.insert("ss_epoch".into(), epoch.to_string());
        keys.insert("ss_training_finished_at".into(), now.to_string());
        keys.insert("flowstep.steps".into(), step.to_string());
        keys
    }
}
