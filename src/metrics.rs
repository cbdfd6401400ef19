//! What the training loop reports: events, and the observers that turn them into
//! `metrics.jsonl`, a progress bar (or log lines off a terminal) and an in-memory record.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::tensor_file::write_atomic;

/// One optimizer step, as written to `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Optimizer steps completed, 1-based.
    pub step: u64,
    pub epoch: u64,
    /// Mean loss over the step's micro-steps.
    pub loss: f64,
    /// Timestep and weight of the first micro-step.
    pub timestep: f32,
    pub weight: f32,
    pub lr: f64,
    /// L2 norm of the step's averaged gradient, before clipping.
    pub grad_norm: f32,
    /// With `--max-grad-norm`: the norm of the gradient the update used, after clipping.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grad_norm_clipped: Option<f32>,
    /// False when the step was skipped (non-finite loss or gradient).
    pub applied: bool,
    /// Wall time of the step.
    pub seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_loss: Option<f64>,
    /// On the first step after a resume that changed hyperparameters: what changed.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub hyperparameter_changes: Vec<String>,
    /// A Wan2.2 pair job: the expert this step trained (`high_noise`, `low_noise`), or
    /// `high_noise+low_noise` when its micro-steps went to both.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub expert: Option<String>,
    /// A Wan2.2 pair job: each expert that took micro-steps in this step, by role.
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub experts: BTreeMap<String, ExpertStep>,
    /// Data-parallel ranks that computed the step (written when more than one).
    #[serde(skip_serializing_if = "is_one", default = "one")]
    pub world_size: usize,
}

/// One expert's share of a pair job's optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpertStep {
    /// Micro-steps (samples) this expert took in the step.
    pub micro_steps: usize,
    /// Mean loss over them.
    pub loss: f64,
    /// L2 norm of this expert's averaged gradient, before clipping.
    pub grad_norm: f32,
    pub applied: bool,
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

fn one() -> usize {
    1
}

/// Events the loop emits; observers never change training.
#[derive(Debug, Clone)]
pub enum TrainEvent<'a> {
    Started { start_step: u64, total_steps: u64, resumed_from: Option<&'a Path> },
    Step(&'a StepRecord),
    Evaluated { step: u64, loss: f64 },
    Checkpoint { step: u64, dir: &'a Path },
    /// Samples written (`--sample-every`); their time is not part of any step's. `images`:
    /// each prompt's name and decoded contact sheet (PNG), when a VAE decoder is given.
    Sampled { step: u64, dir: &'a Path, seconds: f64, images: &'a [(String, PathBuf)] },
    Message(String),
    /// Something the user must see even with `--quiet`.
    Warning(String),
    Finished,
}

pub trait Observer {
    fn on_event(&mut self, event: &TrainEvent<'_>) -> Result<()>;
}

/// Appends one JSON line per step (flushed each time) to `metrics.jsonl`.
pub struct JsonlWriter {
    path: PathBuf,
    file: File,
    pending_eval: Option<(u64, f64)>,
    pending_changes: Vec<String>,
}

impl JsonlWriter {
    /// Opens `path`, first dropping lines after `keep_until_step` (steps a resumed run
    /// will redo), so the file reads as one uninterrupted run.
    pub fn open(path: &Path, keep_until_step: u64) -> Result<Self> {
        if path.exists() {
            let reader = BufReader::new(File::open(path).at(path)?);
            let mut kept = String::new();
            for line in reader.lines() {
                let line = line.at(path)?;
                let step = serde_json::from_str::<serde_json::Value>(&line).ok().and_then(|v| v["step"].as_u64());
                if step.is_some_and(|s| s <= keep_until_step) {
                    kept.push_str(&line);
                    kept.push('\n');
                }
            }
            write_atomic(path, kept.as_bytes())?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path).at(path)?;
        Ok(Self { path: path.to_path_buf(), file, pending_eval: None, pending_changes: Vec::new() })
    }

    /// Writes `changes` into the next step's line.
    pub fn record_changes(&mut self, changes: Vec<String>) {
        self.pending_changes = changes;
    }
}

impl Observer for JsonlWriter {
    fn on_event(&mut self, event: &TrainEvent<'_>) -> Result<()> {
        match event {
            TrainEvent::Evaluated { step, loss } => self.pending_eval = Some((*step, *loss)),
            TrainEvent::Step(record) => {
                let mut record = (*record).clone();
                if let Some((step, loss)) = self.pending_eval.take()
                    && step == record.step
                {
                    record.eval_loss = Some(loss);
                }
                record.hyperparameter_changes.append(&mut self.pending_changes);
                let line = serde_json::to_string(&record).map_err(|e| Error::Config(e.to_string()))?;
                writeln!(self.file, "{line}").at(&self.path)?;
                self.file.flush().at(&self.path)?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// Reads `metrics.jsonl` back (plots, tests).
pub fn read_jsonl(path: &Path) -> Result<Vec<StepRecord>> {
    let text = std::fs::read_to_string(path).at(path)?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| Error::Data { path: path.to_path_buf(), reason: format!("bad metrics line: {e}") }))
        .collect()
}

/// A progress bar with loss, lr, it/s and ETA on a terminal; a log line every ~5% otherwise.
pub struct Progress {
    bar: Option<ProgressBar>,
    quiet: bool,
    every: u64,
    ema: Option<f64>,
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        Self { bar: None, quiet, every: 1, ema: None }
    }
}

impl Observer for Progress {
    fn on_event(&mut self, event: &TrainEvent<'_>) -> Result<()> {
        if let TrainEvent::Warning(m) = event {
            self.println(format!("warning: {m}"));
        }
        if self.quiet {
            return Ok(());
        }
        match event {
            TrainEvent::Started { start_step, total_steps, resumed_from } => {
                if let Some(dir) = resumed_from {
                    eprintln!("resuming from {} (step {start_step})", dir.display());
                }
                self.every = (total_steps / 20).max(1);
                if std::io::stderr().is_terminal() {
                    let bar = ProgressBar::with_draw_target(Some(*total_steps), ProgressDrawTarget::stderr());
                    let style = ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}, {per_sec}]")
                        .unwrap_or_else(|_| ProgressStyle::default_bar());
                    bar.set_style(style);
                    bar.set_position(*start_step);
                    bar.enable_steady_tick(Duration::from_millis(200));
                    self.bar = Some(bar);
                }
            }
            TrainEvent::Step(r) => {
                let ema = match self.ema {
                    Some(e) if r.loss.is_finite() => 0.9 * e + 0.1 * r.loss,
                    _ => r.loss,
                };
                self.ema = Some(ema);
                let expert = r.expert.as_deref().map_or(String::new(), |e| format!(" [{e}]"));
                let msg = format!("loss {:.4} (avg {ema:.4}) lr {:.2e}{expert}{}", r.loss, r.lr, if r.applied { "" } else { " SKIPPED" });
                match &self.bar {
                    Some(bar) => {
                        bar.set_message(msg);
                        bar.set_position(r.step);
                    }
                    None if r.step % self.every == 0 || !r.applied => {
                        eprintln!("step {:>6}  {msg}  {:.3} s/step", r.step, r.seconds)
                    }
                    None => {}
                }
            }
            TrainEvent::Evaluated { step, loss } => self.println(format!("step {step}: eval loss {loss:.5}")),
            TrainEvent::Checkpoint { step, dir } => self.println(format!("step {step}: checkpoint {}", dir.display())),
            TrainEvent::Sampled { step, dir, seconds, .. } => self.println(format!("step {step}: samples {} ({seconds:.1} s)", dir.display())),
            TrainEvent::Message(m) => self.println(m.clone()),
            TrainEvent::Warning(_) => {}
            TrainEvent::Finished => {
                if let Some(bar) = self.bar.take() {
                    bar.finish_and_clear();
                }
            }
        }
        Ok(())
    }
}

impl Progress {
    fn println(&self, line: String) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }
}

/// Keeps every record (the summary and `loss.png`).
#[derive(Default)]
pub struct Recorder {
    pub steps: Vec<StepRecord>,
    pub evals: Vec<(u64, f64)>,
}

impl Observer for Recorder {
    fn on_event(&mut self, event: &TrainEvent<'_>) -> Result<()> {
        match event {
            TrainEvent::Step(r) => self.steps.push((*r).clone()),
            TrainEvent::Evaluated { step, loss } => self.evals.push((*step, *loss)),
            _ => {}
        }
        Ok(())
    }
}
