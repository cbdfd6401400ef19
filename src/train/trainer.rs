//! The trainer and its phases: start or resume, micro-step, apply, evaluate, checkpoint,
//! finish. Each phase is one method; the loop that calls them lives in [`super::train`].

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use fs2::FileExt;

use super::lora_meta::{RunFacts, RunMetadata};
use super::models::{Choice, TrainedModel, Window, step_lora_path};
use super::samples::{self, SampleWriter};
use super::{ExpertSummary, NonFinitePolicy, TrainConfig, TrainSummary, run};
use crate::artifacts::{Artifacts, ExpertRole, sha256_file};
use crate::checkpoint::{self, CheckpointState, LoraSpec, SavedLora, TrainerState};
use crate::data::{DataOrder, Dataset, SampleSpec};
use crate::distributed::Ranks;
use crate::error::{Error, IoContext, Result};
use crate::eval::evaluate;
use crate::executor::{Batch, LossGraph, TrainingGraphs, load_base_weights};
use crate::lora_io;
use crate::metrics::{ExpertStep, JsonlWriter, Observer, Recorder, StepRecord, TrainEvent, read_jsonl};
use crate::sft::{SftConfig, SftSampler, TimestepDraw};
use crate::tensorboard::TensorBoard;

/// Holds an exclusive lock (flock) on the `OUT` directory itself for the life of the run: a
/// second trainer on the same directory fails. The lock lives on the open directory, so no
/// lock file can be deleted to get around it, and the OS drops it when the process dies. A
/// run that ends before writing anything removes `OUT` again when it created it, so a
/// failed start leaves no trace.
struct OutLock {
    _dir: File,
    created_dir: Option<PathBuf>,
}

fn lock_out(out: &Path) -> Result<OutLock> {
    if let Ok(meta) = std::fs::metadata(out)
        && !meta.is_dir()
    {
        return Err(Error::Config(format!("--out {}: is {}, expected a directory", out.display(), crate::artifacts::kind_of(&meta))));
    }
    let created_dir = (!out.exists()).then(|| out.to_path_buf());
    std::fs::create_dir_all(out).at(out)?;
    let dir = File::open(out).at(out)?;
    if dir.try_lock_exclusive().is_err() {
        return Err(Error::Config(format!("--out {} is in use by another flowstep train; wait for it or choose another --out", out.display())));
    }
    Ok(OutLock { _dir: dir, created_dir })
}

impl Drop for OutLock {
    fn drop(&mut self) {
        if let Some(created) = &self.created_dir {
            // Best effort, and only when nothing was written: remove_dir fails on a non-empty one.
            let _ = std::fs::remove_dir(created);
        }
    }
}

/// Where the run's events go: metrics.jsonl and TensorBoard (on the rank that writes
/// files), the in-memory record, the caller's observers.
struct Events<'a, 'o> {
    files: Option<(JsonlWriter, TensorBoard)>,
    recorder: Recorder,
    observers: &'a mut [&'o mut dyn Observer],
}

impl Events<'_, '_> {
    fn emit(&mut self, event: TrainEvent<'_>) -> Result<()> {
        if let Some((jsonl, tensorboard)) = &mut self.files {
            jsonl.on_event(&event)?;
            tensorboard.on_event(&event)?;
        }
        self.recorder.on_event(&event)?;
        for o in self.observers.iter_mut() {
            o.on_event(&event)?;
        }
        Ok(())
    }
}

/// Wall time split into graph and host work; sampling is timed apart from the steps.
#[derive(Default)]
struct Timing {
    step_seconds: f64,
    host_seconds: f64,
    sample_seconds: f64,
}

/// The micro-steps of one optimizer step, summed (on this rank, then over the ranks; each
/// model's share is its [`Window`]).
struct Accumulated {
    /// Samples whose gradient was accumulated.
    samples: usize,
    /// Samples skipped as bad (`--skip-bad-samples`).
    skipped: u64,
    loss_sum: f64,
    first: Option<TimestepDraw>,
    /// False when a loss was NaN/Inf (on any rank, once summed).
    finite: bool,
    graph_seconds: f64,
}

/// A training run in progress.
pub struct Trainer<'a, 'o> {
    config: &'a TrainConfig,
    /// The LoRAs trained: one model, or a pair's experts (high noise first).
    models: Vec<TrainedModel>,
    /// How a micro-step picks its model.
    choice: Choice,
    dataset: Dataset,
    eval_set: Option<Dataset>,
    /// Draws over the run's whole timestep range.
    sampler: SftSampler,
    order: DataOrder,
    total_steps: u64,
    /// `--sample-every`: the inference graph and the prompts.
    sample_writer: Option<SampleWriter>,
    /// Sample directories written by this process.
    sample_dirs: Vec<PathBuf>,
    /// Position, advanced sample by sample during a step.
    state: TrainerState,
    /// Position after the last finished step: what a rescue checkpoint saves.
    committed: TrainerState,
    /// The step of the newest checkpoint on disk.
    saved_step: Option<u64>,
    start_step: u64,
    /// Host input buffers, one per latent shape (bucket) met so far.
    batches: HashMap<Vec<usize>, Batch>,
    events: Events<'a, 'o>,
    started: Instant,
    timing: Timing,
    eval_before: Option<f64>,
    eval_after: Option<f64>,
    last_checkpoint: Option<PathBuf>,
    /// Hyperparameters this resume changed.
    changes: Vec<String>,
    /// Samples found non-finite (`--skip-bad-samples`).
    bad_samples: BTreeSet<usize>,
    /// Set when a step was skipped for a non-finite loss and no update has been applied since:
    /// the current parameters give that loss, so they must not become the final LoRA.
    params_nonfinite_loss: Option<String>,
    /// `--output-name`, or OUT's directory name: names the LoRAs in `OUT/loras/`.
    output_name: String,
    /// The LoRA written with the newest checkpoint, per model.
    last_checkpoint_loras: Vec<PathBuf>,
    ranks: &'a mut Ranks,
    /// Held by the rank that writes files.
    _lock: Option<OutLock>,
}

impl<'a, 'o> Trainer<'a, 'o> {
    /// Start or resume: validates the inputs, takes the output lock, loads the graphs and
    /// the initial (or checkpointed) state, and evaluates once before a fresh run.
    pub fn start(config: &'a TrainConfig, ranks: &'a mut Ranks, observers: &'a mut [&'o mut dyn Observer]) -> Result<Self> {
        let started = Instant::now();
        config.validate()?;
        let mut exports = vec![(Artifacts::open(&config.artifacts)?, config.base.clone(), config.init_lora.clone())];
        if let Some(pair) = &config.pair {
            let other = Artifacts::open(&pair.artifacts)?;
            if let Some(reason) = crate::artifacts::pair_mismatch(&exports[0].0.manifest, &other.manifest, true) {
                return Err(Error::flag("--expert-artifacts", format!("{}: {reason}", pair.artifacts.display())));
            }
            exports.push((other, pair.base.clone(), pair.init_lora.clone()));
            // High noise first: the order of checkpoints, samples and --switch-expert-every.
            exports.sort_by_key(|(a, _, _)| a.manifest.expert.as_ref().map(|e| e.role != ExpertRole::HighNoise));
        }
        for (artifacts, _, _) in &exports {
            // Refuse a device without kernels for these graphs before reading any data.
            config.session.for_artifacts(&artifacts.manifest)?;
        }
        let paired = config.pair.is_some();
        let choice = match &config.pair {
            None => Choice::Single,
            Some(p) => p.switch_every.map_or(Choice::ByTimestep, Choice::Every),
        };
        let model_info = &exports[0].0.manifest.model;
        let spec = SampleSpec::for_model(model_info);
        let dataset = Dataset::open(&config.data, spec.clone())?;
        let eval_set = config.eval_data.as_deref().map(|d| Dataset::open(d, spec.clone())).transpose()?;
        let prompts = match &config.sampling {
            Some(sampling) => {
                let largest = &dataset.buckets()[0].latent_shape;
                Some(samples::read_prompts(sampling, model_info, [largest[1], largest[2], largest[3]], config.session.threads)?)
            }
            None => None,
        };
        let sampler = SftSampler::new(SftConfig { shift: config.sft.shift, ..config.sft.clone() }, config.seed)?;
        let (order, total_steps) = config.plan(dataset.len())?;
        let writes = ranks.writes_files();
        let lock = if writes { Some(lock_out(&config.out)?) } else { None };
        let run = run::describe(config, ranks.world_size(), &exports.iter().map(|(a, _, _)| a).collect::<Vec<_>>(), dataset.len(), total_steps)?;
        // It names files, which rank 0 alone writes (and OUT may not exist yet elsewhere).
        let output_name = match &config.output_name {
            Some(name) => name.clone(),
            None if writes => default_output_name(&config.out)?,
            None => String::new(),
        };

        if writes {
            checkpoint::clean_partial(&config.out)?;
            crate::tensor_file::clean_temp(&config.out)?;
            for dir in ["samples", "loras"].map(|name| config.out.join(name)) {
                if dir.is_dir() {
                    crate::tensor_file::clean_temp(&dir)?;
                }
            }
        }
        let existing = if config.out.is_dir() { checkpoint::list(&config.out)? } else { Vec::new() };
        if !config.resume && !existing.is_empty() {
            return Err(Error::Config(format!(
                "{} already has checkpoints (newest step {}); pass --resume to continue that run, or choose another --out",
                config.out.display(),
                existing.last().map_or(0, |(s, _)| *s)
            )));
        }
        let started_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        let mut models = Vec::with_capacity(exports.len());
        let mut sample_models = Vec::with_capacity(exports.len());
        for (artifacts, base_path, _) in &exports {
            let manifest = &artifacts.manifest;
            // An expert of a pair draws (and is evaluated) in its own range; a single model in the run's.
            let own = match (&manifest.expert, paired) {
                (Some(e), true) => SftSampler::new(SftConfig { min_boundary: e.min_timestep_boundary, max_boundary: e.max_timestep_boundary, ..sampler.config.clone() }, config.seed)?,
                _ => sampler.clone(),
            };
            let facts = RunFacts {
                manifest,
                export_sha256: sha256_file(&artifacts.dir.join("manifest.json"))?,
                output_name: &output_name,
                buckets: &dataset.buckets(),
                dataset_len: dataset.len(),
                total_steps,
                sft: &own.config,
                started_at,
            };
            let lora_meta = RunMetadata::new(config, &facts);
            let a = artifacts.clone();
            let lora = config.lora(manifest);
            let (mut graphs, base) = TrainingGraphs::load(artifacts, &config.session, lora.scale(), |m| load_base_weights(&a, base_path.as_deref(), m))?;
            if let Some(max) = config.max_grad_norm {
                graphs.clip_grad_norm(max, &config.session)?;
            }
            // Evaluation only informs the files, which one rank writes.
            let eval_graph = match &eval_set {
                Some(_) if writes => Some(LossGraph::load(artifacts, &config.session, &base, lora.scale())?),
                _ => None,
            };
            if prompts.is_some() {
                let from_timestep = match (&manifest.expert, paired) {
                    (Some(e), true) if e.role == ExpertRole::HighNoise => e.switch_timestep,
                    _ => f32::NEG_INFINITY,
                };
                sample_models.push((artifacts.clone(), base, from_timestep, lora.scale()));
            }
            models.push(TrainedModel { artifacts: artifacts.clone(), lora, graphs, eval_graph, sampler: own, lora_meta, window: Window::default() });
        }
        // Samples only inform the files, which one rank writes.
        let sample_writer = match (prompts, &config.sampling) {
            (Some(prompts), Some(sampling)) if writes => Some(SampleWriter::load(&sample_models, &config.session, prompts, sampling)?),
            _ => None,
        };
        drop(sample_models);
        let mut state = TrainerState {
            step: 0,
            micro_steps: 0,
            skipped_steps: 0,
            skipped_samples: 0,
            run: run.clone(),
            eval_before: None,
            expert_updates: models.iter().filter_map(|m| m.role(paired)).map(|r| (r.as_str().to_string(), 0)).collect(),
        };
        let resumed_from = existing.last().filter(|_| config.resume).map(|(_, dir)| dir.clone());
        check_same_start(ranks, &config.out, resumed_from.as_ref().map(|_| existing.last().map_or(0, |(s, _)| *s)))?;
        let mut changes = Vec::new();
        let mut resumed_ranks = ranks.world_size() as u64;
        match &resumed_from {
            Some(dir) => {
                let wanted: Vec<(Option<&str>, usize)> = models.iter().map(|m| (m.role(paired).map(ExpertRole::as_str), m.artifacts.num_params())).collect();
                let (saved, tensors) = checkpoint::load_models(dir, &wanted)?;
                changes = run::check_resume(dir, saved.step, &saved.run, &run, total_steps, config.allow_changed_hyperparameters)?;
                resumed_ranks = saved.run["world-size"].as_u64().unwrap_or(1);
                for (model, t) in models.iter_mut().zip(&tensors) {
                    model.graphs.set_state(&t.params, &t.m, &t.v)?;
                }
                // From here on the checkpoints carry the new settings.
                state = TrainerState { run, ..saved };
            }
            None => {
                for (model, (_, _, init_lora)) in models.iter_mut().zip(&exports) {
                    let (init, _) = lora_io::load_for(&model.artifacts.lora_file(init_lora.as_deref())?, &model.artifacts.manifest, Some(model.lora.alpha))?;
                    let zeros = vec![0.0; model.artifacts.num_params()];
                    model.graphs.set_state(&init, &zeros, &zeros)?;
                }
            }
        }
        let start_step = state.step;
        let metrics_path = config.out.join("metrics.jsonl");
        let mut recorder = Recorder::default();
        let files = if writes {
            if let Some((name, text)) = &config.run_config {
                crate::tensor_file::write_atomic(&config.out.join(name), text.as_bytes())?;
            }
            let jsonl = JsonlWriter::open(&metrics_path, start_step)?;
            // A resumed run reports (summary, loss.png) the whole run, not only its own steps.
            if start_step > 0 && metrics_path.is_file() {
                recorder.steps = read_jsonl(&metrics_path)?;
                recorder.evals = recorder.steps.iter().filter_map(|r| r.eval_loss.map(|e| (r.step, e))).collect();
            }
            Some((jsonl, TensorBoard::open(&config.out.join("tensorboard"), start_step)?))
        } else {
            None
        };
        let eval_before = state.eval_before;
        let mut trainer = Self {
            config,
            models,
            choice,
            dataset,
            eval_set,
            sampler,
            order,
            total_steps,
            sample_writer,
            sample_dirs: Vec::new(),
            committed: state.clone(),
            saved_step: resumed_from.as_ref().map(|_| start_step),
            state,
            start_step,
            batches: HashMap::new(),
            events: Events { files, recorder, observers },
            started,
            timing: Timing::default(),
            eval_before,
            eval_after: None,
            last_checkpoint: None,
            changes: Vec::new(),
            bad_samples: BTreeSet::new(),
            params_nonfinite_loss: None,
            output_name,
            last_checkpoint_loras: Vec::new(),
            ranks,
            _lock: lock,
        };
        if config.resume && resumed_from.is_none() {
            trainer.events.emit(TrainEvent::Warning(format!("--resume: no checkpoint in {}; starting a fresh run", config.out.display())))?;
        }
        if let (Some(expert), Some(_), false) = (&trainer.models[0].artifacts.manifest.expert, &trainer.sample_writer, paired) {
            let message = format!("--sample-every: samples use the {} expert alone over every timestep: they show this LoRA's progress, \
                 not what the Wan2.2 pair makes (flowstep sample --expert-artifacts, or train both with --expert-artifacts)", expert.role.as_str());
            trainer.events.emit(TrainEvent::Warning(message))?;
        }
        trainer.events.emit(TrainEvent::Started { start_step, total_steps, resumed_from: resumed_from.as_deref() })?;
        if resumed_ranks != trainer.ranks.world_size() as u64 {
            let message = format!("resuming a run of {resumed_ranks} rank(s) with {}, each with --grad-accum {}: the same samples per step", trainer.ranks.world_size(), config.grad_accum);
            trainer.events.emit(TrainEvent::Message(message))?;
        }
        if !changes.is_empty() {
            trainer.events.emit(TrainEvent::Warning(format!("resuming with changed hyperparameters: {}", changes.join(", "))))?;
            if let Some((jsonl, _)) = &mut trainer.events.files {
                jsonl.record_changes(changes.clone());
            }
        }
        trainer.changes = changes;
        if start_step == 0 {
            trainer.eval_before = trainer.evaluate(0)?;
            trainer.state.eval_before = trainer.eval_before;
            trainer.committed.eval_before = trainer.eval_before;
        }
        Ok(trainer)
    }

    /// True once every step of the run is done.
    pub fn done(&self) -> bool {
        self.state.step >= self.total_steps
    }

    /// True when `flag` is true on any rank.
    pub fn any_rank(&mut self, flag: bool) -> Result<bool> {
        let mut sum = [if flag { 1.0 } else { 0.0 }];
        self.ranks.sum(&mut sum)?;
        Ok(sum[0] > 0.0)
    }

    /// Optimizer steps finished by this process.
    pub fn steps_this_run(&self) -> u64 {
        self.state.step - self.start_step
    }

    /// One optimizer step: `grad_accum` micro-steps, the update, the periodic evaluation
    /// and checkpoint, and the step's metrics line.
    pub fn step(&mut self) -> Result<()> {
        let step_start = Instant::now();
        let lr = self.config.schedule.lr(self.config.lr, self.state.step, self.total_steps);
        let mut acc = Accumulated { samples: 0, skipped: 0, loss_sum: 0.0, first: None, finite: true, graph_seconds: 0.0 };
        let world = self.ranks.world_size() as u64;
        if world == 1 {
            // A skipped sample is replaced by the next one: every step has --grad-accum samples.
            while acc.samples < self.config.grad_accum {
                let counter = self.state.micro_steps;
                self.state.micro_steps += 1;
                self.micro_step(counter, &mut acc)?;
            }
        } else {
            // The step's counters are fixed, G·W of them; rank r takes those at offsets ≡ r
            // (mod W). A skipped sample is not replaced: the ranks sum how many contributed.
            let first = self.state.micro_steps;
            for k in 0..self.config.grad_accum as u64 {
                self.micro_step(first + self.ranks.rank() as u64 + k * world, &mut acc)?;
            }
            self.state.micro_steps = first + self.config.grad_accum as u64 * world;
        }
        self.sum_over_ranks(&mut acc)?;
        let (applied, grad_norm, clipped_grad_norm, experts) = self.apply(lr, &mut acc)?;
        let seconds = step_start.elapsed().as_secs_f64();
        self.timing.step_seconds += seconds;
        self.timing.host_seconds += seconds - acc.graph_seconds;
        let draw = acc.first.unwrap_or(TimestepDraw { index: 0, timestep: f32::NAN, sigma: f32::NAN, weight: f32::NAN });
        let record = StepRecord {
            step: self.state.step,
            epoch: self.order.epoch_of(self.state.micro_steps.saturating_sub(1)),
            loss: acc.loss_sum / acc.samples as f64,
            timestep: draw.timestep,
            weight: draw.weight,
            lr,
            grad_norm,
            grad_norm_clipped: self.config.max_grad_norm.map(|_| clipped_grad_norm),
            applied,
            seconds,
            eval_loss: None,
            hyperparameter_changes: Vec::new(),
            expert: (!experts.is_empty()).then(|| experts.keys().cloned().collect::<Vec<_>>().join("+")),
            experts,
            world_size: self.ranks.world_size(),
        };
        let step = self.state.step;
        let periodic = self.config.eval_every.is_some_and(|n| n > 0 && step.is_multiple_of(n));
        let evaluated = self.eval_set.is_some() && (periodic || self.done());
        if periodic || self.done() {
            // The final evaluation too, so it lands on the last metrics line.
            let loss = self.evaluate(step)?;
            if self.done() {
                self.eval_after = loss;
            }
        }
        self.events.emit(TrainEvent::Step(&record))?;
        if self.config.sampling.as_ref().is_some_and(|s| (s.every > 0 && step.is_multiple_of(s.every)) || self.done()) {
            self.sample(step)?;
        }
        let save = self.config.save_every.is_some_and(|n| n > 0 && step.is_multiple_of(n)) && !self.done() && self.ranks.writes_files();
        if save {
            self.checkpoint()?;
        }
        if (evaluated || save) && !self.done() && self.ranks.writes_files() {
            // finish() draws the final curve.
            self.refresh_plot()?;
        }
        Ok(())
    }

    /// Redraws `OUT/loss.png` from `metrics.jsonl`; a failure is reported, not fatal.
    fn refresh_plot(&mut self) -> Result<Option<PathBuf>> {
        let path = self.config.out.join("loss.png");
        match crate::plot::loss_curve(&path, &self.config.out.join("metrics.jsonl"), self.eval_before) {
            Ok(p) => Ok(Some(p)),
            Err(e) => {
                self.events.emit(TrainEvent::Warning(format!("loss curve not drawn: {e}")))?;
                Ok(None)
            }
        }
    }

    /// The sample of micro-step `counter` through the training graph, its gradient added to
    /// the accumulator, or skipped as bad (`--skip-bad-samples`).
    fn micro_step(&mut self, counter: u64, acc: &mut Accumulated) -> Result<()> {
        let index = self.order.sample(counter);
        let sample = match self.dataset.load(index) {
            Ok(s) => s,
            Err(e @ Error::NonFiniteSample { .. }) if self.config.skip_bad_samples => {
                acc.skipped += 1;
                self.events.emit(TrainEvent::Message(format!("skipping {e}")))?;
                // Every epoch visits every sample, so an epoch is all bad only when the
                // whole dataset is; until then the good samples carry the run.
                self.bad_samples.insert(index);
                if self.bad_samples.len() == self.dataset.len() {
                    return Err(Error::Data { path: self.config.data.clone(), reason: format!("all {} samples have non-finite values; nothing to train on", self.dataset.len()) });
                }
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let b = match self.batches.entry(sample.latent_shape.clone()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(Batch::new(&sample.latent_shape, &sample.context_shape)?),
        };
        b.context.extract_tensor_mut().1.copy_from_slice(&sample.context);
        b.set_conditioning(&sample.conditioning)?;
        let (m, _) = self.choice.pick(counter, &self.sampler, &self.models)?;
        let sampler = self.choice.sampler(m, &self.sampler, &self.models);
        let draw = b.prepare(|x_t, target| sampler.prepare_into(counter, &sample.latents, x_t, target))?;
        b.set_scalars(draw.timestep, draw.weight);
        let t = Instant::now();
        let step = self.state.step + 1;
        let model = &mut self.models[m];
        let loss = model.graphs.accumulate(b).map_err(|e| Error::AtSample { step, sample: sample.path.clone(), source: Box::new(e) })?;
        acc.graph_seconds += t.elapsed().as_secs_f64();
        acc.first.get_or_insert(draw);
        let window = &mut model.window;
        window.micro_steps += 1;
        window.loss_sum += loss as f64;
        if !loss.is_finite() {
            acc.finite = false;
            if window.nonfinite.is_none() {
                window.nonfinite = Some((sample.path.clone(), loss));
            }
        }
        acc.loss_sum += loss as f64;
        acc.samples += 1;
        Ok(())
    }

    /// Sums the step's sample count, skipped samples, loss and finite flag over the ranks,
    /// and each model's micro-steps, loss and finite flag; then the gradient of each model
    /// that took micro-steps on some rank with every loss finite. Alone, the sums are the values.
    fn sum_over_ranks(&mut self, acc: &mut Accumulated) -> Result<()> {
        if self.ranks.world_size() == 1 {
            self.state.skipped_samples += acc.skipped;
            return Ok(());
        }
        let mut sums = vec![acc.samples as f64, acc.skipped as f64, acc.loss_sum, if acc.finite { 0.0 } else { 1.0 }];
        for model in &self.models {
            let w = &model.window;
            sums.extend([w.micro_steps as f64, w.loss_sum, if w.nonfinite.is_some() { 1.0 } else { 0.0 }]);
        }
        self.ranks.sum(&mut sums)?;
        (acc.samples, acc.skipped, acc.loss_sum, acc.finite) = (sums[0] as usize, sums[1] as u64, sums[2], sums[3] == 0.0);
        for (model, s) in self.models.iter_mut().zip(sums[4..].chunks(3)) {
            let w = &mut model.window;
            (w.micro_steps, w.loss_sum) = (s[0] as usize, s[1]);
            w.nonfinite_elsewhere = s[2] > 0.0 && w.nonfinite.is_none();
        }
        self.state.skipped_samples += acc.skipped;
        if acc.finite && acc.samples > 0 {
            let t = Instant::now();
            // Every rank takes the same models in the same order: the conditions are sums.
            for model in self.models.iter_mut().filter(|m| m.window.micro_steps > 0) {
                let ranks = &mut *self.ranks;
                model.graphs.sum_gradient(|gradient| ranks.sum_gradient(gradient))?;
            }
            acc.graph_seconds += t.elapsed().as_secs_f64();
        }
        Ok(())
    }

    /// The optimizer update of every model that took micro-steps, over its accumulated
    /// gradient, or its rejection under the non-finite policy. Returns (all applied, gradient
    /// norm, norm after clipping, each expert's share for a pair) and advances the step. A
    /// pair's norms are over both experts' gradients together (each averaged over its own
    /// micro-steps), as the norm of all the job's LoRA parameters.
    fn apply(&mut self, lr: f64, acc: &mut Accumulated) -> Result<(bool, f32, f32, std::collections::BTreeMap<String, ExpertStep>)> {
        if acc.finite && acc.samples == 0 {
            for model in &mut self.models {
                model.window = Window::default();
                model.graphs.discard_gradient();
            }
            self.events.emit(TrainEvent::Warning(format!("step {}: every sample was skipped as bad; no update", self.state.step + 1)))?;
            self.state.skipped_steps += 1;
            self.state.step += 1;
            self.committed = self.state.clone();
            return Ok((false, f32::NAN, f32::NAN, std::collections::BTreeMap::new()));
        }
        let paired = self.config.pair.is_some();
        let mut experts = std::collections::BTreeMap::new();
        let (mut applied, mut norm_sq, mut clipped_sq) = (true, 0.0f64, 0.0f64);
        let mut nonfinite = None;
        for model in &mut self.models {
            let window = std::mem::take(&mut model.window);
            if window.micro_steps == 0 {
                continue;
            }
            let role = model.role(paired);
            let outcome = if window.nonfinite.is_none() && !window.nonfinite_elsewhere {
                let t = Instant::now();
                // Bias correction counts this LoRA's own applied updates.
                let updates = match role {
                    Some(r) => self.state.expert_updates.get(r.as_str()).copied().unwrap_or(0),
                    None => self.state.step - self.state.skipped_steps,
                };
                let o = model.graphs.apply(updates + 1, lr, &self.config.adamw, window.micro_steps)?;
                acc.graph_seconds += t.elapsed().as_secs_f64();
                Some(o)
            } else {
                model.graphs.discard_gradient();
                None
            };
            let model_applied = outcome.is_some_and(|o| o.applied);
            let grad_norm = outcome.map_or(f32::NAN, |o| o.grad_norm);
            applied &= model_applied;
            norm_sq += (grad_norm as f64).powi(2);
            clipped_sq += (outcome.map_or(f32::NAN, |o| o.clipped_grad_norm) as f64).powi(2);
            if nonfinite.is_none() {
                nonfinite = window.nonfinite;
            }
            if let Some(r) = role {
                if model_applied {
                    *self.state.expert_updates.entry(r.as_str().to_string()).or_default() += 1;
                }
                let loss = window.loss_sum / window.micro_steps as f64;
                experts.insert(r.as_str().to_string(), ExpertStep { micro_steps: window.micro_steps, loss, grad_norm, applied: model_applied });
            }
        }
        let (grad_norm, clipped_grad_norm) = (norm_sq.sqrt() as f32, clipped_sq.sqrt() as f32);
        if applied {
            self.params_nonfinite_loss = None;
        } else {
            if let Some((sample, value)) = nonfinite {
                let error = Error::NonFiniteLoss { step: self.state.step + 1, sample, value };
                if self.config.on_nonfinite == NonFinitePolicy::Stop {
                    return Err(error);
                }
                // Skipping leaves the parameters as they are: once an update has changed them,
                // they still give this loss (before any, the data alone does: a sample whose
                // values overflow, which the skipped-step count reports).
                if self.state.step > self.state.skipped_steps {
                    self.params_nonfinite_loss.get_or_insert(error.to_string());
                }
            }
            match self.config.on_nonfinite {
                NonFinitePolicy::Stop => {
                    let (what, value) = if !acc.finite {
                        ("loss of a sample on another rank", f64::NAN)
                    } else if grad_norm.is_finite() {
                        ("parameter update", f64::NAN)
                    } else {
                        ("gradient norm", grad_norm as f64)
                    };
                    return Err(Error::NonFinite { step: self.state.step + 1, what, value });
                }
                NonFinitePolicy::Skip => self.state.skipped_steps += 1,
            }
        }
        self.state.step += 1;
        self.committed = self.state.clone();
        Ok((applied, grad_norm, clipped_grad_norm, experts))
    }

    /// The deterministic eval loss of the current parameters, when the run has eval data. A
    /// pair's is each expert's over its own range, weighted by the range's share of the table
    /// (the loss over the whole table), each expert's also reported on its own.
    fn evaluate(&mut self, step: u64) -> Result<Option<f64>> {
        let Some(set) = &self.eval_set else { return Ok(None) };
        let paired = self.config.pair.is_some();
        let mut total = 0.0;
        for model in &mut self.models {
            let Some(graph) = model.eval_graph.as_mut() else { return Ok(None) };
            let r = evaluate(graph, model.graphs.params(), set, &model.sampler, &self.config.eval)?;
            if let Some(role) = model.role(paired) {
                self.events.emit(TrainEvent::Message(format!("step {step}: eval loss of the {} expert {:.5}", role.as_str(), r.eval_loss)))?;
                total += model.table_share() * r.eval_loss;
            } else {
                total = r.eval_loss;
            }
        }
        self.events.emit(TrainEvent::Evaluated { step, loss: total })?;
        Ok(Some(total))
    }

    /// Samples every prompt with the current parameters into `OUT/samples/step-XXXXXX/`.
    fn sample(&mut self, step: u64) -> Result<()> {
        let Some(writer) = self.sample_writer.as_mut() else { return Ok(()) };
        let started = Instant::now();
        let dir = self.config.out.join("samples").join(format!("step-{step:06}"));
        let params: Vec<_> = self.models.iter().map(|m| m.graphs.params()).collect();
        let written = writer.write(&params, &dir)?;
        let seconds = started.elapsed().as_secs_f64();
        if let Some(message) = written.warning.filter(|_| self.sample_dirs.is_empty()) {
            self.events.emit(TrainEvent::Warning(message))?;
        }
        self.timing.sample_seconds += seconds;
        self.events.emit(TrainEvent::Sampled { step, dir: &dir, seconds, images: &written.contact_sheets })?;
        self.sample_dirs.push(dir);
        Ok(())
    }

    /// The LoRA file of model `model`'s parameters after the last finished step.
    fn lora_spec(&self, model: &TrainedModel) -> LoraSpec {
        let epoch = self.order.epoch_of(self.committed.micro_steps.saturating_sub(1)) + 1;
        LoraSpec { info: model.lora.clone(), metadata: model.lora_meta.at_step(self.committed.step, epoch) }
    }

    /// Saves the current state as a checkpoint, writes its LoRAs to `OUT/loras/` (as
    /// `flowstep export-lora` would from the checkpoint) and prunes old checkpoints.
    fn checkpoint(&mut self) -> Result<PathBuf> {
        let paired = self.config.pair.is_some();
        let mut saved = Vec::with_capacity(self.models.len());
        for model in &self.models {
            let (params, m, v) = model.graphs.state()?;
            if let Some(i) = params.iter().position(|x| !x.is_finite()) {
                return Err(Error::NonFinite { step: self.committed.step, what: "parameter", value: params[i] as f64 });
            }
            let role = model.role(paired);
            let path = step_lora_path(&self.config.out, &self.output_name, role, self.committed.step);
            saved.push((role, self.lora_spec(model), CheckpointState { params, m, v }, path));
        }
        let loras: Vec<SavedLora<'_>> = saved.iter().map(|(role, spec, state, _)| SavedLora { expert: role.map(ExpertRole::as_str), spec, state }).collect();
        let dir = checkpoint::save(&self.config.out, &self.committed, &loras)?;
        for (_, spec, state, path) in &saved {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).at(parent)?;
            }
            lora_io::save(path, &spec.info, &state.params, self.config.lora_format, self.config.lora_dtype, &spec.metadata)?;
        }
        self.saved_step = Some(self.committed.step);
        for old in checkpoint::to_prune(&checkpoint::list(&self.config.out)?, self.config.keep_checkpoints) {
            std::fs::remove_dir_all(&old).at(&old)?;
        }
        self.events.emit(TrainEvent::Checkpoint { step: self.committed.step, dir: &dir })?;
        self.last_checkpoint = Some(dir.clone());
        self.last_checkpoint_loras = saved.into_iter().map(|(_, _, _, path)| path).collect();
        Ok(dir)
    }

    /// After a failed step: saves the last finished step, when no checkpoint has it yet, so
    /// a resume loses no work. Its own failure (a full disk) is reported and the original
    /// error stands.
    pub fn rescue(&mut self) {
        if !self.ranks.writes_files() || self.saved_step.is_some_and(|s| s >= self.committed.step) || self.committed.step == self.start_step {
            return;
        }
        let message = match self.checkpoint() {
            Ok(dir) => format!("saved the last good step {} in {}; fix the problem and --resume", self.committed.step, dir.display()),
            Err(e) => format!("could not save the last good step {}: {e}", self.committed.step),
        };
        let _ = self.events.emit(TrainEvent::Warning(message));
    }

    /// The final checkpoint, the LoRA file (when every step is done), the loss curve and
    /// the summary.
    pub fn finish(mut self, interrupted: bool) -> Result<TrainSummary> {
        let config = self.config;
        let writes = self.ranks.writes_files();
        if writes && (self.state.step > self.start_step || self.last_checkpoint.is_none()) {
            self.checkpoint()?;
        }
        let mut lora_paths = Vec::new();
        if self.done() && writes {
            let names: Vec<String> = self.models.iter().map(|m| super::lora_file_name(&m.artifacts.manifest)).collect();
            if let Some(cause) = &self.params_nonfinite_loss {
                return Err(Error::Config(format!(
                    "{} not written: the final parameters give a non-finite loss ({cause}) and --on-nonfinite skip discarded every update since; \
                     the learning rate is likely too high (--lr {})",
                    names.join(", "),
                    config.lr
                )));
            }
            for (model, name) in self.models.iter().zip(names) {
                let (params, _, _) = model.graphs.state()?;
                let path = config.out.join(name);
                let spec = self.lora_spec(model);
                lora_io::save(&path, &spec.info, &params, config.lora_format, config.lora_dtype, &spec.metadata)?;
                lora_paths.push(path);
            }
        }
        let metrics_path = config.out.join("metrics.jsonl");
        let plot = if writes { self.refresh_plot()? } else { None };
        self.events.emit(TrainEvent::Finished)?;
        let steps = self.steps_this_run();
        let losses: Vec<f64> = self.events.recorder.steps.iter().map(|r| r.loss).filter(|l| l.is_finite()).collect();
        let tail = &losses[losses.len().saturating_sub(10)..];
        let Timing { step_seconds, host_seconds, .. } = self.timing;
        let mut graph_peak_bytes = Some(0);
        for model in &self.models {
            graph_peak_bytes = graph_peak_bytes.zip(model.graphs.arena_peak_bytes()?).map(|(a, b)| a + b);
        }
        let paired = self.config.pair.is_some();
        let experts = self
            .models
            .iter()
            .enumerate()
            .filter_map(|(i, m)| m.role(paired).map(|r| (i, r)))
            .map(|(i, role)| expert_summary(role, &self.events.recorder.steps, lora_paths.get(i), self.last_checkpoint_loras.get(i)))
            .collect();
        let single = |paths: &[PathBuf]| paths.first().filter(|_| !paired).cloned();
        let summary = TrainSummary {
            start_step: self.start_step,
            steps,
            total_steps: self.total_steps,
            interrupted,
            first_loss: losses.first().copied(),
            final_loss: (!tail.is_empty()).then(|| tail.iter().sum::<f64>() / tail.len() as f64),
            eval_before: self.eval_before,
            eval_after: self.eval_after,
            skipped_steps: self.state.skipped_steps,
            skipped_samples: self.state.skipped_samples,
            world_size: self.ranks.world_size(),
            hyperparameter_changes: self.changes.clone(),
            seconds: self.started.elapsed().as_secs_f64(),
            seconds_per_step: if steps > 0 { step_seconds / steps as f64 } else { 0.0 },
            host_fraction: if step_seconds > 0.0 { host_seconds / step_seconds } else { 0.0 },
            graph_peak_bytes,
            buckets: self.dataset.buckets(),
            samples: self.sample_dirs.clone(),
            sample_seconds: self.timing.sample_seconds,
            lora: single(&lora_paths),
            checkpoint: self.last_checkpoint.clone(),
            checkpoint_lora: single(&self.last_checkpoint_loras),
            metrics: metrics_path,
            plot,
            experts,
        };
        if writes {
            let json = serde_json::to_vec_pretty(&summary).map_err(|e| Error::Config(e.to_string()))?;
            crate::tensor_file::write_atomic(&config.out.join("summary.json"), &json)?;
        }
        Ok(summary)
    }
}

/// One expert's share of the run, from the metrics of every step (a resumed run's included).
fn expert_summary(role: ExpertRole, records: &[StepRecord], lora: Option<&PathBuf>, checkpoint_lora: Option<&PathBuf>) -> ExpertSummary {
    let mine: Vec<&ExpertStep> = records.iter().filter_map(|r| r.experts.get(role.as_str())).collect();
    let losses: Vec<f64> = mine.iter().map(|e| e.loss).filter(|l| l.is_finite()).collect();
    let tail = &losses[losses.len().saturating_sub(10)..];
    ExpertSummary {
        role: role.as_str().to_string(),
        micro_steps: mine.iter().map(|e| e.micro_steps as u64).sum(),
        steps: mine.len() as u64,
        first_loss: losses.first().copied(),
        final_loss: (!tail.is_empty()).then(|| tail.iter().sum::<f64>() / tail.len() as f64),
        lora: lora.cloned(),
        checkpoint_lora: checkpoint_lora.cloned(),
    }
}

/// Every rank starts from the same step: the checkpoint it resumes (`resumed`), or a fresh
/// run. Ranks that see different checkpoints would train from different states; OUT must be
/// one directory that every rank reads (a shared file system across machines).
fn check_same_start(ranks: &mut Ranks, out: &Path, resumed: Option<u64>) -> Result<()> {
    if ranks.world_size() == 1 {
        return Ok(());
    }
    // Equal values exactly when W·Σx² = (Σx)²; every rank decides alike from the same sums.
    let x = resumed.map_or(-1.0, |s| s as f64);
    let mut sums = [x, x * x];
    ranks.sum(&mut sums)?;
    if (ranks.world_size() as f64 * sums[1] - sums[0] * sums[0]).abs() > 0.5 {
        let mine = resumed.map_or("no checkpoint".to_string(), |s| format!("the checkpoint of step {s}"));
        return Err(Error::Checkpoint {
            path: out.join("checkpoints"),
            reason: format!("rank {} resumes {mine} and another rank something else; OUT must be one directory that every rank sees", ranks.rank()),
        });
    }
    Ok(())
}

/// OUT's directory name (of the absolute path, so that `--out .` names the directory).
fn default_output_name(out: &Path) -> Result<String> {
    let absolute = std::fs::canonicalize(out).at(out)?;
    absolute.file_name().map(|n| n.to_string_lossy().into_owned()).ok_or_else(|| {
        Error::flag("--output-name", format!("--out {} has no directory name to name the LoRA files after; give --output-name", out.display()))
    })
}
