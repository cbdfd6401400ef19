//! `flowstep sample` on the toy model: determinism, classifier-free guidance, Wan's defaults,
//! sizes in pixels, refusing to overwrite, the prompt text in the metadata, the progress bar.

mod common;

use std::collections::HashMap;

use common::*;
use flowstep::tensor_file::{OutTensor, SaveDtype, TensorFile, encode, write_atomic};

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
    let plain = latents(&dir.path().join("plain"), &["--cfg-scale", "1"]);
    assert_eq!(plain, latents(&dir.path().join("again"), &["--cfg-scale", "1"]), "same seed, same samples");
    // v = v_neg + s·(v - v_neg) is exactly v when the negative prompt is the prompt.
    let same = latents(&dir.path().join("same"), &["--cfg-scale", "4", "--negative-context", path_str(&prompt)]);
    assert_eq!(plain, same);
    // Against the empty (zero) context, guidance changes the result.
    let guided = latents(&dir.path().join("guided"), &["--cfg-scale", "4"]);
    assert!(rel_err(&guided, &plain) > 1e-2, "guidance had no effect");
    let other_seed = latents(&dir.path().join("seed"), &["--cfg-scale", "1", "--seed", "1"]);
    assert_ne!(plain, other_seed);
}

fn toy_sample(out: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let toy = repo().join("models/toy");
    let (artifacts, prompt) = (toy.join("artifacts"), toy.join("prompts/yellow-up.safetensors"));
    let mut args = vec!["-q", "sample", "--artifacts", path_str(&artifacts), "--context", path_str(&prompt), "--num-samples", "1", "--out", path_str(out)];
    args.extend_from_slice(extra);
    flowstep(&args)
}

fn read_latents(out: &std::path::Path) -> Vec<f32> {
    TensorFile::open(&out.join("samples.safetensors")).and_then(|f| f.read_f32("latents")).unwrap_or_else(|e| panic!("{e}")).1
}

fn summary(out: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("samples.json")).unwrap_or_else(|e| panic!("{e}"))).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn defaults_are_wans_fifty_steps_at_guidance_five() {
    let dir = tempdir();
    let ok = |r: std::process::Output| assert!(r.status.success(), "{}", stderr(&r));
    ok(toy_sample(&dir.path().join("default"), &["--shape", "1,8,8"]));
    ok(toy_sample(&dir.path().join("explicit"), &["--shape", "1,8,8", "--steps", "50", "--cfg-scale", "5"]));
    ok(toy_sample(&dir.path().join("unguided"), &["--shape", "1,8,8", "--steps", "50", "--cfg-scale", "1"]));
    let meta = summary(&dir.path().join("default"));
    assert_eq!((meta["steps"].as_u64(), meta["cfg_scale"].as_f64()), (Some(50), Some(5.0)));
    let default = read_latents(&dir.path().join("default"));
    assert_eq!(default, read_latents(&dir.path().join("explicit")));
    assert_ne!(default, read_latents(&dir.path().join("unguided")));
}

#[test]
fn pixel_sizes_map_to_latents_as_wans_vae() {
    let dir = tempdir();
    // 9 frames of 64×128 pixels: (9 − 1)/4 + 1 = 3 latent frames of 8×16.
    let pixels = toy_sample(&dir.path().join("pixels"), &["--width", "128", "--height", "64", "--frames", "9", "--steps", "2"]);
    assert!(pixels.status.success(), "{}", stderr(&pixels));
    let latent = toy_sample(&dir.path().join("latent"), &["--shape", "3,8,16", "--steps", "2"]);
    assert!(latent.status.success(), "{}", stderr(&latent));
    assert_eq!(read_latents(&dir.path().join("pixels")), read_latents(&dir.path().join("latent")));
    assert_eq!(summary(&dir.path().join("pixels"))["shape"], serde_json::json!([16, 3, 8, 16]));
    let out = dir.path().join("bad");
    assert_error(&toy_sample(&out, &["--width", "128", "--height", "64", "--frames", "8"]), &["--frames 8", "4n+1"]);
    assert_error(&toy_sample(&out, &["--width", "120", "--height", "64", "--frames", "9"]), &["--width 120", "multiple of 16"]);
    assert_error(&toy_sample(&out, &["--width", "128", "--height", "0", "--frames", "9"]), &["--height 0", "multiple of 16"]);
    assert!(!out.exists(), "a refused size writes nothing");
    for partial in [&["--width", "128"][..], &["--width", "128", "--height", "64", "--frames", "9", "--shape", "3,8,16"], &[]] {
        let r = toy_sample(&out, partial);
        assert!(!r.status.success() && r.status.code() == Some(2), "{partial:?}: clap usage error expected: {}", stderr(&r));
    }
}

#[test]
fn an_existing_out_is_replaced_only_with_overwrite() {
    let dir = tempdir();
    let out = dir.path().join("s");
    let first = toy_sample(&out, &["--shape", "1,8,8", "--steps", "2", "--seed", "1"]);
    assert!(first.status.success(), "{}", stderr(&first));
    std::fs::write(out.join("notes.txt"), "mine").unwrap_or_else(|e| panic!("{e}"));
    let before = read_latents(&out);
    assert_error(&toy_sample(&out, &["--shape", "1,8,8", "--steps", "2", "--seed", "2"]), &["--out", "already exists", "--overwrite"]);
    assert_eq!(read_latents(&out), before, "a refused run leaves the old samples");
    let again = toy_sample(&out, &["--shape", "1,8,8", "--steps", "2", "--seed", "2", "--overwrite"]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_ne!(read_latents(&out), before, "--overwrite wrote the new samples");
    assert!(!out.join("notes.txt").exists(), "--overwrite replaces the directory as a whole");
    let siblings: Vec<_> = std::fs::read_dir(dir.path()).unwrap_or_else(|e| panic!("{e}")).filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    assert_eq!(siblings, vec![std::ffi::OsString::from("s")], "no staging or old copy left beside it");
    // An empty directory (made beforehand) is not an overwrite.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap_or_else(|e| panic!("{e}"));
    let r = toy_sample(&empty, &["--shape", "1,8,8", "--steps", "2"]);
    assert!(r.status.success(), "{}", stderr(&r));
}

#[test]
fn the_prompt_text_of_the_context_file_is_in_the_metadata() {
    let dir = tempdir();
    let (shape, values) = TensorFile::open(&repo().join("models/toy/prompts/yellow-up.safetensors")).and_then(|f| f.read_f32("context")).unwrap_or_else(|e| panic!("{e}"));
    let ctx = dir.path().join("ctx.safetensors");
    let meta = HashMap::from([("prompt".to_string(), "yellow up".to_string())]);
    let bytes = encode(&[OutTensor { name: "context".into(), shape, values }], SaveDtype::F32, Some(meta)).unwrap_or_else(|e| panic!("{e}"));
    write_atomic(&ctx, &bytes).unwrap_or_else(|e| panic!("{e}"));
    let out = dir.path().join("s");
    let r = flowstep(&["-q", "sample", "--artifacts", path_str(&repo().join("models/toy/artifacts")), "--context", path_str(&ctx),
        "--shape", "1,8,8", "--steps", "2", "--num-samples", "1", "--out", path_str(&out)]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert_eq!(summary(&out)["prompt"], "yellow up");
}

/// On a terminal `sample` draws a progress bar (`script` gives it one); off a terminal, none.
#[test]
fn a_progress_bar_on_a_terminal_only() {
    let dir = tempdir();
    let toy = repo().join("models/toy");
    let command = format!("{} sample --artifacts {} --context {} --shape 1,8,8 --steps 7 --num-samples 2 --cfg-scale 1 --out {}",
        env!("CARGO_BIN_EXE_flowstep"), toy.join("artifacts").display(), toy.join("prompts/yellow-up.safetensors").display(), dir.path().join("tty").display());
    let r = std::process::Command::new("script").args(["-qefc", &command, "/dev/null"]).output().unwrap_or_else(|e| panic!("script: {e}"));
    let terminal = String::from_utf8_lossy(&r.stdout);
    assert!(r.status.success(), "{terminal}");
    assert!(terminal.contains("sampling") && terminal.contains("/14"), "no bar over 2 × 7 steps on the terminal: {terminal}");
    let piped = flowstep(&["sample", "--artifacts", path_str(&toy.join("artifacts")), "--context", path_str(&toy.join("prompts/yellow-up.safetensors")),
        "--shape", "1,8,8", "--steps", "7", "--out", path_str(&dir.path().join("piped"))]);
    assert!(piped.status.success() && !stderr(&piped).contains("sampling"), "{}", stderr(&piped));
}

/// Samples during training go to folders named after the prompt text the context file records
/// (encode_prompts writes it), else after the file.
#[test]
fn training_sample_folders_carry_the_prompt_text() {
    let dir = tempdir();
    let data = dir.path().join("data");
    tiny_dataset(&data, 2, 1);
    let prompts = dir.path().join("prompts");
    std::fs::create_dir_all(&prompts).unwrap_or_else(|e| panic!("{e}"));
    let context = || vec![tensor("context", &[16, 64], values(16 * 64, 5))];
    let meta = HashMap::from([("prompt".to_string(), "A red fox, in snow!".to_string())]);
    write_atomic(&prompts.join("prompt-000.safetensors"), &encode(&context(), SaveDtype::F32, Some(meta)).unwrap_or_else(|e| panic!("{e}"))).unwrap_or_else(|e| panic!("{e}"));
    write_sample(&prompts.join("plain.safetensors"), &context());
    let list = prompts.join("prompts.txt");
    std::fs::write(&list, "prompt-000.safetensors steps=2\nplain.safetensors steps=2\n").unwrap_or_else(|e| panic!("{e}"));
    let out = dir.path().join("out");
    let r = train_cmd(&tiny_artifacts(), &data, &out, 1, &["--sample-every", "0", "--sample-prompts", path_str(&list)]);
    assert!(r.status.success(), "{}", stderr(&r));
    for name in ["00-a-red-fox-in-snow", "01-plain"] {
        assert!(out.join("samples/step-000001").join(name).join("samples.safetensors").is_file(), "no sample folder {name}");
    }
}
