//! Fused attention (issue 13) on the CPU: `models/tiny-fused` (the tiny export with
//! `--attention fused`, so its graphs hold `com.flowstep` FlashAttention / FlashAttentionGrad
//! nodes) runs through flowstep's CPU reference operators and trains like the chunked
//! `models/tiny`; devices this build has no kernels for are refused in one line.

mod common;

use common::*;
use flowstep::artifacts::Artifacts;
use flowstep::executor::{Batch, DeviceMemory, VelocityGraph, load_base_weights};
use flowstep::metrics::read_jsonl;
use flowstep::runtime::SessionOptions;

fn fused_artifacts() -> std::path::PathBuf {
    repo().join("models/tiny-fused/artifacts")
}

fn open(path: &std::path::Path) -> Artifacts {
    Artifacts::open(path).unwrap_or_else(|e| panic!("{e}"))
}

fn eval_loss(artifacts: &std::path::Path, data: &std::path::Path, lora: &std::path::Path) -> f64 {
    let out = flowstep(&["eval", "--artifacts", path_str(artifacts), "--data", path_str(data), "--lora", path_str(lora), "--json", "--seed", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}"));
    v["eval_loss"].as_f64().unwrap_or(f64::NAN)
}

fn velocity(artifacts: &Artifacts, lora: &[f32]) -> Vec<f32> {
    let options = SessionOptions::cpu().for_artifacts(&artifacts.manifest).unwrap_or_else(|e| panic!("{e}"));
    let memory = DeviceMemory::new(options.device);
    let base = load_base_weights(artifacts, None, &memory).unwrap_or_else(|e| panic!("{e}"));
    let mut graph = VelocityGraph::load(artifacts, &options, &base, artifacts.manifest.lora.scale()).unwrap_or_else(|e| panic!("{e}"));
    // 3 x 10 x 6 latent: 45 tokens, not the export's example size.
    let mut batch = Batch::new(&[16, 3, 10, 6], &[16, 64]).unwrap_or_else(|e| panic!("{e}"));
    batch.x_t.extract_tensor_mut().1.copy_from_slice(&values(16 * 180, 21));
    batch.context.extract_tensor_mut().1.copy_from_slice(&values(16 * 64, 22));
    batch.set_scalars(600.0, 1.0);
    let params = memory.tensor(&[lora.len()], lora).unwrap_or_else(|e| panic!("{e}"));
    let mut v = Vec::new();
    graph.velocity(&params, &batch, 16, &mut v).unwrap_or_else(|e| panic!("{e}"));
    v
}

/// The same seeded run (30 steps, grad-accum 2, lr 2e-3) on both exports: per-step losses,
/// gradient norms, the trained LoRA, its eval loss and its velocity agree.
///
/// Tolerances. Both graphs compute the same float32 math in different orders (the fused
/// kernel sums one query row at a time, the Scan in blocked matmuls), so a single graph
/// output agrees to ~1e-7 relative, as the export's own validation also measures. Training
/// feeds these differences back, and Adam normalises each gradient element: an element whose
/// gradient is near zero can move by up to lr either way. Measured on this run: losses and
/// gradient norms within 9e-8 relative at every step, eval loss 1e-9, velocity 2e-7, LoRA
/// update (trained - initial) 1.3e-4 relative to the largest update. The bounds are 8-100x
/// those, and far below what a wrong operator does (a missing scale or gradient term moves
/// the loss by >1e-2).
#[test]
fn fused_training_matches_chunked() {
    init_ort();
    let dir = tempdir();
    let data = dir.path().join("data");
    tiny_dataset(&data, 3, 4);
    let run = |artifacts: &std::path::Path, name: &str| {
        let out = dir.path().join(name);
        let r = train_cmd(artifacts, &data, &out, 30, &["--grad-accum", "2", "--lora-dtype", "f32"]);
        assert!(r.status.success(), "{name}: {}", stderr(&r));
        out
    };
    let (chunked, fused) = (run(&tiny_artifacts(), "chunked"), run(&fused_artifacts(), "fused"));
    let metrics = |out: &std::path::Path| read_jsonl(&out.join("metrics.jsonl")).unwrap_or_else(|e| panic!("{e}"));
    let (mc, mf) = (metrics(&chunked), metrics(&fused));
    assert_eq!(mc.len(), 30);
    assert_eq!(mf.len(), 30);
    let (mut worst_loss, mut worst_norm) = (0.0f64, 0.0f64);
    for (c, f) in mc.iter().zip(&mf) {
        worst_loss = worst_loss.max((c.loss - f.loss).abs() / c.loss.abs().max(1e-12));
        worst_norm = worst_norm.max(((c.grad_norm - f.grad_norm).abs() / c.grad_norm.abs().max(1e-12)) as f64);
    }
    let lora_info = &open(&tiny_artifacts()).manifest.lora;
    let load = |p: &std::path::Path| flowstep::lora_io::load(p, lora_info).unwrap_or_else(|e| panic!("{e}"));
    let init = load(&tiny_artifacts().join("lora_init.safetensors"));
    let (lc, lf) = (load(&chunked.join("lora.safetensors")), load(&fused.join("lora.safetensors")));
    let update = |l: &[f32]| l.iter().zip(&init).map(|(a, b)| a - b).collect::<Vec<_>>();
    let update_err = rel_err(&update(&lf), &update(&lc));
    println!("fused vs chunked, 30 steps: loss rel {worst_loss:.2e}, grad norm rel {worst_norm:.2e}, LoRA update rel {update_err:.2e}");
    assert!(worst_loss < 1e-5, "loss differs by {worst_loss:.2e} relative");
    assert!(worst_norm < 1e-4, "gradient norm differs by {worst_norm:.2e} relative");
    assert!(update_err < 1e-3, "LoRA update differs by {update_err:.2e} relative");
    assert!(update(&lc).iter().any(|d| d.abs() > 1e-3), "training must move the LoRA for this test to mean anything");

    // The eval graph and the inference graph, with the trained LoRA, at a latent size that is
    // not the export's example.
    let lora = chunked.join("lora.safetensors");
    let (ec, ef) = (eval_loss(&tiny_artifacts(), &data, &lora), eval_loss(&fused_artifacts(), &data, &lora));
    let (vc, vf) = (velocity(&open(&tiny_artifacts()), &lc), velocity(&open(&fused_artifacts()), &lc));
    let v_err = rel_err(&vf, &vc);
    println!("eval loss rel {:.2e}, velocity rel {v_err:.2e}", (ec - ef).abs() / ec.abs());
    assert!((ec - ef).abs() < 1e-5 * ec.abs(), "eval loss {ec} vs {ef}");
    assert!(v_err < 1e-5, "velocity rel err {v_err:.2e}");
}

/// `--device cuda` on these (float32) fused artifacts has no kernels in either build (the
/// default has none on CUDA, `cuda-attention` none in float32), nor does TensorRT: one line
/// naming the operator and the device, before the provider is even tried and before any output
/// is written.
#[test]
fn cuda_on_fused_artifacts_is_refused_in_one_line() {
    let dir = tempdir();
    let data = dir.path().join("data");
    tiny_dataset(&data, 1, 1);
    let out = dir.path().join("out");
    let art = path_str(&fused_artifacts()).to_string();
    for device in ["cuda", "tensorrt:1"] {
        let r = flowstep(&["train", "--artifacts", &art, "--data", path_str(&data), "--out", path_str(&out), "--steps", "1", "--device", device]);
        let line = error_line(&r);
        assert_eq!(stderr(&r).lines().count(), 1, "{}", stderr(&r));
        let named = if device == "cuda" { "cuda:0" } else { "tensorrt:1" };
        assert!(line.contains("com.flowstep::FlashAttention") && line.contains(named) && line.contains("--attention chunked"), "{line}");
        assert!(!out.join("metrics.jsonl").exists() && !out.join("checkpoints").exists(), "no partial output");
    }
    let r = flowstep(&["eval", "--artifacts", &art, "--data", path_str(&data), "--device", "cuda"]);
    assert!(error_line(&r).contains("com.flowstep::FlashAttention"));
}

/// The bfloat16 kernels through ONNX Runtime: tests/golden/flash_attention_bf16.onnx runs both
/// operators on bf16 inputs and, cast to float32, on the float32 kernels (which the training
/// test above checks). They agree to bf16 precision: outputs are rounded to 8 significant bits
/// (0.4%), and the bf16 backward also reads the rounded o; the ONNX reference evaluator's
/// NumPy operators show the same 0.2-0.6% on this model. A wrong kernel is off by O(1).
#[test]
fn bf16_operators_match_float32_to_bf16_precision() {
    use flowstep::runtime::{AttentionImpl, load_session};
    use half::bf16;
    use ort::value::Tensor;

    init_ort();
    let options = SessionOptions { attention: AttentionImpl::Fused, ..SessionOptions::cpu() };
    let mut session = load_session(&repo().join("tests/golden/flash_attention_bf16.onnx"), &options).unwrap_or_else(|e| panic!("{e}"));
    let input = |shape: [usize; 4], seed: u64| {
        let data: Vec<bf16> = values(shape.iter().product(), seed).into_iter().map(|x| bf16::from_f32(3.0 * x)).collect();
        Tensor::from_array((shape.to_vec(), data)).unwrap_or_else(|e| panic!("{e}"))
    };
    let outputs = session
        .run(ort::inputs!["q" => input([1, 5, 2, 8], 1), "k" => input([1, 7, 2, 8], 2), "v" => input([1, 7, 2, 8], 3), "do" => input([1, 5, 2, 8], 4)])
        .unwrap_or_else(|e| panic!("{e}"));
    for name in ["o", "lse", "dq", "dk", "dv"] {
        let widened: Vec<f32> = if name == "lse" {
            outputs[name].try_extract_tensor::<f32>().map(|(_, v)| v.to_vec())
        } else {
            outputs[name].try_extract_tensor::<bf16>().map(|(_, v)| v.iter().map(|x| x.to_f32()).collect())
        }
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let (_, want) = outputs[format!("{name}32").as_str()].try_extract_tensor::<f32>().unwrap_or_else(|e| panic!("{e}"));
        let err = rel_err(&widened, want);
        println!("{name}: bf16 vs f32 rel {err:.2e}");
        assert!(err < 2e-2, "{name}: bf16 vs f32 rel err {err:.2e}");
        assert!(want.iter().any(|x| x.abs() > 1e-3), "{name} is all zeros");
    }
}
