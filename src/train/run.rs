//! What a checkpoint records about its run, and the check that a resume continues that
//! same run: the fields that fix the data, noise and graphs must match; hyperparameters may
//! change only when the user says so, and the change is then reported and recorded.

use std::path::Path;

use serde_json::{Value, json};

use super::TrainConfig;
use crate::artifacts::{Artifacts, OPTIMIZER, TRAINING};
use crate::error::{Error, Result};
use crate::optim::LrSchedule;
use crate::timesteps::{LossWeighting, TimestepSampling};

/// The run as stored in `trainer.json` (`run`): `identity` never changes across resumes,
/// `hyperparameters` only with `--allow-changed-hyperparameters`. Keys are flag names;
/// `grad-accum` is the samples per step, `--grad-accum` × ranks, which a resume may split
/// over another number of ranks (`world-size`, recorded when more than one).
/// `models`: the run's exports (a pair's experts high noise first).
pub(super) fn describe(config: &TrainConfig, world_size: usize, models: &[&Artifacts], dataset_len: usize, total_steps: u64) -> Result<Value> {
    let sha = |artifacts: &Artifacts, graph: &str| artifacts.graph(graph).ok().and_then(|g| artifacts.manifest.files.get(&g.file).cloned()).unwrap_or_default();
    let graphs: Vec<String> = models.iter().map(|a| format!("{}+{}", sha(a, TRAINING), sha(a, OPTIMIZER))).collect();
    let sft = &config.sft;
    let mut hyper = json!({
        "lr": config.lr,
        "lr-schedule": config.schedule.to_string(),
        "beta1": config.adamw.beta1,
        "beta2": config.adamw.beta2,
        "eps": config.adamw.eps,
        "weight-decay": config.adamw.weight_decay,
    });
    // Recorded only when on, so that checkpoints from before the option resume unchanged.
    if let Some(max) = config.max_grad_norm {
        hyper["max-grad-norm"] = json!(max);
    }
    // A cosine schedule is stretched over the whole run: its length is a hyperparameter.
    if matches!(config.schedule, LrSchedule::Cosine { .. }) {
        hyper["steps"] = json!(total_steps);
    }
    let mut run = json!({
        "identity": {
            "artifacts": graphs.join(","),
            // The scale the parameters were trained at: another one changes what they compute.
            "lora-alpha": models.first().map(|a| config.lora(&a.manifest).alpha),
            "seed": config.seed,
            "grad-accum": config.grad_accum * world_size,
            "repeat": config.repeat,
            "dataset size": dataset_len,
            "shift": sft.shift,
            "min-timestep-boundary": sft.min_boundary,
            "max-timestep-boundary": sft.max_boundary,
            "noise-scale": sft.noise_scale,
            "bf16-timestep": sft.bf16_timestep,
        },
        "hyperparameters": hyper,
    });
    // Recorded only for a pair job, so that single-model checkpoints resume unchanged.
    if let Some(every) = config.pair.as_ref().and_then(|p| p.switch_every) {
        run["identity"]["switch-expert-every"] = json!(every);
    }
    // Recorded only off DiffSynth's default, so that checkpoints from before these options resume.
    if sft.sampling != TimestepSampling::Uniform || sft.loss_weighting != LossWeighting::Diffsynth {
        run["identity"]["timestep-sampling"] = json!(sft.sampling.to_string());
        run["identity"]["loss-weighting"] = json!(sft.loss_weighting);
    }
    if world_size > 1 {
        run["world-size"] = json!(world_size);
    }
    // Through text and back, so floats compare as a checkpoint's parsed values do.
    serde_json::from_str(&run.to_string()).map_err(|e| Error::Config(e.to_string()))
}

/// "--KEY old → new" for every key whose value differs.
fn differences(saved: &Value, now: &Value) -> Vec<String> {
    let empty = serde_json::Map::new();
    let (a, b) = (saved.as_object().unwrap_or(&empty), now.as_object().unwrap_or(&empty));
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let show = |v: Option<&Value>| v.map_or("(none)".to_string(), |v| v.as_str().map_or_else(|| v.to_string(), str::to_string));
    keys.into_iter().filter(|k| a.get(*k) != b.get(*k)).map(|k| format!("--{k} {} → {}", show(a.get(k)), show(b.get(k)))).collect()
}

/// Checks that the run `now` may continue the checkpoint in `dir` (at `step`, run `saved`).
/// Returns the hyperparameter changes that `allow_changes` let through.
pub(super) fn check_resume(dir: &Path, step: u64, saved: &Value, now: &Value, total_steps: u64, allow_changes: bool) -> Result<Vec<String>> {
    let refuse = |reason: String| Error::Checkpoint { path: dir.to_path_buf(), reason };
    if total_steps < step {
        return Err(refuse(format!("is at step {step}, past --steps {total_steps}; a resume cannot go back")));
    }
    let ranks = |run: &Value| run["world-size"].as_u64().unwrap_or(1);
    let (saved_ranks, ranks_now) = (ranks(saved), ranks(now));
    let per_step = |run: &Value| run["identity"]["grad-accum"].as_u64().unwrap_or(0);
    if saved_ranks != ranks_now && per_step(saved) != per_step(now) {
        let samples = per_step(saved);
        let fix = if samples % ranks_now == 0 {
            format!("--grad-accum {} with {ranks_now} ranks continues it exactly", samples / ranks_now)
        } else {
            format!("{samples} is not a multiple of {ranks_now} ranks; resume it with a number of ranks that divides it")
        };
        return Err(refuse(format!("was trained with {samples} samples per step ({saved_ranks} rank(s) × --grad-accum {}); {fix}", samples / saved_ranks.max(1))));
    }
    let identity = differences(&saved["identity"], &now["identity"]);
    if !identity.is_empty() {
        return Err(refuse(format!("belongs to a different run ({}); resume it with its own settings, or choose another --out", identity.join(", "))));
    }
    let hyper = differences(&saved["hyperparameters"], &now["hyperparameters"]);
    if !hyper.is_empty() && !allow_changes {
        return Err(refuse(format!(
            "was trained with other hyperparameters ({}); pass --allow-changed-hyperparameters to continue with the new ones",
            hyper.join(", ")
        )));
    }
    Ok(hyper)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_name_each_changed_key() {
        let a = json!({"lr": 0.002, "beta1": 0.9, "lr-schedule": "constant"});
        let b = json!({"lr": 0.001, "beta1": 0.9, "lr-schedule": "cosine:0:0", "steps": 10});
        assert_eq!(differences(&a, &b), ["--lr 0.002 → 0.001", "--lr-schedule constant → cosine:0:0", "--steps (none) → 10"]);
        assert!(differences(&a, &a).is_empty());
    }
}
