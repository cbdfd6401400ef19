#!/usr/bin/env python3
"""Summarise ONNX Runtime profiles (`flowstep train --ort-profile PREFIX`): time per op type
(Scan bodies counted apart, since a Scan's time includes its body's), attention's share of the
top-level kernel time (the fused FlashAttention/FlashAttentionGrad nodes, or the chunked
attention Scans), and every node that ran on a provider other than the GPU one.
    scripts/ort_profile_summary.py PROFILE.json [...]"""

import collections
import json
import sys

# Top-level nodes that compute attention: fused exports' operators, chunked exports' Scans
# (the only Scans in an export; their time includes their bodies').
ATTENTION_OPS = ("FlashAttention", "FlashAttentionGrad", "Scan")


def main() -> int:
    by_op, counts, providers, off_gpu = collections.Counter(), collections.Counter(), collections.Counter(), collections.Counter()
    for path in sys.argv[1:]:
        for event in json.load(open(path)):
            if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
                continue
            args = event.get("args", {})
            op = args.get("op_name", "?")
            key = f"{op} (in attention Scan)" if "/body/" in event["name"] else op
            by_op[key] += event["dur"]
            counts[key] += 1
            provider = args.get("provider", "?")
            providers[provider] += 1
            if provider != "CUDAExecutionProvider":
                off_gpu[(op, provider)] += 1
    total = sum(d for k, d in by_op.items() if "(in attention Scan)" not in k)
    print(f"kernel time, top-level nodes: {total / 1e3:.1f} ms")
    for op, d in by_op.most_common(20):
        print(f"  {op:36s} {d / 1e3:10.1f} ms {100 * d / max(total, 1):5.1f}%  ({counts[op]} runs)")
    attention = sum(by_op[op] for op in ATTENTION_OPS)
    print(f"attention share of kernel time: {100 * attention / max(total, 1):.1f}% ({attention / 1e3:.1f} ms; "
          f"{', '.join(op for op in ATTENTION_OPS if by_op[op])})")
    print("node runs per provider:", dict(providers))
    print("nodes not on CUDA:", dict(off_gpu) if off_gpu else "none")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except BrokenPipeError:  # `... | head`: the reader has what it wanted
        sys.stderr.close()
        raise SystemExit(0)
