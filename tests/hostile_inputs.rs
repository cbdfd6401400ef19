//! Hostile and careless inputs, round 2 (issue 21): the VAE decoder's manifest, small side
//! files, LoRAs made for another model, conditioning a model does not take, options checked
//! late, partial outputs, and the minor defects of the older surfaces. Every case runs the real
//! binary with a time limit and expects one `error:` line naming the file or flag.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

// ── Fixtures ─────────────────────────────────────────────────────────────────────────────

/// Protobuf wire format, enough to write small ONNX graphs by hand.
fn varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn message(field: u64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    varint(field << 3 | 2, &mut out);
    varint(body.len() as u64, &mut out);
    out.extend_from_slice(body);
    out
}

fn int(field: u64, value: u64) -> Vec<u8> {
    let mut out = Vec::new();
    varint(field << 3, &mut out);
    varint(value, &mut out);
    out
}

/// A float32 graph input or output of unknown shape (ValueInfoProto).
fn value_info(field: u64, name: &str) -> Vec<u8> {
    message(field, &[message(1, name.as_bytes()), message(2, &message(1, &int(1, 1)))].concat())
}

/// An initializer of 4 float32s stored in the external file `location` (TensorProto).
fn external_tensor(name: &str, location: &str) -> Vec<u8> {
    let entry = |k: &str, v: &str| message(13, &[message(1, k.as_bytes()), message(2, v.as_bytes())].concat());
    [int(1, 4), int(2, 1), message(8, name.as_bytes()), entry("location", location), entry("offset", "0"), entry("length", "16"), int(14, 1)].concat()
}

/// An ONNX model (opset 17) whose outputs are Identity copies of inputs: `(input, output)` pairs.
fn identity_graph(pairs: &[(&str, &str)], extra_graph_fields: &[u8]) -> Vec<u8> {
    let mut graph = Vec::new();
    for (i, o) in pairs {
        graph.extend(message(1, &[message(1, i.as_bytes()), message(2, o.as_bytes()), message(4, b"Identity")].concat()));
    }
    graph.extend(message(2, b"stub"));
    graph.extend(extra_graph_fields);
    for i in graph_inputs(pairs) {
        graph.extend(value_info(11, i));
    }
    for (_, o) in pairs {
        graph.extend(value_info(12, o));
    }
    [int(1, 8), message(8, &int(2, 17)), message(7, &graph)].concat()
}

fn graph_inputs<'a>(pairs: &[(&'a str, &str)]) -> Vec<&'a str> {
    let mut inputs: Vec<&str> = Vec::new();
    for (i, _) in pairs {
        if !inputs.contains(i) {
            inputs.push(i);
        }
    }
    inputs
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// A VAE decoder directory for the tiny model (16 latent channels) whose graphs load but
/// decode nothing real: frames come back with the latent's shape, which `decode` refuses
/// after the sampling. `edit` changes the manifest before it is written.
fn stub_decoder(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{e}"));
    write(&dir.join("first.onnx"), &identity_graph(&[("latent", "frames"), ("latent", "cache_out_0")], &[]));
    write(&dir.join("step.onnx"), &identity_graph(&[("latent", "frames"), ("cache_0", "cache_out_0")], &[]));
    write(&dir.join("vae_decoder.weights"), &[0u8; 64]);
    let files: serde_json::Map<String, serde_json::Value> =
        ["first.onnx", "step.onnx", "vae_decoder.weights"].iter().map(|f| (f.to_string(), serde_json::json!(sha256_hex(&dir.join(f))))).collect();
    let mut manifest = serde_json::json!({
        "format": "flowstep.vae_decoder", "version": 1, "z_dim": 16, "caches": 1,
        "upsampling": {"time": 1, "space": 1},
        "graphs": {"first": "first.onnx", "step": "step.onnx"}, "weights": "vae_decoder.weights", "files": files,
    });
    edit(&mut manifest);
    write(&dir.join("vae_decoder.json"), &serde_json::to_vec_pretty(&manifest).unwrap_or_default());
    dir.to_path_buf()
}

/// A prompt context for the tiny model.
fn prompt(dir: &Path) -> PathBuf {
    let p = dir.join("prompt.safetensors");
    write_sample(&p, &[tensor("context", &[16, 64], values(1024, 5))]);
    p
}

/// `flowstep sample` on the tiny model, 2 steps at 2,8,8, with `extra`.
fn sample(dir: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let context = prompt(dir);
    let tiny = tiny_artifacts();
    let args = [&["sample", "--artifacts", path_str(&tiny), "--context", path_str(&context), "--shape", "2,8,8", "--steps", "2", "--num-samples", "1", "--out", path_str(out)][..], extra].concat();
    run_limited(&args, 60)
}

/// The tiny export's LoRA tensors with every value set by `value(i)`, under `key(name)`.
fn lora_file(path: &Path, key: impl Fn(&str) -> String, value: impl Fn(usize) -> f32, extra: Vec<flowstep::tensor_file::OutTensor>, meta: &[(&str, &str)]) {
    let init = flowstep::tensor_file::TensorFile::open(&tiny_artifacts().join("lora_init.safetensors")).unwrap_or_else(|e| panic!("{e}"));
    let mut tensors: Vec<_> = init.names().iter().map(|n| {
        let (shape, v) = init.read_f32(n).unwrap_or_else(|e| panic!("{e}"));
        tensor(&key(n), &shape, (0..v.len()).map(&value).collect())
    }).collect();
    tensors.extend(extra);
    let meta = (!meta.is_empty()).then(|| meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
    let bytes = flowstep::tensor_file::encode(&tensors, flowstep::tensor_file::SaveDtype::F32, meta).unwrap_or_else(|e| panic!("{e}"));
    write(path, &bytes);
}

fn eval(art: &Path, data: &Path, extra: &[&str]) -> std::process::Output {
    run_limited(&[&["eval", "--artifacts", path_str(art), "--data", path_str(data), "--timesteps", "2"][..], extra].concat(), 60)
}

fn eval_loss(art: &Path, data: &Path, lora: &Path) -> f64 {
    let r = eval(art, data, &["--json", "--lora", path_str(lora)]);
    assert!(r.status.success(), "{}", stderr(&r));
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&r.stdout)));
    v["eval_loss"].as_f64().unwrap_or_else(|| panic!("{v}"))
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            found.push(p.strip_prefix(dir).map(|r| r.display().to_string()).unwrap_or_default());
        }
    }
    found.sort();
    found
}

// ── 2. The decoder's manifest reads nothing outside its directory ─────────────────────────

#[test]
fn decoder_manifest_paths_stay_inside_the_decoder_directory() {
    let dir = tempdir();
    let secret = dir.path().join("secret.onnx");
    write(&secret, &identity_graph(&[("latent", "frames"), ("latent", "cache_out_0")], &[]));
    let out = dir.path().join("out");
    let case = |name: &str, setup: &dyn Fn(&Path), expect: &[&str]| {
        let decoder = stub_decoder(&dir.path().join(name), |_| {});
        setup(&decoder);
        assert_error(&sample(dir.path(), &out, &["--vae-decoder", path_str(&decoder)]), expect);
        assert_untouched(&out);
    };
    let list = |d: &Path, key: &str, name: &str, hash_of: &Path| {
        let path = d.join("vae_decoder.json");
        let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap_or_default()).unwrap_or_default();
        match key {
            "weights" => m["weights"] = serde_json::json!(name),
            graph => m["graphs"][graph] = serde_json::json!(name),
        }
        m["files"][name] = serde_json::json!(sha256_hex(hash_of));
        write(&path, &serde_json::to_vec(&m).unwrap_or_default());
    };
    case("parent", &|d| list(d, "first", "../secret.onnx", &secret), &["vae_decoder.json", "../secret.onnx", "`..`"]);
    case("absolute", &|d| list(d, "step", path_str(&secret), &secret), &["vae_decoder.json", "secret.onnx", "absolute"]);
    case("symlink-out", &|d| {
        std::fs::remove_file(d.join("first.onnx")).unwrap_or_default();
        std::os::unix::fs::symlink(&secret, d.join("first.onnx")).unwrap_or_else(|e| panic!("{e}"));
        list(d, "first", "first.onnx", &secret);
    }, &["first.onnx", "outside the VAE decoder directory"]);
    case("weights-dev-zero", &|d| {
        std::fs::remove_file(d.join("vae_decoder.weights")).unwrap_or_default();
        std::os::unix::fs::symlink("/dev/zero", d.join("vae_decoder.weights")).unwrap_or_else(|e| panic!("{e}"));
    }, &["vae_decoder.weights", "/dev/zero", "outside the VAE decoder directory"]);
    // An external-data file the graph names but `files` does not list (so without a sha256).
    case("unlisted-external-data", &|d| {
        write(&d.join("extra.bin"), &[0u8; 16]);
        write(&d.join("first.onnx"), &identity_graph(&[("latent", "frames"), ("latent", "cache_out_0")], &message(5, &external_tensor("w", "extra.bin"))));
        list(d, "first", "first.onnx", &d.join("first.onnx"));
    }, &["vae_decoder.json", "first.onnx", "extra.bin", "does not list"]);
}

// ── 3. Small files: regular files only, bounded reads, numbers range-checked ──────────────

#[test]
fn side_files_never_block_or_fill_memory() {
    let dir = tempdir();
    let out = dir.path().join("out");
    // The decoder manifest as a FIFO, and as /dev/zero.
    let fifo_decoder = stub_decoder(&dir.path().join("fifo"), |_| {});
    std::fs::remove_file(fifo_decoder.join("vae_decoder.json")).unwrap_or_default();
    mkfifo(&fifo_decoder.join("vae_decoder.json"));
    assert_error(&sample(dir.path(), &out, &["--vae-decoder", path_str(&fifo_decoder)]), &["vae_decoder.json", "a FIFO"]);
    assert_untouched(&out);
    let zero_decoder = stub_decoder(&dir.path().join("zero"), |_| {});
    std::fs::remove_file(zero_decoder.join("vae_decoder.json")).unwrap_or_default();
    std::os::unix::fs::symlink("/dev/zero", zero_decoder.join("vae_decoder.json")).unwrap_or_else(|e| panic!("{e}"));
    assert_error(&sample(dir.path(), &out, &["--vae-decoder", path_str(&zero_decoder)]), &["vae_decoder.json", "a device"]);
    assert_untouched(&out);
    // A converted cache's boundaries file, and a prompt file, as FIFOs; a prompt file as /dev/zero.
    let art = tiny_artifacts();
    let data = dir.path().join("data");
    tiny_dataset(&data, 1, 1);
    mkfifo(&data.join("diffsynth_boundaries.json"));
    assert_error(&train_limited(&art, &data, &out, 2, &[]), &["diffsynth_boundaries.json", "a FIFO"]);
    assert_untouched(&out);
    std::fs::remove_file(data.join("diffsynth_boundaries.json")).unwrap_or_default();
    let prompts = dir.path().join("prompts.txt");
    mkfifo(&prompts);
    assert_error(&train_limited(&art, &data, &out, 2, &["--sample-every", "1", "--sample-prompts", path_str(&prompts)]), &["prompts.txt", "a FIFO"]);
    assert_untouched(&out);
    assert_error(&train_limited(&art, &data, &out, 2, &["--sample-every", "1", "--sample-prompts", "/dev/zero"]), &["/dev/zero", "a device"]);
    assert_untouched(&out);
    // A prompt file far larger than any prompt list.
    let big = dir.path().join("big.txt");
    write(&big, &vec![b'#'; (1 << 20) + 1]);
    assert_error(&train_limited(&art, &data, &out, 2, &["--sample-every", "1", "--sample-prompts", path_str(&big)]), &["big.txt", "larger than 1048576 bytes"]);
    assert_untouched(&out);
}

/// The numbers of a decoder manifest size the decoded frames: each is range-checked when the
/// decoder is opened, before anything is sampled (an upsampling of 2^40 aborted the process,
/// mid-training too), at the nearest invalid values as well as far ones.
#[test]
fn decoder_numbers_are_range_checked_before_any_work() {
    let dir = tempdir();
    let out = dir.path().join("out");
    let cases: [(&str, &str, serde_json::Value, &str); 5] = [
        ("space-huge", "space", serde_json::json!(1u64 << 40), "upsampling.space is 1099511627776; expected 1 to 64"),
        ("space-65", "space", serde_json::json!(65), "upsampling.space is 65"),
        ("time-0", "time", serde_json::json!(0), "upsampling.time is 0"),
        ("caches-0", "caches", serde_json::json!(0), "caches is 0"),
        ("caches-huge", "caches", serde_json::json!(1u64 << 40), "caches is 1099511627776"),
    ];
    let art = tiny_artifacts();
    let data = dir.path().join("data");
    tiny_dataset(&data, 1, 1);
    let prompts = dir.path().join("prompts.txt");
    prompt(dir.path());
    write(&prompts, b"prompt.safetensors seed=1\n");
    for (name, key, value, expect) in cases {
        let decoder = stub_decoder(&dir.path().join(name), |m| match key {
            "caches" => m["caches"] = value.clone(),
            k => m["upsampling"][k] = value.clone(),
        });
        assert_error(&sample(dir.path(), &out, &["--vae-decoder", path_str(&decoder)]), &["vae_decoder.json", expect]);
        assert_untouched(&out);
        let r = train_limited(&art, &data, &out, 2, &["--sample-every", "1", "--sample-prompts", path_str(&prompts), "--vae-decoder", path_str(&decoder)]);
        assert_error(&r, &["vae_decoder.json", expect]);
        assert_untouched(&out);
    }
    // In range, but a shape that decodes to more frames than memory holds: refused up front.
    let decoder = stub_decoder(&dir.path().join("large"), |m| m["upsampling"] = serde_json::json!({"time": 64, "space": 64}));
    let context = prompt(dir.path());
    let args = ["sample", "--artifacts", path_str(&art), "--context", path_str(&context), "--shape", "1000,64,64", "--steps", "1", "--num-samples", "1", "--out", path_str(&out), "--vae-decoder", path_str(&decoder)];
    assert_error(&run_limited(&args, 30), &["--vae-decoder", "--shape 1000,64,64", "too large"]);
    assert_untouched(&out);
}

// ── 4. Wrong data is refused, not silently accepted ──────────────────────────────────────

/// flowstep's own `flowstep.base_model` and `flowstep.expert` metadata are read back wherever
/// a LoRA is loaded; a file without them (another tool's) is judged by its keys alone.
#[test]
fn loras_made_for_another_model_or_expert_are_refused() {
    let dir = tempdir();
    let pair = repo().join("models/tiny-a14b");
    let (high, low) = (pair.join("high_noise/artifacts"), pair.join("low_noise/artifacts"));
    let data = dir.path().join("data");
    tiny_dataset(&data, 1, 1);
    let small = |i: usize| ((i % 7) as f32 - 3.0) * 1e-3;
    let same = |n: &str| n.to_string();
    let high_lora = dir.path().join("lora_high_noise.safetensors");
    lora_file(&high_lora, same, small, vec![], &[("flowstep.base_model", "tiny-a14b"), ("flowstep.expert", "high_noise")]);
    let tiny_lora = dir.path().join("tiny.safetensors");
    lora_file(&tiny_lora, same, small, vec![], &[("flowstep.base_model", "tiny")]);
    let foreign = dir.path().join("foreign.safetensors");
    lora_file(&foreign, same, small, vec![], &[]);
    let out = dir.path().join("out");
    let expert = ["lora_high_noise.safetensors", "flowstep.expert", "high_noise expert", "this export is the low_noise expert"];
    assert_error(&eval(&low, &data, &["--lora", path_str(&high_lora)]), &expert);
    assert_error(&train_limited(&low, &data, &out, 1, &["--init-lora", path_str(&high_lora)]), &expert);
    assert_untouched(&out);
    let context = prompt(dir.path());
    let pair_sample = |expert_lora: &Path| {
        let args = ["sample", "--artifacts", path_str(&high), "--expert-artifacts", path_str(&low), "--expert-lora", path_str(expert_lora),
            "--context", path_str(&context), "--shape", "2,8,8", "--steps", "2", "--num-samples", "1", "--out", path_str(&out)];
        run_limited(&args, 60)
    };
    assert_error(&pair_sample(&high_lora), &expert);
    assert_untouched(&out);
    // A LoRA of another base model with the same shapes, on either command.
    let base = ["tiny.safetensors", "flowstep.base_model", "base model `tiny`", "this export is `tiny-a14b`"];
    assert_error(&eval(&high, &data, &["--lora", path_str(&tiny_lora)]), &base);
    assert_error(&sample(dir.path(), &out, &["--lora", path_str(&high_lora)]), &["lora_high_noise.safetensors", "base model `tiny-a14b`", "this export is `tiny`"]);
    assert_untouched(&out);
    // The right expert, and a file from another tool, load.
    for (art, lora) in [(&high, &high_lora), (&low, &foreign), (&high, &foreign)] {
        let r = eval(art, &data, &["--lora", path_str(lora)]);
        assert!(r.status.success(), "{}: {}", lora.display(), stderr(&r));
    }
    let r = pair_sample(&foreign);
    assert!(r.status.success(), "{}", stderr(&r));
}

/// kohya's and musubi-tuner's LoRAModule read an alpha of 0 as alpha = rank (scale 1).
#[test]
fn musubi_alpha_zero_is_alpha_equals_rank() {
    let dir = tempdir();
    let art = tiny_artifacts();
    let data = dir.path().join("data");
    tiny_dataset(&data, 2, 1);
    let musubi = |n: &str| {
        let (module, rest) = n.split_once(".lora_").unwrap_or((n, ""));
        let part = if rest.starts_with('A') { "lora_down" } else { "lora_up" };
        format!("lora_unet_{}.{part}.weight", module.replace('.', "_"))
    };
    let modules: Vec<String> = {
        let init = flowstep::tensor_file::TensorFile::open(&art.join("lora_init.safetensors")).unwrap_or_else(|e| panic!("{e}"));
        let mut m: Vec<String> = init.names().iter().map(|n| n.split(".lora_").next().unwrap_or_default().replace('.', "_")).collect();
        m.dedup();
        m
    };
    let write_with_alpha = |file: &str, alpha: f32| {
        let alphas = modules.iter().map(|m| tensor(&format!("lora_unet_{m}.alpha"), &[], vec![alpha])).collect();
        let p = dir.path().join(file);
        lora_file(&p, musubi, |i| ((i % 11) as f32 - 5.0) * 0.02, alphas, &[]);
        p
    };
    let zero = eval_loss(&art, &data, &write_with_alpha("alpha0.safetensors", 0.0));
    let rank = eval_loss(&art, &data, &write_with_alpha("alpha8.safetensors", 8.0));
    let base = eval_loss(&art, &data, &art.join("lora_init.safetensors"));
    assert_eq!(zero, rank, "alpha 0 must act as alpha = rank (8)");
    assert_ne!(zero, base, "the LoRA must change the loss for this test to mean anything");
}

/// A sample carrying conditioning its model does not take (an I2V cache on a T2V model) is
/// refused, naming the tensor; a context with a batch axis is refused, not cut to row 0.
#[test]
fn data_for_another_variant_or_with_a_batch_axis_is_refused() {
    let dir = tempdir();
    let art = tiny_artifacts();
    let out = dir.path().join("out");
    for (name, extra) in [("y", tensor("y", &[20, 2, 8, 8], values(20 * 128, 3))), ("clip_feature", tensor("clip_feature", &[257, 1280], values(257 * 1280, 4))),
        ("first_frame_latents", tensor("first_frame_latents", &[16, 1, 8, 8], values(1024, 5)))] {
        let data = dir.path().join(format!("i2v-{name}"));
        tiny_dataset(&data, 2, 1);
        let latents = values(16 * 128, 2);
        write_sample(&data.join("sample-001.safetensors"), &[tensor("latents", &[16, 2, 8, 8], latents), tensor("context", &[16, 64], values(1024, 6)), extra]);
        let expect = ["sample-001.safetensors", &format!("conditioning tensor `{name}`"), "takes no image conditioning"];
        assert_error(&train_limited(&art, &data, &out, 2, &[]), &expect);
        assert_untouched(&out);
        assert_error(&eval(&art, &data, &[]), &expect);
    }
    // Batch 2 (and batch 1) contexts, in a sample and as a prompt.
    for batch in [2usize, 1] {
        let data = dir.path().join(format!("batch-{batch}"));
        tiny_dataset(&data, 1, 1);
        write_sample(&data.join("sample-000.safetensors"), &[tensor("latents", &[16, 2, 8, 8], values(2048, 1)), tensor("context", &[batch, 16, 64], values(batch * 1024, 2))]);
        assert_error(&train_limited(&art, &data, &out, 2, &[]), &["sample-000.safetensors", "context", "[16, 64]"]);
        assert_untouched(&out);
        let context = dir.path().join(format!("context-{batch}.safetensors"));
        write_sample(&context, &[tensor("context", &[batch, 16, 64], values(batch * 1024, 2))]);
        let args = ["sample", "--artifacts", path_str(&art), "--context", path_str(&context), "--shape", "2,8,8", "--steps", "2", "--out", path_str(&out)];
        assert_error(&run_limited(&args, 30), &[&format!("context-{batch}.safetensors"), "[16, 64]"]);
        assert_untouched(&out);
    }
}

// ── 6. Options are checked before any work ───────────────────────────────────────────────

#[test]
fn options_are_checked_before_any_work() {
    let dir = tempdir();
    let art = tiny_artifacts();
    let data = dir.path().join("data");
    tiny_dataset(&data, 1, 1);
    let out = dir.path().join("out");
    prompt(dir.path());
    // A prompt line's shape: a product that overflows usize, and the nearest size over the limit.
    for (i, shape) in ["4,4294967296,4294967296", "1,4096,4098", "0,8,8", "2,8,7"].iter().enumerate() {
        let prompts = dir.path().join(format!("prompts-{i}.txt"));
        write(&prompts, format!("prompt.safetensors shape={shape}\n").as_bytes());
        let r = train_limited(&art, &data, &out, 2, &["--sample-every", "1", "--sample-prompts", path_str(&prompts)]);
        assert_error(&r, &[&format!("prompts-{i}.txt:1"), &format!("shape={shape}")]);
        assert_untouched(&out);
    }
    let prompts = dir.path().join("prompts.txt");
    write(&prompts, b"prompt.safetensors\n");
    let sampling = ["--sample-every", "1", "--sample-prompts", path_str(&prompts)];
    for steps in ["0", "10001"] {
        let r = train_limited(&art, &data, &out, 2, &[&sampling[..], &["--sample-steps", steps]].concat());
        assert_error(&r, &["--sample-steps", &format!("got {steps}")]);
        assert_untouched(&out);
    }
    // --sample-every 0: documented, and it samples after the last step only.
    let help = run_limited(&["train", "--help"], 30);
    let help = String::from_utf8_lossy(&help.stdout).split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(help.contains("0 samples only after the last step"), "{help}");
    let r = train_limited(&art, &data, &out, 2, &["--sample-every", "0", "--sample-prompts", path_str(&prompts), "--sample-steps", "2"]);
    assert!(r.status.success(), "{}", stderr(&r));
    let steps: Vec<String> = std::fs::read_dir(out.join("samples")).into_iter().flatten().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(steps, ["step-000002"]);
    // schedule --steps 1 (DiffSynth's weight is 0/0 there); 2 prints finite weights.
    assert_error(&run_limited(&["schedule", "--steps", "1"], 30), &["--steps", "at least 2"]);
    let r = run_limited(&["schedule", "--steps", "2", "--csv"], 30);
    assert!(r.status.success() && !String::from_utf8_lossy(&r.stdout).to_lowercase().contains("nan"), "{}", String::from_utf8_lossy(&r.stdout));
    // --ort-profile into a directory that does not exist.
    let missing = dir.path().join("no-such-dir/profile");
    let fresh = dir.path().join("fresh");
    assert_error(&train_limited(&art, &data, &fresh, 1, &["--ort-profile", path_str(&missing)]), &["--ort-profile", "no-such-dir", "does not exist"]);
    assert_untouched(&fresh);
    // --threads above the core count: one warning line, and the run goes on.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores + 1).to_string();
    let r = run_limited(&["eval", "--artifacts", path_str(&art), "--data", path_str(&data), "--timesteps", "1", "--threads", &threads], 60);
    assert!(r.status.success(), "{}", stderr(&r));
    let warnings: Vec<String> = stderr(&r).lines().filter(|l| l.contains("--threads")).map(String::from).collect();
    assert!(warnings.len() == 1 && warnings[0].starts_with("warning: --threads") && warnings[0].contains(&format!("{cores} cores")), "{}", stderr(&r));
}

// ── 7. Outputs appear only when complete ─────────────────────────────────────────────────

/// A decoder that loads but fails to decode: `flowstep sample` leaves no latents behind, and
/// neither do training-time samples (the run stops, saving its last good step).
#[test]
fn failed_sampling_leaves_no_partial_outputs() {
    let dir = tempdir();
    let decoder = stub_decoder(&dir.path().join("decoder"), |_| {});
    let out = dir.path().join("out");
    assert_error(&sample(dir.path(), &out, &["--vae-decoder", path_str(&decoder)]), &["frames (VAE decoder output)"]);
    assert!(!out.exists(), "a failed sample left {:?}", files_under(&out));
    // An existing --out with files: refused without --overwrite; with it, a failure keeps them.
    std::fs::create_dir_all(&out).unwrap_or_default();
    write(&out.join("notes.txt"), b"mine");
    assert_error(&sample(dir.path(), &out, &["--vae-decoder", path_str(&decoder)]), &["--overwrite"]);
    assert_error(&sample(dir.path(), &out, &["--vae-decoder", path_str(&decoder), "--overwrite"]), &["frames (VAE decoder output)"]);
    assert_eq!(files_under(&out), ["notes.txt"]);
    assert!(files_under(dir.path()).iter().all(|f| !f.contains(".tmp-")), "{:?}", files_under(dir.path()));
    // Without a decoder the same command succeeds and replaces --out as a whole.
    let r = sample(dir.path(), &out, &["--overwrite"]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert_eq!(files_under(&out), ["samples.gif", "samples.json", "samples.png", "samples.safetensors"]);
    // Training-time samples: step 2's fail; step 1's are whole, step 2 has no directory.
    let art = tiny_artifacts();
    let data = dir.path().join("data");
    tiny_dataset(&data, 1, 1);
    write(&dir.path().join("prompts.txt"), b"prompt.safetensors\n");
    let train_out = dir.path().join("train");
    let r = train_limited(&art, &data, &train_out, 3, &["--sample-every", "1", "--sample-steps", "2", "--sample-prompts", path_str(&dir.path().join("prompts.txt")),
        "--vae-decoder", path_str(&decoder)]);
    assert_error(&r, &["frames (VAE decoder output)"]);
    let samples = files_under(&train_out.join("samples"));
    assert!(samples.is_empty(), "partial samples left: {samples:?}");
}

// ── Minor: the older surfaces ────────────────────────────────────────────────────────────

/// A LoRA whose values are finite but whose loss overflows: `eval` fails naming the sample
/// instead of printing `null`.
#[test]
fn eval_of_a_lora_with_a_nan_loss_fails() {
    let dir = tempdir();
    let art = tiny_artifacts();
    let data = dir.path().join("data");
    tiny_dataset(&data, 1, 1);
    let huge = dir.path().join("huge.safetensors");
    lora_file(&huge, |n| n.to_string(), |_| 1e20, vec![], &[]);
    assert_error(&eval(&art, &data, &["--lora", path_str(&huge), "--json"]), &["sample-000.safetensors", "eval loss", "not finite"]);
}

/// `--on-nonfinite skip` with an absurd learning rate: the first update leaves parameters that
/// give a NaN loss, every later step is skipped; the run fails rather than writing that LoRA.
#[test]
fn skip_never_writes_a_lora_whose_loss_is_not_finite() {
    let dir = tempdir();
    let art = tiny_artifacts();
    let data = dir.path().join("data");
    tiny_dataset(&data, 2, 1);
    let out = dir.path().join("out");
    let r = run_limited(&["-q", "train", "--artifacts", path_str(&art), "--data", path_str(&data), "--out", path_str(&out), "--steps", "3", "--lr", "1e30", "--on-nonfinite", "skip"], 60);
    assert_error(&r, &["lora.safetensors not written", "non-finite loss", "--lr"]);
    assert!(!out.join("lora.safetensors").exists());
}

/// A non-finite loss names the sample that gave it.
#[test]
fn non_finite_loss_names_the_sample() {
    let dir = tempdir();
    let art = tiny_artifacts();
    let data = dir.path().join("data");
    tiny_dataset(&data, 1, 1);
    write_sample(&data.join("sample-000.safetensors"), &[tensor("latents", &[16, 2, 8, 8], vec![3e38; 2048]), tensor("context", &[16, 64], values(1024, 5))]);
    assert_error(&train_limited(&art, &data, &dir.path().join("out"), 2, &[]), &["step 1", "sample-000.safetensors", "loss is not finite"]);
}

/// A graph that names an external-data file `files` does not list (no sha256) is refused.
#[test]
fn unlisted_external_data_of_a_graph_is_refused() {
    let dir = tempdir();
    let data = dir.path().join("data");
    tiny_dataset(&data, 1, 1);
    let art = copy_artifacts(&dir.path().join("art"));
    let graph = art.join("eval_model.onnx");
    let mut bytes = std::fs::read(&graph).unwrap_or_default();
    // A second `graph` field merges into the first: one more initializer, stored externally.
    bytes.extend(message(7, &message(5, &external_tensor("unlisted_weight", "weights.bin"))));
    write(&graph, &bytes);
    write(&art.join("weights.bin"), &[0u8; 16]);
    patch_manifest(&art, |m| m["files"]["eval_model.onnx"] = serde_json::json!(sha256_hex(&graph)));
    assert_error(&eval(&art, &data, &[]), &["manifest.json", "eval_model.onnx", "weights.bin", "does not list"]);
}

/// The output lock is held on the directory itself: deleting a lock file lets no second
/// trainer in.
#[test]
fn a_second_trainer_is_kept_out_even_if_a_lock_file_is_deleted() {
    let dir = tempdir();
    let art = tiny_artifacts();
    let data = dir.path().join("data");
    tiny_dataset(&data, 2, 1);
    let out = dir.path().join("out");
    let mut first = Command::new(env!("CARGO_BIN_EXE_flowstep"))
        .args(["-q", "train", "--artifacts", path_str(&art), "--data", path_str(&data), "--out", path_str(&out), "--steps", "1000000"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !out.join("metrics.jsonl").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(out.join(".lock"));
    let second = train_limited(&art, &data, &out, 2, &["--resume"]);
    let _ = first.kill();
    let _ = first.wait();
    assert_error(&second, &["in use by another flowstep train"]);
}
