"""Text prompts end to end: a tiny random umT5 (DiffSynth's class) and tokenizer exported by
`flowstep_export.pipeline.text_encoder`, then run by flowstep (`tokenizers` crate + ONNX Runtime)
in `flowstep sample --prompt` and in `flowstep train --sample-prompts` with a musubi-style
text prompt file. The embeddings flowstep samples with are compared with `encode_prompts`'
(DiffSynth's encoder in PyTorch, float32), the reference for text encoding."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from flowstep_export.data.encode_prompts import main as encode_prompts
from flowstep_export.pipeline.text_encoder import main as export_text_encoder
from independent import TINY, flowstep_bin
from wan_fixtures import TEXT_LEN, write_text_encoder, write_tokenizer

# The negative prompt in fullwidth letters: only DiffSynth's ftfy cleaning (src/prompt_clean.rs) makes
# its tokens known words, so an encoder that skipped it would differ from encode_prompts here.
PROMPT, NEGATIVE = "a red ball rolls  left", "ｂｌｕｅ　ｓｑｕａｒｅ over the sky"
LONG = " ".join(["a red ball rolls left"] * 5)  # 25 words: past TEXT_LEN tokens
# Wan's standard negative prompt (`sample_neg_prompt`, wan/configs/shared_config.py in Wan2.1 and
# musubi-tuner): what Wan's, DiffSynth's and musubi's samplers use when none is given.
WAN_NEGATIVE = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
                "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
                "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")
# flowstep's embeddings against PyTorch's, both float32: the same umT5 ops, reordered by the
# ONNX exporter and ONNX Runtime's kernels (measured max |diff| ~1e-6 on values up to ~3).
ATOL = 1e-5


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """The tiny encoder's files, its ONNX export and its PyTorch contexts of PROMPT, NEGATIVE,
    LONG and WAN_NEGATIVE (prompt-000 ... prompt-003)."""
    d = tmp_path_factory.mktemp("text")
    vocab = write_tokenizer(d / "tokenizer")
    write_text_encoder(d / "t5.pth", vocab, seed=3)
    text = ["--text-encoder", str(d / "t5.pth"), "--tokenizer", str(d / "tokenizer"), "--text-len", str(TEXT_LEN)]
    assert export_text_encoder([*text, "--out", str(d / "onnx")]) == 0
    assert encode_prompts(["--out", str(d / "torch"), *text, "--precision", "float32", PROMPT, NEGATIVE, LONG, WAN_NEGATIVE]) == 0
    return d


def run(*args):
    return subprocess.run([str(flowstep_bin()), *map(str, args)], capture_output=True, text=True, timeout=600)


def torch_context(encoder, i):
    return load_file(str(encoder / "torch" / f"prompt-{i:03}.safetensors"))["context"]


def tiny_dataset(path):
    rng = np.random.default_rng(0)
    path.mkdir()
    for i in range(2):
        save_file({"latents": rng.standard_normal((16, 2, 8, 8)).astype(np.float32),
                   "context": rng.uniform(-1, 1, size=(TEXT_LEN, 64)).astype(np.float32)}, str(path / f"s{i}.safetensors"))


def test_manifest_and_export_check(encoder):
    m = json.loads((encoder / "onnx" / "text_encoder.json").read_text())
    assert (m["format"], m["text_len"], m["dim"], m["dtype"], m["pad_id"]) == ("flowstep.text_encoder", TEXT_LEN, 64, "float32", 0)
    assert set(m["files"]) == {"text_encoder.onnx", "text_encoder.onnx.data", "tokenizer.json"}
    assert m["check"]["max_abs_diff"] <= 1e-4 * m["check"]["max_abs"]


def test_sample_prompt_equals_the_pytorch_contexts(encoder, tmp_path):
    common = ["sample", "--artifacts", TINY, "--shape", "1,4,6", "--steps", "2", "--cfg-scale", "3", "--num-samples", "1", "-q"]
    r = run(*common, "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--text-encoder", encoder / "onnx", "--out", tmp_path / "text")
    assert r.returncode == 0, r.stderr
    out = load_file(str(tmp_path / "text" / "samples.safetensors"))
    for name, i in [("context", 0), ("negative_context", 1)]:
        expected = torch_context(encoder, i)
        diff = float(np.abs(out[name] - expected).max())
        assert diff <= ATOL, f"{name}: max |flowstep - PyTorch| = {diff}"
        tokens = int(np.abs(expected).sum(axis=1).astype(bool).sum())
        assert 0 < tokens < TEXT_LEN and not out[name][tokens:].any(), "zero after the prompt's tokens"
    # The same sampling from PyTorch's context files gives the same latents.
    r = run(*common, "--context", encoder / "torch" / "prompt-000.safetensors",
            "--negative-context", encoder / "torch" / "prompt-001.safetensors", "--out", tmp_path / "files")
    assert r.returncode == 0, r.stderr
    files = load_file(str(tmp_path / "files" / "samples.safetensors"))
    assert np.allclose(out["latents"], files["latents"], atol=1e-4)
    summary = json.loads((tmp_path / "text" / "samples.json").read_text())
    assert (summary["prompt"], summary["negative_prompt"]) == (PROMPT, NEGATIVE)


def test_a_prompt_past_text_len_is_truncated_as_diffsynth_does(encoder, tmp_path):
    r = run("-q", "sample", "--artifacts", TINY, "--shape", "1,4,4", "--steps", "1", "--num-samples", "1",
            "--prompt", LONG, "--text-encoder", encoder / "onnx", "--out", tmp_path / "s")
    assert r.returncode == 0, r.stderr
    context = load_file(str(tmp_path / "s" / "samples.safetensors"))["context"]
    expected = torch_context(encoder, 2)
    assert np.abs(expected).sum(axis=1).all(), "every token is the prompt's: no padding"
    assert float(np.abs(context - expected).max()) <= ATOL
    # No --negative-prompt: guidance is against Wan's standard negative prompt.
    negative = load_file(str(tmp_path / "s" / "samples.safetensors"))["negative_context"]
    assert float(np.abs(negative - torch_context(encoder, 3)).max()) <= ATOL
    assert json.loads((tmp_path / "s" / "samples.json").read_text())["negative_prompt"] == WAN_NEGATIVE


def test_train_samples_text_prompts_with_their_options(encoder, tmp_path):
    tiny_dataset(tmp_path / "data")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"# musubi-tuner's prompt syntax\n{PROMPT} --w 96 --h 48 --f 5 --s 3 --d 7\n"
                       f"{PROMPT} --D 8 --s 2 --G 2.5 --n {NEGATIVE}\n")  # option letters in any case, as musubi-tuner
    out = tmp_path / "run"
    r = run("-q", "train", "--artifacts", TINY, "--data", tmp_path / "data", "--out", out, "--steps", "2", "--lr", "1e-3",
            "--sample-every", "2", "--sample-prompts", prompts, "--text-encoder", encoder / "onnx", "--lora-dtype", "f32")
    assert r.returncode == 0, r.stderr
    step = out / "samples" / "step-000002"
    listed = json.loads((step / "prompts.json").read_text())
    assert [p["name"] for p in listed] == ["00-a-red-ball-rolls-left", "01-a-red-ball-rolls-left"]
    first, second = listed
    # --w 96 --h 48 --f 5: latents 2 frames of 6x12; the second line keeps the data's bucket.
    # Without --g, Wan's guidance 5 (musubi-tuner's Wan default), against the negative below.
    assert (first["shape"], first["steps"], first["seed"], first["cfg_scale"]) == ([16, 2, 6, 12], 3, 7, 5.0)
    assert (second["shape"], second["steps"], second["seed"], second["cfg_scale"]) == ([16, 2, 8, 8], 2, 8, 2.5)
    # A line without --n samples against Wan's standard negative prompt, as musubi-tuner's do.
    assert (first["prompt"], first["negative_prompt"], second["negative_prompt"]) == (PROMPT, WAN_NEGATIVE, NEGATIVE)
    a, b = (load_file(str(step / p["name"] / "samples.safetensors")) for p in listed)
    for tensors in (a, b):
        assert float(np.abs(tensors["context"] - torch_context(encoder, 0)).max()) <= ATOL
    assert float(np.abs(a["negative_context"] - torch_context(encoder, 3)).max()) <= ATOL
    assert float(np.abs(b["negative_context"] - torch_context(encoder, 1)).max()) <= ATOL
    # Each line's options reach the sampler: flowstep sample with them gives the same latents.
    for tensors, flags in [(a, ["--shape", "2,6,12", "--steps", "3", "--seed", "7", "--cfg-scale", "5"]),
                           (b, ["--shape", "2,8,8", "--steps", "2", "--seed", "8", "--cfg-scale", "2.5", "--negative-prompt", NEGATIVE])]:
        again = tmp_path / f"again-{flags[-1]}"
        r = run("-q", "sample", "--artifacts", TINY, "--lora", out / "lora.safetensors", "--prompt", PROMPT,
                "--text-encoder", encoder / "onnx", "--num-samples", "1", "--out", again, *flags)
        assert r.returncode == 0, r.stderr
        assert np.allclose(load_file(str(again / "samples.safetensors"))["latents"], tensors["latents"], atol=1e-5)


@pytest.mark.parametrize("line, with_encoder, expected", [
    (f"{PROMPT} --d 1", False, ["prompts.txt:1", "text prompts need --text-encoder", "NAME.safetensors [seed=N]"]),
    (f"{PROMPT} --x 3", True, ["prompts.txt:1", "unknown option `--x`"]),
    (f"{PROMPT} --f 8", True, ["prompts.txt:1", "--f 8", "4k+1"]),
    (f"{PROMPT} --w 40", True, ["prompts.txt:1", "--w 40", "multiple of 16"]),
    (f"{PROMPT} --s 0", True, ["prompts.txt:1", "--s 0", "1 to 10000"]),
    (f"{PROMPT} --n", True, ["prompts.txt:1", "--n", "a negative prompt"]),
    (f"{PROMPT} --c", True, ["prompts.txt:1", "--c", "a conditioning file"]),
    (f"{PROMPT} --c ctx.safetensors", True, ["prompts.txt:1", "text-to-video model and takes no conditioning"]),
    ("--w 64 a fox", True, ["prompts.txt:1", "the prompt text comes first"]),
    ("ctx.safetensors seed=1", True, ["--text-encoder", "no text lines"]),
])
def test_bad_text_lines_are_one_line_errors(encoder, tmp_path, line, with_encoder, expected):
    tiny_dataset(tmp_path / "data")
    (tmp_path / "prompts.txt").write_text(f"{line}\n")
    save_file({"context": np.zeros((TEXT_LEN, 64), np.float32)}, str(tmp_path / "ctx.safetensors"))
    extra = ["--text-encoder", encoder / "onnx"] if with_encoder else []
    r = run("train", "--artifacts", TINY, "--data", tmp_path / "data", "--out", tmp_path / "run", "--steps", "1",
            "--sample-every", "1", "--sample-prompts", tmp_path / "prompts.txt", *extra)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and all(e in lines[0] for e in expected), r.stderr
    assert not (tmp_path / "run").exists()


def test_text_given_as_a_context_file_says_where_text_goes(tmp_path):
    r = run("sample", "--artifacts", TINY, "--context", "a red ball", "--shape", "1,4,4", "--out", tmp_path / "s")
    assert r.returncode != 0
    assert "--prompt" in r.stderr and "--text-encoder" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_an_encoder_for_another_model_is_refused(encoder, tmp_path):
    m = json.loads((encoder / "onnx" / "text_encoder.json").read_text())
    other = tmp_path / "onnx"
    other.mkdir()
    for f in m["files"]:
        (other / f).write_bytes((encoder / "onnx" / f).read_bytes())
    (other / "text_encoder.json").write_text(json.dumps({**m, "text_len": 512}))
    r = run("sample", "--artifacts", TINY, "--prompt", PROMPT, "--text-encoder", other, "--shape", "1,4,4", "--out", tmp_path / "s")
    assert r.returncode != 0 and "[512, 64]" in r.stderr and "[16, 64]" in r.stderr, r.stderr


def test_export_refuses_bad_inputs_in_one_line(encoder, tmp_path):
    import sys

    small = tmp_path / "small.pth"
    write_text_encoder(small, vocab=5)  # fewer embeddings than the tokenizer's 19 tokens
    not_a_folder = tmp_path / "tokenizer.json"
    not_a_folder.write_text("{}")
    cases = [
        (["--text-encoder", tmp_path / "missing.pth", "--tokenizer", encoder / "tokenizer"], ["missing.pth"]),
        (["--text-encoder", encoder / "t5.pth", "--tokenizer", not_a_folder], ["--tokenizer", "tokenizer folder"]),
        (["--text-encoder", small, "--tokenizer", encoder / "tokenizer"], ["19 tokens", "5 embeddings"]),
        (["--text-encoder", encoder / "t5.pth", "--tokenizer", encoder / "tokenizer", "--text-len", "0"], ["--text-len"]),
    ]
    for args, words in cases:
        r = subprocess.run([sys.executable, "-m", "flowstep_export.pipeline.text_encoder", *map(str, args), "--out", tmp_path / "out"],
                           cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr
        assert all(w in lines[0] for w in words), (words, lines[0])
        assert not (tmp_path / "out" / "text_encoder.json").exists()
