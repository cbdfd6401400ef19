"""Export Wan's umT5 text encoder to the ONNX graph that flowstep runs for text prompts
(`flowstep sample --prompt`, text lines of `flowstep train --sample-prompts`).

python -m flowstep_export.pipeline.text_encoder --text-encoder models_t5_umt5-xxl-enc-bf16.pth \\
    --tokenizer google/umt5-xxl --out DIR

Writes to DIR:
  text_encoder.onnx       ids [1, L] int64, mask [1, L] int64 -> context [1, L, dim] float32
                          (DiffSynth's `WanTextEncoder.forward`; L dynamic, flowstep feeds text_len)
  text_encoder.onnx.data  the weights (ONNX external data), float32: ~22.7 GB for umT5-XXL
  tokenizer.json          the --tokenizer folder's fast tokenizer, read by flowstep's `tokenizers` crate
  text_encoder.json       text_len, dim, dtype, the pad token, each file's sha256, the export's check

The weights are float32 because ONNX Runtime's CPU provider, where flowstep runs the encoder,
has no bf16 kernels. The export checks itself: the ONNX graph's embeddings of a prompt against
DiffSynth's encoder in float32 (max |diff| <= CHECK_RTOL x max |embedding|).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from .. import OPSET
from ..deps import run_reporting_errors
from ..files import publish_files, require_regular_file

log = logging.getLogger("flowstep_export")

GRAPH, TOKENIZER, MANIFEST = "text_encoder.onnx", "tokenizer.json", "text_encoder.json"
WEIGHTS = GRAPH + ".data"
FORMAT = "flowstep.text_encoder"
# The export's own check: float32 graph against float32 PyTorch, the same operations reordered
# by the exporter and ONNX Runtime's kernels; 24 layers of width 4096 stay far below this.
CHECK_RTOL = 1e-4
CHECK_PROMPT = "a red ball rolls left over the green sky"


class Encoder(torch.nn.Module):
    """DiffSynth's `WanTextEncoder` called as its pipeline calls it: (ids, mask) -> embeddings."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, ids, mask):
        return self.encoder(ids, mask)


def export_text_encoder(encoder_path: Path, tokenizer_path: Path, out: Path, text_len: int) -> dict:
    """Writes the graph, its weights, tokenizer.json and text_encoder.json to `out`, checked
    against PyTorch; returns the manifest. Files are written into a temporary folder in `out`
    and moved to their names once checked, the manifest last."""
    from ..data.prepare import check_text_len
    from ..model.wan_text import load_text_encoder, load_tokenizer

    check_text_len(text_len)
    require_regular_file(encoder_path, f"--text-encoder {encoder_path}")
    tokenizer = load_tokenizer(tokenizer_path, text_len)
    hf = tokenizer.tokenizer
    if not getattr(hf, "is_fast", False):
        raise ValueError(f"--tokenizer {tokenizer_path}: not a fast tokenizer (no tokenizer.json); flowstep reads tokenizer.json")
    if hf.pad_token is None or hf.pad_token_id is None:
        raise ValueError(f"--tokenizer {tokenizer_path}: has no pad token; Wan pads prompts to {text_len} tokens")
    encoder = load_text_encoder(encoder_path, torch.float32, f"--text-encoder {encoder_path}")
    vocab = encoder.token_embedding.num_embeddings
    if len(hf) > vocab:
        raise ValueError(f"--tokenizer {tokenizer_path}: {len(hf)} tokens, more than the encoder's {vocab} embeddings")
    return publish_files(out, (GRAPH, WEIGHTS, TOKENIZER, MANIFEST),
                         lambda temp: write_text_encoder(encoder, tokenizer, encoder_path.name, text_len, temp))


def write_text_encoder(encoder, tokenizer, source: str, text_len: int, out: Path) -> dict:
    """Exports `encoder` with `tokenizer` (DiffSynth's HuggingfaceTokenizer) into `out` and checks it."""
    import onnx
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from ..model.wan_text import encode_prompt

    ids, mask = tokenizer(CHECK_PROMPT, return_mask=True, add_special_tokens=True)
    tokens = torch.export.Dim("tokens", min=2, max=max(text_len, 3))
    with torch.no_grad():
        program = torch.onnx.export(Encoder(encoder).eval(), (ids, mask), dynamo=True, opset_version=OPSET, optimize=True,
                                    input_names=["ids", "mask"], output_names=["context"],
                                    dynamic_shapes=({1: tokens}, {1: tokens}), verbose=False)
    program.save(str(out / GRAPH), external_data=True)
    onnx.checker.check_model(str(out / GRAPH))
    # The backend tokenizer without the padding and truncation transformers sets per call:
    # flowstep sets them from this manifest.
    backend = Tokenizer.from_str(tokenizer.tokenizer.backend_tokenizer.to_str())
    backend.no_padding()
    backend.no_truncation()
    backend.save(str(out / TOKENIZER))
    hf = tokenizer.tokenizer
    manifest = {
        "format": FORMAT, "version": 1, "source": source, "text_len": text_len, "dim": encoder.dim, "dtype": "float32",
        "vocab": encoder.token_embedding.num_embeddings, "pad_id": hf.pad_token_id, "pad_token": hf.pad_token,
        "graph": GRAPH, "tokenizer": TOKENIZER,
        "inputs": {"ids": "[1, L] int64", "mask": "[1, L] int64"}, "outputs": {"context": "[1, L, dim] float32"},
        "files": {f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in (GRAPH, WEIGHTS, TOKENIZER)},
    }
    # The export's own check: the ONNX embeddings of one prompt against DiffSynth's encoder.
    session = ort.InferenceSession(str(out / GRAPH), providers=["CPUExecutionProvider"])
    got = session.run(None, {"ids": ids.numpy(), "mask": mask.numpy()})[0][0]
    got[int(mask[0].gt(0).sum()):] = 0
    reference = encode_prompt(tokenizer, encoder, CHECK_PROMPT, "cpu").numpy()
    diff, scale = float(np.abs(got - reference).max()), float(np.abs(reference).max())
    manifest["check"] = {"prompt": CHECK_PROMPT, "max_abs_diff": diff, "max_abs": scale}
    if not diff <= CHECK_RTOL * scale:
        raise RuntimeError(f"exported text encoder differs from DiffSynth's by {diff:.3g} (> {CHECK_RTOL} x {scale:.3g})")
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flowstep_export.pipeline.text_encoder", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text-encoder", required=True, type=Path,
                   help="umT5 encoder: models_t5_umt5-xxl-enc-bf16.pth (or ComfyUI's umt5_xxl_fp16.safetensors)")
    p.add_argument("--tokenizer", required=True, type=Path, help="tokenizer folder (Wan's google/umt5-xxl)")
    p.add_argument("--out", required=True, type=Path, help="directory for the encoder (the DIR of flowstep --text-encoder)")
    p.add_argument("--text-len", type=int, default=512, help="prompt tokens (default 512, Wan's; the DiT's text_len)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore")
    rc, manifest = run_reporting_errors("the text encoder export",
                                        lambda: export_text_encoder(args.text_encoder, args.tokenizer, args.out, args.text_len))
    if rc:
        return rc
    print(json.dumps({"out": str(args.out), "text_len": manifest["text_len"], "dim": manifest["dim"], "check": manifest["check"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
