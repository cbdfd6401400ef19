"""Every command in README.md's code blocks runs as written.

- The Quick start block is walked for real, in a temporary HOME whose `~/flowstep` is this
  checkout: `scripts/install.sh` (into a throw-away environment layered over the pinned one, so
  the shared one is not touched), the export, `prepare`, the text encoder and VAE decoder exports, a
  train run with samples and a sample with the LoRA. Wan's files are replaced by the tiny model
  and tiny random encoders under their release names, and the sizes and step counts by the tiny
  ones (SUBSTITUTIONS: each must match the block, so a README edit that drops one fails here).
- Every other `flowstep` command is parsed by flowstep's own parser (`--help` appended: clap
  checks every flag and value before it prints help), every `python -m flowstep_export...`
  command by the module's own argparse parser (stopped after parsing); `...` (flags or a
  value shown elsewhere) is dropped, or after a flag replaced by a stand-in value.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from independent import ROOT, flowstep_bin
from wan_fixtures import write_text_encoder, write_tokenizer, write_vae, write_video

README = ROOT / "README.md"
QUICK_START = "## Quick start"
SUBSTITUTIONS = [  # README text -> the tiny world's (count: how often it occurs in the Quick start)
    ("--model wan2.1-t2v-1.3b", "--model tiny", 1),
    ("--resolution 480x832 --frames 81 --fps 16", "--resolution 32x48 --frames 9 --text-len 16 --precision float32", 1),
    ("--out text-encoder", "--text-len 16 --out text-encoder", 1),
    ("--w 832 --h 480 --f 81 --s 30 --g 5", "--w 48 --h 32 --f 9 --s 3 --g 5", 1),
    ("--steps 2000 --save-every 250 --sample-every 250", "--steps 4 --save-every 2 --sample-every 2", 1),
    ("--width 832 --height 480 --frames 81", "--width 48 --height 32 --frames 9 --steps 3", 1),
    (" --device cuda", "", 3),
    (" --precision bfloat16 --gradient-checkpointing", " --gradient-checkpointing", 1),  # the CPU trains float32
]
# The stand-ins for the files of Wan's release folder that the Quick start names.
RELEASE = "Wan2.1-T2V-1.3B"


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(heading of its section, body) of each ```sh block."""
    blocks, heading = [], ""
    for match in re.finditer(r"^(## [^\n]*)$|^```sh\n(.*?)^```", text, re.M | re.S):
        if match.group(1):
            heading = match.group(1)
        else:
            blocks.append((heading, match.group(2)))
    return blocks


def commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = (re.sub(r"(^|\s)#.*$", "", line).strip() for line in joined.splitlines())
    return [line for line in lines if line]


def placeholders_filled(words: list[str]) -> list[str]:
    """`--flag ...` (a value shown elsewhere) gets a stand-in value; a lone `...` (more flags) is dropped."""
    return [("VALUE" if words[i - 1].startswith("--") else None) if w == "..." else w for i, w in enumerate(words)
            if w != "..." or words[i - 1].startswith("--")]


LAUNCHERS = {"torchrun", "mpiexec", "mpirun", "srun"}


def launched(words: list[str]) -> list[str]:
    """The command a launcher starts (`torchrun ... flowstep train ...`, `VAR=... mpiexec -n 2
    flowstep ...`): from the `flowstep` word on; other commands as they are."""
    command = [w for w in words if not re.fullmatch(r"[A-Z_]+=\S*", w)] or words
    if Path(command[0]).name in LAUNCHERS and "flowstep" in command:
        return command[command.index("flowstep"):]
    return words


def quick_start() -> str:
    [body] = [body for heading, body in code_blocks(README.read_text()) if heading.startswith(QUICK_START)]
    return body


def test_other_readme_commands_parse():
    checked = []
    for heading, body in code_blocks(README.read_text()):
        if heading.startswith(QUICK_START):
            continue
        for command in commands(body):
            words = launched(placeholders_filled(shlex.split(command)))
            if words[0] == "flowstep":
                r = subprocess.run([str(flowstep_bin()), *words[1:], "--help"], capture_output=True, text=True, timeout=60)
            elif "-m" in words[:2] and words[words.index("-m") + 1].startswith("flowstep_export"):
                module_args = words[words.index("-m") + 1:]
                r = subprocess.run([sys.executable, "-c", PARSE_ONLY, *module_args], capture_output=True, text=True, timeout=120,
                                   cwd=ROOT / "export")
            else:
                continue  # set-up lines (cd, VENV=..., echo) and the two scripts, which the test suite runs
            assert r.returncode == 0, f"README ({heading}): `{command}` does not parse:\n{r.stderr[-2000:]}"
            checked.append(words[0] if words[0] == "flowstep" else words[words.index("-m") + 1])
    assert checked.count("flowstep") >= 16 and len(checked) >= 22, checked


# Runs `python -m MODULE ARGS` up to the end of its argument parsing, then exits 0.
PARSE_ONLY = """
import argparse, runpy, sys
parse = argparse.ArgumentParser.parse_args
def parse_then_stop(self, *args, **kwargs):
    parse(self, *args, **kwargs)
    raise SystemExit(0)
argparse.ArgumentParser.parse_args = parse_then_stop
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def layered_venv(path: Path) -> Path:
    """A new environment that sees the running one's packages (a .pth), for install.sh to write into."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    site = subprocess.run([str(path / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "_pinned.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    return path


def test_quick_start_runs_as_written(tmp_path):
    script = quick_start()
    for old, new, count in SUBSTITUTIONS:
        assert script.count(old) == count, f"the Quick start no longer has `{old}` {count}× (update SUBSTITUTIONS)"
        script = script.replace(old, new)
    home = tmp_path / "home"
    (home / "fox" / "clips").mkdir(parents=True)
    (home / "flowstep").symlink_to(ROOT)
    release = home / "fox" / RELEASE
    (release / "google").mkdir(parents=True)
    shutil.copy(ROOT / "models/tiny/artifacts/base.safetensors", release / "diffusion_pytorch_model.safetensors")
    write_vae(release / "Wan2.1_VAE.pth")
    write_text_encoder(release / "models_t5_umt5-xxl-enc-bf16.pth", write_tokenizer(release / "google" / "umt5-xxl"))
    for i in range(2):
        write_video(home / "fox" / "clips" / f"fox{i}.mp4", frames=10, height=40, width=56)
        (home / "fox" / "clips" / f"fox{i}.txt").write_text("a red ball rolls left\n")
    cargo = shutil.which("cargo")
    assert cargo, "cargo is needed to walk the Quick start (install.sh builds flowstep)"
    real_home = Path.home()
    env = {"HOME": str(home), "PATH": f"{Path(cargo).parent}:/usr/bin:/bin",
           "CARGO_HOME": os.environ.get("CARGO_HOME", str(real_home / ".cargo")),
           "RUSTUP_HOME": os.environ.get("RUSTUP_HOME", str(real_home / ".rustup")),
           "FLOWSTEP_CACHE": os.environ.get("FLOWSTEP_CACHE", str(real_home / ".cache" / "flowstep")),
           "FLOWSTEP_VENV": str(layered_venv(tmp_path / "venv"))}
    r = subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], capture_output=True, text=True, timeout=1800, env=env)
    assert r.returncode == 0, f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    fox = home / "fox"
    # A float32 export trains on the CPU with flowstep's fused attention kernels by default.
    assert json.loads((fox / "artifacts/manifest.json").read_text())["training"]["attention"]["impl"] == "fused"
    assert (home / ".local/bin/flowstep").resolve() == (ROOT / "target/release/flowstep").resolve()
    assert (fox / "runs/fox/lora.safetensors").is_file()
    assert sorted(p.name for p in (fox / "runs/fox/loras").iterdir()) == ["fox-step-000002.safetensors", "fox-step-000004.safetensors"]
    assert (fox / "runs/fox/samples/step-000004/00-a-red-fox-runs-through-snow/videos.gif").is_file()
    # The MP4 needs ffmpeg: install.sh linked imageio-ffmpeg's (this PATH has no other).
    assert (fox / "samples/fox/video-000.mp4").stat().st_size > 0
    # Text prompts, encoded by flowstep: in training's samples and in `sample --prompt`.
    sampled = json.loads((fox / "samples/fox/samples.json").read_text())
    assert sampled["prompt"] == "a red fox runs through snow" and sampled["negative_prompt"], sampled
    [line] = json.loads((fox / "runs/fox/samples/step-000004/prompts.json").read_text())
    assert (line["prompt"], line["shape"], line["seed"], line["cfg_scale"]) == ("a red fox runs through snow", [16, 3, 4, 6], 42, 5.0), line
