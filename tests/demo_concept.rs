//! The demo's claim, measured on samples: a LoRA trained on the toy world's new concept
//! ("up") makes the model move the blob up for a prompt it never trained on (yellow),
//! and the base model does not.

mod common;

use common::*;

fn motions(out: &std::path::Path) -> Vec<(f64, f64)> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("samples.json")).unwrap_or_default()).unwrap_or_else(|e| panic!("{e}"));
    v["samples"].as_array().map(|a| a.iter().map(|s| (s["dx"].as_f64().unwrap_or(f64::NAN), s["dy"].as_f64().unwrap_or(f64::NAN))).collect()).unwrap_or_default()
}

fn mean(v: &[(f64, f64)]) -> (f64, f64) {
    let n = v.len() as f64;
    (v.iter().map(|m| m.0).sum::<f64>() / n, v.iter().map(|m| m.1).sum::<f64>() / n)
}

#[test]
fn lora_teaches_the_toy_concept() {
    let toy = repo().join("models/toy");
    let art = toy.join("artifacts");
    let dir = tempdir();
    let run = dir.path().join("train");
    let r = flowstep(&["-q", "train", "--artifacts", path_str(&art), "--data", path_str(&toy.join("data/train")), "--out", path_str(&run),
        "--steps", "400", "--lr", "2e-3", "--lr-schedule", "cosine:20:0.1", "--seed", "0"]);
    assert!(r.status.success(), "{}", stderr(&r));
    let lora = run.join("lora.safetensors");
    let sample = |lora: Option<&std::path::Path>, prompt: &str, out: &std::path::Path| {
        let prompt = toy.join("prompts").join(prompt);
        let mut args = vec!["-q", "sample", "--artifacts", path_str(&art), "--context", path_str(&prompt), "--shape", "4,16,16",
            "--num-samples", "6", "--steps", "30", "--seed", "100", "--out", path_str(out)];
        if let Some(l) = lora {
            args.extend(["--lora", path_str(l)]);
        }
        let r = flowstep(&args);
        assert!(r.status.success(), "{}", stderr(&r));
        motions(out)
    };
    let base = sample(None, "yellow-up.safetensors", &dir.path().join("base"));
    let tuned = sample(Some(&lora), "yellow-up.safetensors", &dir.path().join("lora"));
    let right = sample(Some(&lora), "yellow-right.safetensors", &dir.path().join("right"));
    let (bx, by) = mean(&base);
    let (tx, ty) = mean(&tuned);
    let (rx, ry) = mean(&right);
    eprintln!("base dx {bx:+.2} dy {by:+.2}; LoRA dx {tx:+.2} dy {ty:+.2}; LoRA on 'right' dx {rx:+.2} dy {ry:+.2}");
    // Ground truth "up": dy = -9 latent px from first to last frame, dx = 0.
    assert!(ty < -4.5 && tx.abs() < 2.5, "with the LoRA the blob must move up: dx {tx:+.2} dy {ty:+.2}");
    assert!(tuned.iter().filter(|m| m.1 < -3.0).count() >= 5, "most samples must move up: {tuned:?}");
    assert!(by > -3.0, "the base model must not already know 'up': dy {by:+.2}");
    assert!(rx > 4.5 && ry.abs() < 2.5, "the LoRA must keep a known motion: dx {rx:+.2} dy {ry:+.2}");
}
