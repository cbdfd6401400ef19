"""`flowstep train`'s TensorBoard event files (OUT/tensorboard/), read back by the `tensorboard`
package's own EventAccumulator: the scalars of metrics.jsonl, one value per step across a resume
that redoes steps, the eval losses, and the decoded sample contact sheets as images.
(tests/train_outputs.rs reads the same files with an independent TFRecord + protobuf reader.)"""

from __future__ import annotations

import json
import shutil

import numpy as np
from safetensors.numpy import save_file
from tensorboard.backend.event_processing import event_accumulator

from independent import TINY, flowstep

PROMPT = TINY.parent.parent / "toy" / "prompts" / "yellow-up.safetensors"  # a [16, 64] context


def tiny_dataset(path, n, seed):
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    for i in range(n):
        pattern = rng.uniform(-1.5, 1.5, size=(16, 1, 1, 1)).astype(np.float32)
        save_file({"latents": np.ascontiguousarray(np.broadcast_to(pattern, (16, 2, 8, 8))),
                   "context": rng.uniform(-1, 1, size=(16, 64)).astype(np.float32)}, str(path / f"sample-{i:03}.safetensors"))


def train(data, out, steps, *extra):
    return flowstep("-q", "train", "--artifacts", TINY, "--data", data, "--out", out, "--steps", steps,
                    "--seed", "5", "--lr", "2e-3", *extra)


def accumulator(out):
    acc = event_accumulator.EventAccumulator(str(out / "tensorboard"), size_guidance={event_accumulator.IMAGES: 0})
    acc.Reload()
    return acc


def test_scalars_survive_a_resume_that_redoes_steps(tmp_path):
    data, held_out, out = tmp_path / "data", tmp_path / "held-out", tmp_path / "run"
    tiny_dataset(data, 2, 1)
    tiny_dataset(held_out, 2, 2)
    extra = ("--eval-data", held_out, "--eval-every", "3", "--save-every", "2")
    train(data, out, 6, *extra, "--stop-after", "5")
    # As after a crash past step 4: step 5 is redone by the resumed run.
    shutil.rmtree(out / "checkpoints" / "step-000005")
    train(data, out, 6, *extra, "--resume")

    acc = accumulator(out)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    for tag, key in [("train/loss", "loss"), ("train/lr", "lr"), ("train/grad_norm", "grad_norm")]:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [1, 2, 3, 4, 5, 6], tag
        assert [e.value for e in events] == [float(np.float32(m[key])) for m in metrics], tag
    evals = acc.Scalars("eval/loss")
    summary = json.loads((out / "summary.json").read_text())
    assert [e.step for e in evals] == [0, 3, 6]
    assert evals[0].value == float(np.float32(summary["eval_before"]))
    assert evals[2].value == float(np.float32(summary["eval_after"]))


def test_decoded_samples_are_images(tmp_path, vae_decoder):
    data, out = tmp_path / "data", tmp_path / "run"
    tiny_dataset(data, 1, 1)
    prompts = tmp_path / "prompts.txt"
    shutil.copy(PROMPT, tmp_path / "fox.safetensors")
    prompts.write_text("fox.safetensors seed=1 shape=2,8,8\n")
    train(data, out, 2, "--sample-every", "2", "--sample-prompts", prompts, "--sample-steps", "2",
          "--vae-decoder", vae_decoder / "decoder")
    sheet = out / "samples" / "step-000002" / "00-fox" / "videos.png"
    images = accumulator(out).Images("samples/00-fox")
    assert [i.step for i in images] == [2]
    from PIL import Image

    with Image.open(sheet) as im:
        assert (images[0].width, images[0].height) == im.size
    assert images[0].encoded_image_string == sheet.read_bytes()
