//! GPU parity of the CUDA attention operators (`--features cuda-attention`) with PyTorch:
//! needs a CUDA device and the cases written there by `scripts/gpu_attention_parity.py`, so it
//! is ignored unless asked for; `scripts/gpu_bench.sh flowstep` runs it (docs/fused-attention.md).
//!
//! Each case holds bf16 or fp16 q, k, v [1, S, 12, 128] and an upstream gradient dO, PyTorch's
//! flash SDPA forward and backward on them, and the float32 autograd of softmax attention on
//! the same (rounded) inputs. tests/golden/flash_attention_pair_*.onnx runs FlashAttention then
//! FlashAttentionGrad on its o and lse, as a training graph does. Per output we measure
//! max |x - ref32| / max |ref32| for flowstep and for PyTorch and require flowstep's to be at
//! most twice PyTorch's plus one output rounding (bf16 2^-8, fp16 2^-11): as accurate as the
//! fused kernels PyTorch trains with. lse (float32, no PyTorch counterpart in the public API)
//! must match the float32 lse to 1e-4 relative. Errors go to $FLOWSTEP_PARITY_OUT/parity.jsonl.
//! `FLOWSTEP_PARITY_DEVICE=cpu` runs the bf16 cases on the CPU reference kernels instead (to
//! check this harness on small cases without a GPU; the CPU kernels have no fp16).
#![cfg(feature = "cuda-attention")]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};

use common::*;
use flowstep::runtime::{AttentionImpl, Device, SessionOptions, load_session};
use flowstep::tensor_file::TensorFile;
use half::{bf16, f16};
use ort::value::{DynValue, Tensor};

/// max |a - b| / max |b|: the error in units of the output's scale.
fn scaled_err(a: &[f32], b: &[f32]) -> f64 {
    let diff = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max);
    diff / b.iter().map(|y| (*y as f64).abs()).fold(0.0, f64::max).max(1e-30)
}

fn input(file: &TensorFile, name: &str, fp16: bool) -> DynValue {
    if fp16 {
        let (shape, values) = file.read_f32(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        let values: Vec<f16> = values.into_iter().map(f16::from_f32).collect();
        Tensor::from_array((shape, values)).unwrap_or_else(|e| panic!("{name}: {e}")).into_dyn()
    } else {
        let (shape, values) = file.read_bf16(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        Tensor::from_array((shape, values)).unwrap_or_else(|e| panic!("{name}: {e}")).into_dyn()
    }
}

fn widened(value: &DynValue, name: &str, fp16: bool) -> Vec<f32> {
    let result = if name == "lse" {
        value.try_extract_tensor::<f32>().map(|(_, v)| v.to_vec())
    } else if fp16 {
        value.try_extract_tensor::<f16>().map(|(_, v)| v.iter().map(|x| x.to_f32()).collect())
    } else {
        value.try_extract_tensor::<bf16>().map(|(_, v)| v.iter().map(|x| x.to_f32()).collect())
    };
    result.unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn cases(dir: &Path) -> Vec<PathBuf> {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap_or_else(|e| panic!("{e}")).path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    cases.sort();
    cases
}

#[test]
#[ignore = "needs a CUDA device and the cases of scripts/gpu_attention_parity.py (scripts/gpu_bench.sh flowstep)"]
fn cuda_operators_match_pytorch_sdpa() {
    let dir = PathBuf::from(std::env::var_os("FLOWSTEP_PARITY_DIR").expect("FLOWSTEP_PARITY_DIR: the cases directory"));
    let report = PathBuf::from(std::env::var_os("FLOWSTEP_PARITY_OUT").unwrap_or_else(|| dir.clone().into())).join("parity.jsonl");
    let mut log = std::fs::File::create(&report).unwrap_or_else(|e| panic!("{}: {e}", report.display()));
    init_ort();
    let device: Device = std::env::var("FLOWSTEP_PARITY_DEVICE").unwrap_or_else(|_| "cuda".into()).parse().unwrap_or_else(|e| panic!("{e}"));
    let options = SessionOptions { device, attention: AttentionImpl::Fused, ..SessionOptions::cpu() };
    let mut failures = Vec::new();
    let all = cases(&dir);
    assert!(!all.is_empty(), "no cases in {}", dir.display());
    for case in all {
        let name = case.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let fp16 = name.contains("fp16");
        if fp16 && device == Device::Cpu {
            println!("{name}: skipped on cpu (no fp16 reference kernels)");
            continue;
        }
        let file = TensorFile::open(&case).unwrap_or_else(|e| panic!("{e}"));
        // Relative: cargo runs tests from the repository root, and so does scripts/gpu_bench.sh
        // on the device, where the build-time repository path does not exist.
        let model = PathBuf::from(format!("tests/golden/flash_attention_pair_{}.onnx", if fp16 { "fp16" } else { "bf16" }));
        let mut session = load_session(&model, &options).unwrap_or_else(|e| panic!("{e}"));
        let start = std::time::Instant::now();
        let outputs = session
            .run(ort::inputs![
                "q" => input(&file, "q", fp16),
                "k" => input(&file, "k", fp16),
                "v" => input(&file, "v", fp16),
                "do" => input(&file, "do", fp16)
            ])
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let first_run_s = start.elapsed().as_secs_f64();
        let rounding = if fp16 { 2f64.powi(-11) } else { 2f64.powi(-8) };
        for out in ["o", "lse", "dq", "dk", "dv"] {
            let got = widened(&outputs[out], out, fp16);
            let (_, want) = file.read_f32(&format!("{out}_ref")).unwrap_or_else(|e| panic!("{e}"));
            let ours = scaled_err(&got, &want);
            let torch = (out != "lse").then(|| scaled_err(&file.read_f32(&format!("{out}_sdpa")).unwrap_or_else(|e| panic!("{e}")).1, &want));
            let bound = torch.map_or(1e-4, |t| 2.0 * t + rounding);
            writeln!(
                log,
                "{}",
                serde_json::json!({"case": name, "device": device.to_string(), "output": out, "flowstep_err": ours, "pytorch_sdpa_err": torch, "bound": bound, "first_run_s": first_run_s})
            )
            .unwrap_or_else(|e| panic!("{e}"));
            println!("{name} {out}: flowstep {ours:.2e}, PyTorch SDPA {}, bound {bound:.2e}", torch.map_or("-".into(), |t| format!("{t:.2e}")));
            if ours.is_nan() || ours > bound {
                failures.push(format!("{name} {out}: {ours:.2e} > {bound:.2e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}
