//! ONNX graph regression tests: the committed tiny artifacts, run by flowstep's executor,
//! reproduce what PyTorch computed for them (`models/tiny/golden.safetensors`, written by
//! `python -m flowstep_export.reference.goldens`). No Python needed.

mod common;

use common::{Golden, init_ort, rel_err, tiny_artifacts};
use flowstep::artifacts::Artifacts;
use flowstep::executor::{AdamW, Batch, TrainingGraphs, load_base_weights};
use flowstep::runtime::SessionOptions;

fn load() -> (Artifacts, TrainingGraphs, Golden) {
    init_ort();
    let artifacts = Artifacts::open(&tiny_artifacts()).unwrap_or_else(|e| panic!("{e}"));
    let a = artifacts.clone();
    let (graphs, _base) = TrainingGraphs::load(&artifacts, &SessionOptions::cpu(), artifacts.manifest.lora.scale(), |m| load_base_weights(&a, None, m))
        .unwrap_or_else(|e| panic!("{e}"));
    let golden = Golden::open(&common::repo().join("models/tiny/golden.safetensors"));
    (artifacts, graphs, golden)
}

fn fill_batch(golden: &Golden) -> Batch {
    let (xs, xv) = golden.get("step.x_t");
    let (cs, cv) = golden.get("step.context");
    // Goldens carry the batch dimension; Batch takes [C, F, H, W] and [L, D].
    let mut batch = Batch::new(&xs[1..], &cs[1..]).unwrap_or_else(|e| panic!("{e}"));
    batch.x_t.extract_tensor_mut().1.copy_from_slice(&xv);
    batch.target.extract_tensor_mut().1.copy_from_slice(&golden.values("step.target"));
    batch.context.extract_tensor_mut().1.copy_from_slice(&cv);
    batch
}

#[test]
fn training_graph_reproduces_pytorch_loss_and_gradient() {
    let (_a, mut graphs, golden) = load();
    let params = golden.values("step.lora_params");
    let zeros = vec![0.0; params.len()];
    graphs.set_state(&params, &zeros, &zeros).unwrap_or_else(|e| panic!("{e}"));
    let mut batch = fill_batch(&golden);
    batch.set_scalars(golden.scalar("step.timestep"), golden.scalar("step.weight"));
    let loss = graphs.accumulate(&batch).unwrap_or_else(|e| panic!("{e}"));
    let grad = graphs.gradient().unwrap_or_else(|e| panic!("{e}"));
    // float32 on both sides, different kernels and summation order: PyTorch vs ORT agree
    // to ~1e-6 relative (see export/tests); 1e-4 of the largest gradient catches any real change.
    let want = golden.scalar("step.loss");
    assert!(((loss - want) / want).abs() < 1e-5, "loss {loss} vs PyTorch {want}");
    let err = rel_err(&grad, &golden.values("step.grad"));
    assert!(err < 1e-4, "gradient rel err {err:.2e}");
    // A second micro-step accumulates: the sum of two equal gradients.
    graphs.accumulate(&batch).unwrap_or_else(|e| panic!("{e}"));
    let twice = graphs.gradient().unwrap_or_else(|e| panic!("{e}"));
    let doubled: Vec<f32> = grad.iter().map(|g| 2.0 * g).collect();
    assert!(rel_err(&twice, &doubled) < 1e-6);
}

/// Three steps of the executor (training graph + AdamW graph) equal a PyTorch loop
/// (eager autograd + torch.optim.AdamW) fed the same x_t, target, timestep and weight.
#[test]
fn three_steps_equal_pytorch_reference_loop() {
    let (_a, mut graphs, golden) = load();
    let init = golden.values("loop.params_init");
    let zeros = vec![0.0; init.len()];
    graphs.set_state(&init, &zeros, &zeros).unwrap_or_else(|e| panic!("{e}"));
    let hp = AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
    for step in 0..3 {
        let p = format!("loop.{step}.");
        let (xs, _) = golden.get(&format!("{p}x_t"));
        let (cs, _) = golden.get("loop.context");
        let mut batch = Batch::new(&xs, &cs).unwrap_or_else(|e| panic!("{e}"));
        batch.x_t.extract_tensor_mut().1.copy_from_slice(&golden.values(&format!("{p}x_t")));
        batch.target.extract_tensor_mut().1.copy_from_slice(&golden.values(&format!("{p}target")));
        batch.context.extract_tensor_mut().1.copy_from_slice(&golden.values("loop.context"));
        batch.set_scalars(golden.scalar(&format!("{p}timestep")), golden.scalar(&format!("{p}weight")));
        let loss = graphs.accumulate(&batch).unwrap_or_else(|e| panic!("{e}"));
        let out = graphs.apply(step as u64 + 1, 1e-3, &hp, graphs.accumulated()).unwrap_or_else(|e| panic!("{e}"));
        let want_loss = golden.scalar(&format!("{p}loss"));
        assert!(((loss - want_loss) / want_loss).abs() < 1e-5, "step {step}: loss {loss} vs {want_loss}");
        let want_norm = golden.scalar(&format!("{p}grad_norm"));
        assert!(((out.grad_norm - want_norm) / want_norm).abs() < 1e-4, "step {step}: grad norm {} vs {want_norm}", out.grad_norm);
        let (params, _, _) = graphs.state().unwrap_or_else(|e| panic!("{e}"));
        let want = golden.values(&format!("{p}params"));
        // AdamW moves every parameter by ~lr = 1e-3 per step; a 1e-6 absolute match is
        // 0.1% of one step, far below any real divergence (a wrong step moves ~1e-3).
        let max_abs = params.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(max_abs < 2e-6, "step {step}: params differ by {max_abs:.2e}");
    }
}
