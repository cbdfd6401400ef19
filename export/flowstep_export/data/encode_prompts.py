"""Encode text prompts with Wan's umT5 into the context files `flowstep sample --context` reads.

python -m flowstep_export.data.encode_prompts --text-encoder models_t5_umt5-xxl-enc-bf16.pth \\
    --tokenizer google/umt5-xxl --out prompts/ "a red ball rolls left" "a cat on a sofa"

Writes prompts/prompt-000.safetensors, ... each with `context` [text_len, 4096] (zero after the
prompt's tokens, as in a prepared sample) and the prompt in the file's metadata. `--from-file`
takes one prompt per line instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..deps import run_reporting_errors
from ..files import read_text, require_regular_file, save_tensors
from .prepare import MAX_TEXT_LEN, check_text_len


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flowstep_export.data.encode_prompts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", nargs="*", help="prompt texts")
    p.add_argument("--from-file", type=Path, help="a text file with one prompt per line")
    p.add_argument("--out", required=True, type=Path, help="folder for the context files")
    p.add_argument("--text-encoder", required=True, type=Path, help="umT5 encoder: models_t5_umt5-xxl-enc-bf16.pth")
    p.add_argument("--tokenizer", required=True, type=Path, help="tokenizer folder (Wan's google/umt5-xxl)")
    p.add_argument("--text-len", type=int, default=512,
                   help=f"prompt tokens (default 512, Wan's; the DiT's text_len; at most {MAX_TEXT_LEN})")
    p.add_argument("--dtype", choices=("bf16", "f32"), default="f32", help="stored precision (default f32)")
    p.add_argument("--precision", choices=("bfloat16", "float32"), default="bfloat16",
                   help="encoder's compute precision (default bfloat16, as DiffSynth)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    args = p.parse_args(argv)
    rc, _ = run_reporting_errors("encode_prompts", lambda: encode(args))
    return rc


def encode(args) -> None:
    """Writes one context file per prompt of `args` and prints its path and prompt."""
    check_text_len(args.text_len)
    prompts = list(args.prompts)
    if args.from_file is not None:
        text = read_text(args.from_file, f"--from-file {args.from_file}")
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompts: give them as arguments or with --from-file")
    require_regular_file(args.text_encoder, f"--text-encoder {args.text_encoder}")
    import torch

    from ..model.wan_text import encode_prompt, load_text_encoder, load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer, args.text_len)
    encoder = load_text_encoder(args.text_encoder, torch.bfloat16 if args.precision == "bfloat16" else torch.float32,
                                f"--text-encoder {args.text_encoder}")
    encoder = encoder.to(args.device)
    stored = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    args.out.mkdir(parents=True, exist_ok=True)
    for i, prompt in enumerate(prompts):
        context = encode_prompt(tokenizer, encoder, prompt, args.device).to("cpu", stored).contiguous()
        if not torch.isfinite(context).all():
            raise ValueError(f"prompt {i + 1} ({prompt!r}): the text encoder ({args.text_encoder.name}) gave NaN or Inf "
                             "values; nothing written for it")
        path = args.out / f"prompt-{i:03}.safetensors"
        save_tensors({"context": context}, path, metadata={"prompt": prompt})
        print(f"{path}\t{prompt}")


if __name__ == "__main__":
    sys.exit(main())
