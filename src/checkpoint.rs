//! Resumable checkpoints: `OUT/checkpoints/step-XXXXXX/` holding the LoRA parameters, AdamW
//! moments and the trainer's position. A checkpoint is written into a hidden temp directory
//! and renamed into place, so it is complete or absent; the newest complete one resumes.
//! `SHA256SUMS` (the `sha256sum` format) covers both files and is verified on load.
//! `trainer.json` also describes the LoRA file of its parameters (layout and metadata), so
//! that `flowstep export-lora` writes it from the checkpoint alone. A Wan2.2 A14B pair job
//! keeps both experts' LoRAs and optimizer states in one checkpoint, its tensors named
//! `high_noise.params` ... and `low_noise.params` ..., its LoRAs described under `experts`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use sha2::{Digest, Sha256};

use crate::artifacts::{LoraInfo, sha256_file};
use crate::error::{Error, IoContext, Result};
use crate::tensor_file::{OutTensor, SaveDtype, TensorFile, encode, sync_dir, write_atomic};

pub const STATE_FILE: &str = "state.safetensors";
pub const TRAINER_FILE: &str = "trainer.json";
pub const SUMS_FILE: &str = "SHA256SUMS";
/// `trainer.json` and `SHA256SUMS` are a few kB.
const MAX_RECORD_BYTES: u64 = 1 << 20;

/// Everything besides the tensors that a resumed run needs to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Micro-steps (samples) consumed; the SFT draws and the data order are keyed by it.
    pub micro_steps: u64,
    pub skipped_steps: u64,
    pub skipped_samples: u64,
    /// The run configuration this checkpoint belongs to (checked on resume).
    pub run: serde_json::Value,
    /// The eval loss before the first step, kept so that a resumed run still reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_before: Option<f64>,
    /// A pair job: updates applied to each expert's LoRA (its AdamW bias correction counts
    /// them), by role. Empty for one model, whose count is `step - skipped_steps`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub expert_updates: BTreeMap<String, u64>,
}

/// The LoRA file a checkpoint's parameters make: the export's LoRA layout and the file's
/// metadata (kohya's `ss_*` keys, `modelspec.*`, `flowstep.*`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoraSpec {
    pub info: LoraInfo,
    pub metadata: BTreeMap<String, String>,
}

/// `trainer.json`: the trainer's position and the LoRA description (absent in checkpoints
/// written before it existed).
#[derive(Serialize, Deserialize)]
struct TrainerFile {
    #[serde(flatten)]
    trainer: TrainerState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lora: Option<LoraSpec>,
    /// A pair job: each expert's LoRA, by role (then `lora` is absent).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    experts: BTreeMap<String, LoraSpec>,
}

/// One checkpoint's tensors.
pub struct CheckpointState {
    pub params: Vec<f32>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

/// One trained LoRA of a checkpoint: the single model's (`expert` None) or one expert's.
pub struct SavedLora<'a> {
    pub expert: Option<&'a str>,
    pub spec: &'a LoraSpec,
    pub state: &'a CheckpointState,
}

/// `params`, or `high_noise.params` for an expert of a pair.
fn tensor_name(expert: Option<&str>, name: &str) -> String {
    match expert {
        Some(role) => format!("{role}.{name}"),
        None => name.to_string(),
    }
}

const STATE_TENSORS: [&str; 3] = ["params", "exp_avg", "exp_avg_sq"];

pub fn checkpoints_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

pub fn step_dir(out: &Path, step: u64) -> PathBuf {
    checkpoints_dir(out).join(format!("step-{step:06}"))
}

/// Writes a checkpoint atomically (temp dir + rename) and returns its directory.
pub fn save(out: &Path, trainer: &TrainerState, loras: &[SavedLora<'_>]) -> Result<PathBuf> {
    let root = checkpoints_dir(out);
    std::fs::create_dir_all(&root).at(&root)?;
    let final_dir = step_dir(out, trainer.step);
    let tmp = root.join(format!(".tmp-step-{:06}-{}", trainer.step, std::process::id()));
    let result = (|| {
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).at(&tmp)?;
        }
        std::fs::create_dir(&tmp).at(&tmp)?;
        let mut tensors = Vec::new();
        let mut file = TrainerFile { trainer: trainer.clone(), lora: None, experts: BTreeMap::new() };
        for lora in loras {
            let s = lora.state;
            for (name, values) in STATE_TENSORS.into_iter().zip([&s.params, &s.m, &s.v]) {
                tensors.push(OutTensor { name: tensor_name(lora.expert, name), shape: vec![values.len()], values: values.clone() });
            }
            match lora.expert {
                Some(role) => file.experts.insert(role.to_string(), lora.spec.clone()),
                None => file.lora.replace(lora.spec.clone()),
            };
        }
        let bytes = encode(&tensors, SaveDtype::F32, None)?;
        write_atomic(&tmp.join(STATE_FILE), &bytes)?;
        let json = serde_json::to_vec_pretty(&file).map_err(|e| Error::Config(e.to_string()))?;
        write_atomic(&tmp.join(TRAINER_FILE), &json)?;
        let sums = format!("{}  {STATE_FILE}\n{}  {TRAINER_FILE}\n", hex(&Sha256::digest(&bytes)), hex(&Sha256::digest(&json)));
        write_atomic(&tmp.join(SUMS_FILE), sums.as_bytes())?;
        if final_dir.exists() {
            // Re-saving the same step (a resumed run stopping again): replace it whole.
            std::fs::remove_dir_all(&final_dir).at(&final_dir)?;
        }
        std::fs::rename(&tmp, &final_dir).at(&final_dir)?;
        sync_dir(&root)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.map(|_| final_dir)
}

/// Complete checkpoints, oldest first (hidden temp directories are ignored).
pub fn list(out: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let root = checkpoints_dir(out);
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&root).at(&root)? {
        let path = entry.at(&root)?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse::<u64>().ok())
            && path.join(STATE_FILE).is_file()
            && path.join(TRAINER_FILE).is_file()
        {
            found.push((step, path));
        }
    }
    found.sort();
    Ok(found)
}

/// Removes temp directories left by a process killed while saving.
pub fn clean_partial(out: &Path) -> Result<usize> {
    let root = checkpoints_dir(out);
    if !root.is_dir() {
        return Ok(0);
    }
    let mut removed = 0;
    for entry in std::fs::read_dir(&root).at(&root)? {
        let path = entry.at(&root)?.path();
        if path.file_name().is_some_and(|n| n.to_string_lossy().starts_with(".tmp-")) {
            std::fs::remove_dir_all(&path).at(&path)?;
            removed += 1;
        }
    }
    Ok(removed)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Both files match `SHA256SUMS`.
fn verify(dir: &Path) -> Result<()> {
    let bad = |reason: String| Error::Checkpoint { path: dir.to_path_buf(), reason };
    let sums_path = dir.join(SUMS_FILE);
    if !sums_path.is_file() {
        return Err(bad(format!("has no {SUMS_FILE}, so it cannot be verified (written by an older flowstep, or damaged)")));
    }
    let sums = crate::small_file::read_text(&sums_path, "checkpoint's checksum list", MAX_RECORD_BYTES)?;
    for file in [STATE_FILE, TRAINER_FILE] {
        let want = sums.lines().find_map(|l| l.strip_suffix(file).and_then(|h| h.strip_suffix("  ")));
        let Some(want) = want else { return Err(bad(format!("{SUMS_FILE} lists no checksum for {file}"))) };
        let got = sha256_file(&dir.join(file))?;
        if got != want {
            return Err(bad(format!("{file} does not match its checksum (sha256 {got}, recorded {want}): the checkpoint is damaged; delete this step directory to resume from the one before")));
        }
    }
    Ok(())
}

fn read_trainer_file(dir: &Path) -> Result<TrainerFile> {
    let path = dir.join(TRAINER_FILE);
    let text = crate::small_file::read_text(&path, "checkpoint's trainer record", MAX_RECORD_BYTES)?;
    serde_json::from_str(&text).map_err(|e| Error::Checkpoint { path, reason: format!("unreadable: {e}") })
}

/// Loads one checkpoint, verifying its checksums and checking its tensors.
pub fn load(dir: &Path, num_params: usize) -> Result<(TrainerState, CheckpointState)> {
    let (trainer, mut states) = load_models(dir, &[(None, num_params)])?;
    let state = states.pop().ok_or_else(|| Error::Checkpoint { path: dir.to_path_buf(), reason: "holds no LoRA state".into() })?;
    Ok((trainer, state))
}

/// Loads one checkpoint with the LoRA state of each model in `models` (`None`: the single
/// model; `Some(role)`: an expert of a pair) and its parameter count, in that order. A
/// checkpoint of a pair job is refused for a single model, and the reverse, in one line.
pub fn load_models(dir: &Path, models: &[(Option<&str>, usize)]) -> Result<(TrainerState, Vec<CheckpointState>)> {
    verify(dir)?;
    let file = read_trainer_file(dir)?;
    let saved: Vec<&str> = file.experts.keys().map(String::as_str).collect();
    let wanted: Vec<&str> = models.iter().filter_map(|(role, _)| *role).collect();
    if saved != wanted {
        let describe = |roles: &[&str]| if roles.is_empty() { "one model".to_string() } else { format!("a Wan2.2 expert pair ({})", roles.join(", ")) };
        return Err(Error::Checkpoint {
            path: dir.to_path_buf(),
            reason: format!("is a checkpoint of {}, but this run trains {}; resume it with the same --artifacts/--expert-artifacts, or choose another --out", describe(&saved), describe(&wanted)),
        });
    }
    let states = models.iter().map(|&(role, p)| read_state(dir, role, p)).collect::<Result<Vec<_>>>()?;
    Ok((file.trainer, states))
}

/// A checkpoint's LoRA description and parameters (`flowstep export-lora`), verified.
pub fn load_lora(dir: &Path) -> Result<(LoraSpec, Vec<f32>)> {
    let file = read_checkpoint_record(dir)?;
    let Some(lora) = file.lora else {
        if !file.experts.is_empty() {
            let roles: Vec<&str> = file.experts.keys().map(String::as_str).collect();
            return Err(Error::Checkpoint { path: dir.to_path_buf(), reason: format!("holds a Wan2.2 expert pair ({}); pass --expert ROLE to write one expert's LoRA", roles.join(", ")) });
        }
        return Err(Error::Checkpoint { path: dir.to_path_buf(), reason: "was written by an older flowstep and does not describe its LoRA; resume the run with this flowstep to write a checkpoint that does".into() });
    };
    let params = read_state(dir, None, lora.info.num_params)?.params;
    Ok((lora, params))
}

/// One expert's LoRA description and parameters from a pair job's checkpoint
/// (`flowstep export-lora --expert ROLE`), verified.
pub fn load_expert_lora(dir: &Path, role: &str) -> Result<(LoraSpec, Vec<f32>)> {
    let file = read_checkpoint_record(dir)?;
    let Some(lora) = file.experts.get(role).cloned() else {
        let held = if file.experts.is_empty() { "one model's LoRA, not an expert pair's (leave out --expert)".to_string() } else { format!("the experts {}", file.experts.keys().cloned().collect::<Vec<_>>().join(", ")) };
        return Err(Error::Checkpoint { path: dir.to_path_buf(), reason: format!("has no {role} expert: it holds {held}") });
    };
    let params = read_state(dir, Some(role), lora.info.num_params)?.params;
    Ok((lora, params))
}

/// The verified `trainer.json` of the checkpoint directory `dir`, which must be one.
fn read_checkpoint_record(dir: &Path) -> Result<TrainerFile> {
    if !dir.join(TRAINER_FILE).is_file() || !dir.join(STATE_FILE).is_file() {
        let what = if dir.join("checkpoints").is_dir() { "is a training output directory; pass one of its checkpoints/step-XXXXXX directories" } else { "is not a flowstep checkpoint directory (step-XXXXXX with trainer.json and state.safetensors)" };
        return Err(Error::Checkpoint { path: dir.to_path_buf(), reason: what.into() });
    }
    verify(dir)?;
    read_trainer_file(dir)
}

fn read_state(dir: &Path, expert: Option<&str>, num_params: usize) -> Result<CheckpointState> {
    let file = TensorFile::open(&dir.join(STATE_FILE))?;
    let read = |name: &str| -> Result<Vec<f32>> {
        let name = &tensor_name(expert, name);
        let (shape, values) = file.read_f32(name)?;
        if shape != [num_params] {
            return Err(Error::Checkpoint { path: dir.to_path_buf(), reason: format!("`{name}` has shape {shape:?}, the artifacts have {num_params} LoRA parameters") });
        }
        Ok(values)
    };
    Ok(CheckpointState { params: read("params")?, m: read("exp_avg")?, v: read("exp_avg_sq")? })
}

/// True when `path` is a checkpoint directory or one of its files, not a LoRA file.
pub fn is_checkpoint(path: &Path) -> bool {
    let dir = if path.is_dir() { Some(path) } else { path.parent().filter(|_| path.file_name().is_some_and(|n| n == STATE_FILE || n == TRAINER_FILE)) };
    dir.is_some_and(|d| d.join(STATE_FILE).is_file() && d.join(TRAINER_FILE).is_file())
}

/// Which checkpoints to delete after a save so that the newest `keep` remain.
pub fn to_prune(steps: &[(u64, PathBuf)], keep: usize) -> Vec<PathBuf> {
    if keep == 0 || steps.len() <= keep {
        return Vec::new();
    }
    steps[..steps.len() - keep].iter().map(|(_, p)| p.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_list_load_prune() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let out = dir.path();
        let state = CheckpointState { params: vec![1.0, 2.0], m: vec![0.1, 0.2], v: vec![0.01, 0.02] };
        let info = LoraInfo { rank: 1, alpha: 1.0, targets: vec!["q".into()], num_params: 2, tensors: Vec::new() };
        let lora = LoraSpec { info, metadata: BTreeMap::from([("ss_network_dim".into(), "1".into())]) };
        for step in [5, 10, 15] {
            let trainer = TrainerState { step, micro_steps: step * 2, skipped_steps: 0, skipped_samples: 0, run: serde_json::json!({"seed": 1}), eval_before: Some(0.5), expert_updates: BTreeMap::new() };
            save(out, &trainer, &[SavedLora { expert: None, spec: &lora, state: &state }])?;
        }
        std::fs::create_dir_all(checkpoints_dir(out).join(".tmp-step-000020-1")).at(out)?;
        let listed = list(out)?;
        assert_eq!(listed.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [5, 10, 15]);
        let (trainer, loaded) = load(&listed[2].1, 2)?;
        assert_eq!((trainer.step, trainer.micro_steps, trainer.eval_before), (15, 30, Some(0.5)));
        let (spec, params) = load_lora(&listed[2].1)?;
        assert_eq!((spec.metadata, params), (lora.metadata.clone(), state.params.clone()));
        assert!(is_checkpoint(&listed[2].1) && is_checkpoint(&listed[2].1.join(STATE_FILE)) && !is_checkpoint(out));
        assert!(matches!(load_lora(out), Err(Error::Checkpoint { .. })), "OUT is not a checkpoint");
        assert_eq!((loaded.params, loaded.m, loaded.v), (state.params.clone(), state.m.clone(), state.v.clone()));
        assert!(load(&listed[2].1, 3).is_err(), "a parameter count mismatch is an error");
        let state_file = listed[1].1.join(STATE_FILE);
        let mut bytes = std::fs::read(&state_file).at(&state_file)?;
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&state_file, bytes).at(&state_file)?;
        assert!(matches!(load(&listed[1].1, 2), Err(Error::Checkpoint { .. })), "a flipped byte is caught");
        assert_eq!(to_prune(&listed, 2), vec![listed[0].1.clone()]);
        assert_eq!(clean_partial(out)?, 1);
        Ok(())
    }
}
