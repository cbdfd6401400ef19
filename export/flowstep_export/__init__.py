"""flowstep_export: the Wan DiT with LoRA, exported to portable ONNX training artifacts.

The artifacts (docs/DESIGN.md §3) are a training graph (loss and flat LoRA gradient), an eval
graph, an AdamW optimizer graph, an inference graph and a manifest; every node is a
standard ONNX op, so any ONNX Runtime build and execution provider runs them.
"""

__version__ = "0.1.0"
FORMAT_VERSION = 1
OPSET = 18
# Exports with fp8 base weights: Cast from float8 needs opset 19.
FP8_OPSET = 19
# Queries per attention chunk unless --attention-chunk says otherwise (BENCHMARKS.md).
DEFAULT_ATTENTION_CHUNK = 512
