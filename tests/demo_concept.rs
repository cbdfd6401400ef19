//! The demo's claim, measured on samples: a LoRA trained on the toy world's new colour word
//! ("purple", from purple blobs moving right, down and left) makes the model draw purple
//! blobs for a prompt it never trained on ("purple up"); the base model does not.

mod common;

use common::*;

/// Mean (r, g, b) over the samples in `samples.json`.
fn colours(out: &std::path::Path) -> Vec<[f64; 3]> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("samples.json")).unwrap_or_default()).unwrap_or_else(|e| panic!("{e}"));
    v["samples"]
        .as_array()
        .map(|a| a.iter().map(|s| [0, 1, 2].map(|i| s["rgb"][i].as_f64().unwrap_or(f64::NAN))).collect())
        .unwrap_or_default()
}

/// How purple a sample is: red and blue present, green absent (the colour code puts 1.5 on
/// the r and b channels of a purple blob, 0 on g).
fn purple(rgb: &[f64; 3]) -> f64 {
    rgb[0].min(rgb[2]) - rgb[1]
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
            "--num-samples", "6", "--steps", "30", "--cfg-scale", "1", "--seed", "100", "--out", path_str(out)];
        if let Some(l) = lora {
            args.extend(["--lora", path_str(l)]);
        }
        let r = flowstep(&args);
        assert!(r.status.success(), "{}", stderr(&r));
        colours(out)
    };
    let base = sample(None, "purple-up.safetensors", &dir.path().join("base"));
    let tuned = sample(Some(&lora), "purple-up.safetensors", &dir.path().join("lora"));
    let known = sample(Some(&lora), "yellow-up.safetensors", &dir.path().join("known"));
    eprintln!("base {base:.2?}\nLoRA {tuned:.2?}\nLoRA on 'yellow up' {known:.2?}");
    // With the LoRA: every sample purple (r, b ≈ 1, g ≈ 0 measured; 0.4 leaves a wide margin).
    assert!(tuned.iter().all(|c| purple(c) > 0.4), "with the LoRA the blobs must be purple: {tuned:.2?}");
    // Without it: the base model does not draw purple for the unknown word.
    assert!(base.iter().all(|c| purple(c) < 0.2), "the base model must not already know 'purple': {base:.2?}");
    // A known colour word still gives its colour (yellow: r and g high, not purple).
    assert!(known.iter().all(|c| c[1] > 0.4 && purple(c) < 0.2), "'yellow' must stay yellow: {known:.2?}");
}
