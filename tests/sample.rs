//! `flowstep sample` on the toy model: determinism and classifier-free guidance.

mod common;

use common::*;
use flowstep::tensor_file::TensorFile;

fn latents(dir: &std::path::Path, extra: &[&str]) -> Vec<f32> {
    let toy = repo().join("models/toy");
    let (artifacts, prompt) = (toy.join("artifacts"), toy.join("prompts/yellow-up.safetensors"));
    let mut args = vec!["-q", "sample", "--artifacts", path_str(&artifacts), "--context", path_str(&prompt),
        "--shape", "2,8,8", "--num-samples", "1", "--steps", "6", "--out", path_str(dir)];
    args.extend_from_slice(extra);
    let r = flowstep(&args);
    assert!(r.status.success(), "{}", stderr(&r));
    for f in ["samples.png", "samples.gif", "samples.json"] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    TensorFile::open(&dir.join("samples.safetensors")).and_then(|f| f.read_f32("latents")).unwrap_or_else(|e| panic!("{e}")).1
}

#[test]
fn guidance_against_the_same_prompt_is_no_guidance() {
    let dir = tempdir();
    let prompt = repo().join("models/toy/prompts/yellow-up.safetensors");
    let plain = latents(&dir.path().join("plain"), &[]);
    assert_eq!(plain, latents(&dir.path().join("again"), &[]), "same seed, same samples");
    // v = v_neg + s·(v - v_neg) is exactly v when the negative prompt is the prompt.
    let same = latents(&dir.path().join("same"), &["--cfg-scale", "4", "--negative-context", path_str(&prompt)]);
    assert_eq!(plain, same);
    // Against the empty (zero) context, guidance changes the result.
    let guided = latents(&dir.path().join("guided"), &["--cfg-scale", "4"]);
    assert!(rel_err(&guided, &plain) > 1e-2, "guidance had no effect");
    let other_seed = latents(&dir.path().join("seed"), &["--seed", "1"]);
    assert_ne!(plain, other_seed);
}
