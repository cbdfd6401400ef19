//! The training loop: composes the dataset, the SFT sampler, the device-resident graphs,
//! checkpoints and observers. It only steps; everything it reports goes out as events.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use fs2::FileExt;
use serde::Serialize;

use crate::artifacts::Artifacts;
use crate::checkpoint::{self, CheckpointState, TrainerState};
use crate::data::{DataOrder, Dataset, SampleSpec};
use crate::error::{Error, IoContext, Result};
use crate::eval::{EvalConfig, evaluate};
use crate::executor::{AdamW, Batch, LossGraph, TrainingGraphs, load_base_weights};
use crate::lora_io::{self, LoraFormat};
use crate::metrics::{JsonlWriter, Observer, Recorder, StepRecord, TrainEvent};
use crate::optim::LrSchedule;
use crate::runtime::SessionOptions;
use crate::sft::{SftConfig, SftSampler};
use crate::tensor_file::SaveDtype;

/// What to do when a loss or gradient norm is NaN or infinite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, serde::Deserialize)]
pub enum NonFinitePolicy {
    /// Stop with an error; the last checkpoint stays as it was.
    Stop,
    /// Discard that step's update, count it, and go on.
    Skip,
}

/// How long to train.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Length {
    Steps(u64),
    Epochs(u64),
}

#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub artifacts: PathBuf,
    pub data: PathBuf,
    pub out: PathBuf,
    pub base: Option<PathBuf>,
    pub init_lora: Option<PathBuf>,
    pub length: Length,
    pub seed: u64,
    pub lr: f64,
    pub schedule: LrSchedule,
    pub adamw: AdamW,
    pub grad_accum: usize,
    pub repeat: usize,
    pub sft: SftConfig,
    pub save_every: Option<u64>,
    pub keep_checkpoints: usize,
    pub resume: bool,
    pub eval_data: Option<PathBuf>,
    pub eval_every: Option<u64>,
    pub eval: EvalConfig,
    pub session: SessionOptions,
    pub lora_format: LoraFormat,
    pub lora_dtype: SaveDtype,
    pub on_nonfinite: NonFinitePolicy,
    pub skip_bad_samples: bool,
    /// Stop after this many optimizer steps of this process (tests of resume).
    pub stop_after: Option<u64>,
}

/// What a finished (or interrupted) run did.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub start_step: u64,
    pub steps: u64,
    pub total_steps: u64,
    pub interrupted: bool,
    pub first_loss: Option<f64>,
    pub final_loss: Option<f64>,
    pub eval_before: Option<f64>,
    pub eval_after: Option<f64>,
    pub skipped_steps: u64,
    pub skipped_samples: u64,
    pub seconds: f64,
    pub seconds_per_step: f64,
    /// Host-side share of step time: data, SFT inputs, binding, reading the loss.
    pub host_fraction: f64,
    pub lora: Option<PathBuf>,
    pub checkpoint: Option<PathBuf>,
    pub metrics: PathBuf,
    pub plot: Option<PathBuf>,
}

/// The fields a checkpoint must share with the run that resumes it.
#[derive(Debug, Clone, Serialize, PartialEq)]
struct RunIdentity {
    training_model_sha256: String,
    seed: u64,
    grad_accum: usize,
    repeat: usize,
    dataset_len: usize,
    sft: String,
}

/// Holds `OUT/.lock` for the life of the run: a second trainer on the same directory fails.
struct OutLock(#[allow(dead_code)] File);

fn lock_out(out: &Path) -> Result<OutLock> {
    std::fs::create_dir_all(out).at(out)?;
    let path = out.join(".lock");
    let file = File::create(&path).at(&path)?;
    file.try_lock_exclusive().map_err(|_| {
        Error::Config(format!("{} is in use by another flowstep train (lock {}); wait for it or choose another --out", out.display(), path.display()))
    })?;
    Ok(OutLock(file))
}

pub fn train(config: &TrainConfig, observers: &mut [&mut dyn Observer], interrupt: &AtomicBool) -> Result<TrainSummary> {
    let started = Instant::now();
    if config.grad_accum == 0 || config.repeat == 0 {
        return Err(Error::Config("--grad-accum and --repeat must be at least 1".into()));
    }
    if !(config.lr.is_finite() && config.lr > 0.0) {
        return Err(Error::Config(format!("--lr must be a positive number, got {}", config.lr)));
    }
    let _lock = lock_out(&config.out)?;
    let artifacts = Artifacts::open(&config.artifacts)?;
    let manifest = &artifacts.manifest;
    let spec = SampleSpec::for_model(&manifest.model);
    let dataset = Dataset::open(&config.data, spec.clone())?;
    let eval_set = config.eval_data.as_deref().map(|d| Dataset::open(d, spec.clone())).transpose()?;
    let sampler = SftSampler::new(SftConfig { shift: config.sft.shift, ..config.sft.clone() }, config.seed)?;
    let order = DataOrder { seed: config.seed, len: dataset.len(), repeat: config.repeat };
    let total_steps = match config.length {
        Length::Steps(n) => n,
        // Samples flow across epoch boundaries (a step may span two), so E passes are
        // ⌈E·len·repeat / K⌉ steps: every sample of every pass, at most K-1 more.
        Length::Epochs(e) => (e * order.epoch_len() as u64).div_ceil(config.grad_accum as u64),
    };
    if total_steps == 0 {
        return Err(Error::Config("nothing to do: --steps/--epochs gives 0 steps".into()));
    }
    let identity = RunIdentity {
        training_model_sha256: manifest.files.get("training_model.onnx").cloned().unwrap_or_default(),
        seed: config.seed,
        grad_accum: config.grad_accum,
        repeat: config.repeat,
        dataset_len: dataset.len(),
        sft: format!("{:?}", config.sft),
    };
    let identity_json = serde_json::to_value(&identity).map_err(|e| Error::Config(e.to_string()))?;

    // Start or resume.
    checkpoint::clean_partial(&config.out)?;
    let existing = checkpoint::list(&config.out)?;
    if !config.resume && !existing.is_empty() {
        return Err(Error::Config(format!(
            "{} already has checkpoints (newest step {}); pass --resume to continue that run, or choose another --out",
            config.out.display(),
            existing.last().map_or(0, |(s, _)| *s)
        )));
    }
    let base_path = config.base.clone();
    let a = artifacts.clone();
    let (mut graphs, base) = TrainingGraphs::load(&artifacts, &config.session, |m| load_base_weights(&a, base_path.as_deref(), m))?;
    let mut eval_graph = match &eval_set {
        Some(_) => Some(LossGraph::load(&artifacts, &config.session, &base)?),
        None => None,
    };
    let p = artifacts.num_params();
    let mut trainer = TrainerState { step: 0, micro_steps: 0, skipped_steps: 0, skipped_samples: 0, run: identity_json.clone() };
    let resumed_from = existing.last().filter(|_| config.resume).map(|(_, dir)| dir.clone());
    match &resumed_from {
        Some(dir) => {
            let (state, tensors) = checkpoint::load(dir, p)?;
            if state.run != identity_json {
                return Err(Error::Checkpoint {
                    path: dir.clone(),
                    reason: format!("was written by a different run (artifacts, seed, --grad-accum, --repeat, dataset size or SFT options differ): {} vs now {}", state.run, identity_json),
                });
            }
            graphs.set_state(&tensors.params, &tensors.m, &tensors.v)?;
            trainer = state;
        }
        None => {
            let init = lora_io::load(&artifacts.lora_file(config.init_lora.as_deref()), &manifest.lora)?;
            let zeros = vec![0.0; p];
            graphs.set_state(&init, &zeros, &zeros)?;
        }
    }
    let start_step = trainer.step;
    let metrics_path = config.out.join("metrics.jsonl");
    let mut jsonl = JsonlWriter::open(&metrics_path, start_step)?;
    let mut recorder = Recorder::default();
    let mut emit = |event: TrainEvent<'_>, jsonl: &mut JsonlWriter, recorder: &mut Recorder| -> Result<()> {
        jsonl.on_event(&event)?;
        recorder.on_event(&event)?;
        for o in observers.iter_mut() {
            o.on_event(&event)?;
        }
        Ok(())
    };
    emit(TrainEvent::Started { start_step, total_steps, resumed_from: resumed_from.as_deref() }, &mut jsonl, &mut recorder)?;

    let mut eval_before = None;
    if let (Some(set), Some(g)) = (&eval_set, eval_graph.as_mut())
        && start_step == 0
    {
        let r = evaluate(g, graphs.params(), set, &sampler, &config.eval)?;
        eval_before = Some(r.eval_loss);
        emit(TrainEvent::Evaluated { step: 0, loss: r.eval_loss }, &mut jsonl, &mut recorder)?;
    }

    let mut eval_after = None;
    let mut batch: Option<Batch> = None;
    let mut host_seconds = 0.0;
    let mut step_seconds = 0.0;
    let mut interrupted = false;
    let mut last_checkpoint: Option<PathBuf> = None;
    let save = |trainer: &TrainerState, graphs: &TrainingGraphs| -> Result<PathBuf> {
        let (params, m, v) = graphs.state()?;
        if let Some(i) = params.iter().position(|x| !x.is_finite()) {
            return Err(Error::NonFinite { step: trainer.step, what: "parameter", value: params[i] as f64 });
        }
        checkpoint::save(&config.out, trainer, &CheckpointState { params, m, v })
    };

    while trainer.step < total_steps {
        if interrupt.load(Ordering::SeqCst) || config.stop_after.is_some_and(|n| trainer.step - start_step >= n) {
            interrupted = interrupt.load(Ordering::SeqCst);
            break;
        }
        let step_start = Instant::now();
        let lr = config.schedule.lr(config.lr, trainer.step, total_steps);
        let (mut loss_sum, mut first) = (0.0f64, None);
        let mut finite = true;
        let mut graph_time = 0.0;
        let mut micro = 0;
        while micro < config.grad_accum {
            let counter = trainer.micro_steps;
            trainer.micro_steps += 1;
            let sample = match dataset.load(order.sample(counter)) {
                Ok(s) => s,
                Err(Error::Data { path, reason }) if config.skip_bad_samples && reason.contains("non-finite") => {
                    trainer.skipped_samples += 1;
                    emit(TrainEvent::Message(format!("skipping {}: {reason}", path.display())), &mut jsonl, &mut recorder)?;
                    if trainer.skipped_samples > 10 * dataset.len() as u64 {
                        return Err(Error::Data { path: config.data.clone(), reason: "every sample is being skipped as non-finite".into() });
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            let reuse = batch.as_ref().is_some_and(|b| b.latent_shape() == sample.latent_shape && b.context_shape() == sample.context_shape);
            if !reuse {
                batch = Some(Batch::new(&sample.latent_shape, &sample.context_shape)?);
            }
            let Some(b) = batch.as_mut() else { continue };
            b.context.extract_tensor_mut().1.copy_from_slice(&sample.context);
            let draw = b.prepare(|x_t, target| sampler.prepare_into(counter, &sample.latents, x_t, target))?;
            b.set_scalars(draw.timestep, draw.weight);
            let t = Instant::now();
            let loss = graphs.accumulate(b)?;
            graph_time += t.elapsed().as_secs_f64();
            first.get_or_insert(draw);
            finite &= loss.is_finite();
            loss_sum += loss as f64;
            micro += 1;
        }
        let loss = loss_sum / config.grad_accum as f64;
        let outcome = if finite {
            let t = Instant::now();
            let optimizer_step = trainer.step - trainer.skipped_steps + 1;
            let o = graphs.apply(optimizer_step, lr, &config.adamw)?;
            graph_time += t.elapsed().as_secs_f64();
            Some(o)
        } else {
            graphs.discard_gradient();
            None
        };
        let applied = outcome.is_some_and(|o| o.applied);
        let grad_norm = outcome.map_or(f32::NAN, |o| o.grad_norm);
        if !applied {
            match config.on_nonfinite {
                NonFinitePolicy::Stop => {
                    let (what, value) = if finite { ("gradient norm", grad_norm as f64) } else { ("loss", loss) };
                    return Err(Error::NonFinite { step: trainer.step + 1, what, value });
                }
                NonFinitePolicy::Skip => trainer.skipped_steps += 1,
            }
        }
        trainer.step += 1;
        let seconds = step_start.elapsed().as_secs_f64();
        step_seconds += seconds;
        host_seconds += seconds - graph_time;
        let draw = first.unwrap_or(crate::sft::TimestepDraw { index: 0, timestep: f32::NAN, sigma: f32::NAN, weight: f32::NAN });
        let record = StepRecord {
            step: trainer.step,
            epoch: order.epoch_of(trainer.micro_steps.saturating_sub(1)),
            loss,
            timestep: draw.timestep,
            weight: draw.weight,
            lr,
            grad_norm,
            applied,
            seconds,
            eval_loss: None,
        };
        let periodic = config.eval_every.is_some_and(|n| n > 0 && trainer.step.is_multiple_of(n));
        if let (Some(set), Some(g)) = (&eval_set, eval_graph.as_mut())
            && (periodic || trainer.step == total_steps)
        {
            // The final evaluation too, so it lands on the last metrics line.
            let r = evaluate(g, graphs.params(), set, &sampler, &config.eval)?;
            if trainer.step == total_steps {
                eval_after = Some(r.eval_loss);
            }
            emit(TrainEvent::Evaluated { step: trainer.step, loss: r.eval_loss }, &mut jsonl, &mut recorder)?;
        }
        emit(TrainEvent::Step(&record), &mut jsonl, &mut recorder)?;
        if config.save_every.is_some_and(|n| n > 0 && trainer.step.is_multiple_of(n)) && trainer.step < total_steps {
            let dir = save(&trainer, &graphs)?;
            prune(&config.out, config.keep_checkpoints)?;
            emit(TrainEvent::Checkpoint { step: trainer.step, dir: &dir }, &mut jsonl, &mut recorder)?;
            last_checkpoint = Some(dir);
        }
    }

    let finished = trainer.step >= total_steps;
    if trainer.step > start_step || last_checkpoint.is_none() {
        let dir = save(&trainer, &graphs)?;
        prune(&config.out, config.keep_checkpoints)?;
        emit(TrainEvent::Checkpoint { step: trainer.step, dir: &dir }, &mut jsonl, &mut recorder)?;
        last_checkpoint = Some(dir);
    }
    let mut lora_path = None;
    if finished {
        let (params, _, _) = graphs.state()?;
        let path = config.out.join("lora.safetensors");
        let meta = [("steps", trainer.step.to_string()), ("seed", config.seed.to_string()), ("base_model", manifest.model.name.clone())];
        lora_io::save(&path, &manifest.lora, &params, config.lora_format, config.lora_dtype, &meta)?;
        lora_path = Some(path);
    }
    let plot = crate::plot::loss_curve(&config.out.join("loss.png"), &metrics_path, eval_before).ok();
    emit(TrainEvent::Finished, &mut jsonl, &mut recorder)?;
    let steps = trainer.step - start_step;
    let summary_path = config.out.join("summary.json");
    let losses: Vec<f64> = recorder.steps.iter().map(|r| r.loss).filter(|l| l.is_finite()).collect();
    let tail = &losses[losses.len().saturating_sub(10)..];
    let summary = TrainSummary {
        start_step,
        steps,
        total_steps,
        interrupted,
        first_loss: losses.first().copied(),
        final_loss: (!tail.is_empty()).then(|| tail.iter().sum::<f64>() / tail.len() as f64),
        eval_before,
        eval_after,
        skipped_steps: trainer.skipped_steps,
        skipped_samples: trainer.skipped_samples,
        seconds: started.elapsed().as_secs_f64(),
        seconds_per_step: if steps > 0 { step_seconds / steps as f64 } else { 0.0 },
        host_fraction: if step_seconds > 0.0 { host_seconds / step_seconds } else { 0.0 },
        lora: lora_path,
        checkpoint: last_checkpoint,
        metrics: metrics_path,
        plot,
    };
    let json = serde_json::to_vec_pretty(&summary).map_err(|e| Error::Config(e.to_string()))?;
    crate::tensor_file::write_atomic(&summary_path, &json)?;
    Ok(summary)
}

fn prune(out: &Path, keep: usize) -> Result<()> {
    for dir in checkpoint::to_prune(&checkpoint::list(out)?, keep) {
        std::fs::remove_dir_all(&dir).at(&dir)?;
    }
    Ok(())
}
