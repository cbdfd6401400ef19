//! Pins what a seed draws: the sample order, timestep index and value, and the noise of each
//! micro-step that `flowstep draws` (the trainer's own draw code) reports for a few seeds and
//! options, plus the noise of a second 65,536-value chunk and `flowstep sample`'s starting
//! noise. These are integers and float32 values from flowstep's deterministic counter-based
//! RNG, so the comparison is exact (floats as Rust's shortest round-trip decimal).
//!
//! A change that alters any seed's draws changes every existing run; when that is deliberate,
//! regenerate and say so in the commit:
//!
//!   FLOWSTEP_BLESS=1 cargo test --release --locked --test draws_golden

mod common;

use std::fmt::Write;

use common::*;
use flowstep::sft::{SftConfig, SftSampler};
use flowstep::tensor_file::TensorFile;

const GOLDEN: &str = "tests/golden/draws.csv";
const MICRO_STEPS: usize = 12;

/// `flowstep draws` options: seeds 0, 3, 7 and 2^64-1, with and without repeat, expert
/// boundaries, bf16 timesteps and a noise scale.
const RUNS: [&[&str]; 4] = [
    &["--seed", "0"],
    &["--seed", "3", "--repeat", "2"],
    &["--seed", "7", "--max-timestep-boundary", "0.417", "--bf16-timestep"],
    &["--seed", "18446744073709551615", "--min-timestep-boundary", "0.358", "--noise-scale", "0.5"],
];

fn floats(v: &[f32]) -> String {
    v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(" ")
}

/// The golden text for this build.
fn current() -> String {
    let dir = tempdir();
    let data = dir.path().join("data");
    tiny_dataset(&data, 5, 6);
    let mut text = String::from("what,options,micro_step,sample,timestep_index,timestep,first_noise,noise_sum\n");
    for options in RUNS {
        let out = dir.path().join("draws.safetensors");
        let steps = MICRO_STEPS.to_string();
        let art = tiny_artifacts();
        let args = [&["draws", "--artifacts", path_str(&art), "--data", path_str(&data), "--out", path_str(&out), "--micro-steps", &steps][..], options].concat();
        let r = flowstep(&args);
        assert!(r.status.success(), "{}", stderr(&r));
        let f = TensorFile::open(&out).unwrap_or_else(|e| panic!("{e}"));
        let get = |name: &str| f.read_f32(name).unwrap_or_else(|e| panic!("{e}")).1;
        let (samples, indices, timesteps) = (get("sample"), get("timestep_index"), get("timestep"));
        for i in 0..MICRO_STEPS {
            let noise = get(&format!("noise.{i}"));
            let sum: f64 = noise.iter().map(|&v| v as f64).sum();
            writeln!(text, "draws,{},{i},{},{},{},{},{sum}", options.join(" "), samples[i], indices[i], timesteps[i], floats(&noise[..4])).unwrap_or_default();
        }
    }
    // The second noise chunk (its own stream) and the start of sampling, from the library.
    let sampler = SftSampler::new(SftConfig::default(), 11).unwrap_or_else(|e| panic!("{e}"));
    let mut noise = vec![0.0f32; (1 << 16) + 4];
    sampler.fill_noise(2, &mut noise);
    writeln!(text, "noise_chunk_1,seed 11,2,,,,{},", floats(&noise[1 << 16..])).unwrap_or_default();
    for seed in [0u64, 1] {
        writeln!(text, "initial_noise,seed {seed},,,,,{},", floats(&flowstep::sample::initial_noise(seed, 4))).unwrap_or_default();
    }
    text
}

#[test]
fn draws_match_the_committed_golden() {
    let path = repo().join(GOLDEN);
    let now = current();
    if std::env::var_os("FLOWSTEP_BLESS").is_some() {
        std::fs::write(&path, &now).unwrap_or_else(|e| panic!("{e}"));
        return;
    }
    let golden = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    for (line, (want, got)) in golden.lines().zip(now.lines()).enumerate() {
        assert_eq!(got, want, "{GOLDEN} line {}: a seed now draws something else (regenerate only for a deliberate change; see this file's header)", line + 1);
    }
    assert_eq!(golden.lines().count(), now.lines().count(), "{GOLDEN}: line count");
}
