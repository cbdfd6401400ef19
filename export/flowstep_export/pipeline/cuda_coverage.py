"""Does every node of an ONNX graph have an ONNX Runtime 1.31.1 CUDA kernel for its types?

A node without one is silently run on the CPU (with copies to and from the GPU around it), or, with
`session.disable_cpu_ep_fallback=1`, fails session creation. This checks a graph against the CUDA
execution provider's kernel registry (`cuda_kernels.py`, generated from onnxruntime-gpu 1.31.1
itself) on any machine, no GPU needed, the way ONNX Runtime matches a node to a kernel
(onnxruntime/core/framework/kernel_registry.cc, VerifyKernelDef):

- the node's *since version* is that of the op schema ONNX Runtime resolves at the model's opset
  (e.g. Cos at opset 18 is Cos-7); a kernel registered for [since, until] matches when
  since == node's since version, or since < it <= until with a closed range;
- each kernel type constraint is looked up among the schema's formal inputs and outputs by type
  parameter (T, T1, ...) or, for arguments with a fixed type, by argument name (Reshape's "shape"),
  and the actual argument's element type must be allowed. A registration with several constraints
  is one combination (LayerNormalization-1 lists T/U/V triples), so all must match the same one.

Element types come from onnx shape inference plus the graph's inputs, outputs, initializers and
value_info. Nodes with no match are sorted in two lists:

- problems: anything that touches a floating-point tensor (an activation, weight or gradient would
  move to the CPU) or whose types are unknown;
- cpu_by_design: nodes whose every input and output is an integer or bool tensor. These are shape and
  index arithmetic; ONNX Runtime's CUDA provider deliberately keeps such nodes on the CPU anyway
  (GetCpuPreferredNodes: the producers of shape-like arguments its kernels read from host memory,
  e.g. Reshape's shape, Expand's shape, Slice's starts/ends), so they cost a few host ops, not a
  device round trip of activations. They still trip `session.disable_cpu_ep_fallback=1`.

Constant nodes are not checked: ONNX Runtime turns them into initializers when it loads the graph,
there is no Constant kernel. Functions local to the model are inlined first, as ONNX Runtime does.

CLI: `python -m flowstep_export.pipeline.cuda_coverage ARTIFACTS_DIR_OR_MODEL...` prints problems (and the
CPU-by-design nodes) per graph and exits 1 if any graph has a problem.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import onnx

from . import cuda_kernels

CHECKED_DOMAINS = ("", "com.microsoft")
_INT_OR_BOOL = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}
_NOT_KERNELS = {("", "Constant")}  # become initializers at load time (no kernel in any provider)


@dataclass
class Report:
    nodes: int = 0
    problem_nodes: list[tuple[str, str]] = field(default_factory=list)  # (node, what is wrong)
    cpu_nodes: list[tuple[str, str]] = field(default_factory=list)  # (node, why it may stay on the CPU)
    used: set = field(default_factory=set)  # (domain, op, since version, ((arg, type), ...)) seen

    @property
    def problems(self) -> list[str]:
        return [f"{node} {what}" for node, what in self.problem_nodes]

    @property
    def cpu_by_design(self) -> list[str]:
        return [f"{node} {why}" for node, why in self.cpu_nodes]


@lru_cache(maxsize=1)
def _kernels() -> dict:
    by_op = defaultdict(list)
    for k in cuda_kernels.load()["kernels"]:
        by_op[(k["domain"], k["op"])].append(k)
    return dict(by_op)


@lru_cache(maxsize=1)
def _schemas() -> dict:
    """ONNX Runtime's own op schemas (ai.onnx and com.microsoft), all versions, by (domain, op)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    by_op = defaultdict(list)
    for s in C.get_all_operator_schema():
        by_op[(s.domain, s.name)].append(s)
    for versions in by_op.values():
        versions.sort(key=lambda s: s.since_version)
    return dict(by_op)


def _schema(domain: str, op: str, opset: int):
    found = [s for s in _schemas().get((domain, op), []) if s.since_version <= opset]
    return found[-1] if found else None


def _version_matches(k: dict, node_since: int) -> bool:
    until = k["until"]
    return k["since"] == node_since or (k["since"] < node_since and until is not None and until >= node_since)


def _elem_name(elem_type: int) -> str:
    """ONNX Runtime's spelling of an element type: FLOAT -> 'float', BFLOAT16 -> 'bfloat16'."""
    return onnx.TensorProto.DataType.Name(elem_type).lower()


def _types(graph: onnx.GraphProto, outer: dict) -> dict:
    types = dict(outer)
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = _elem_name(vi.type.tensor_type.elem_type)
    for init in graph.initializer:
        types[init.name] = _elem_name(init.data_type)
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    types[node.output[0]] = _elem_name(a.t.data_type)
    return types


def _formal_args(params, actual: list[str]) -> list[tuple[object, str]]:
    """Pairs each actual argument name with its formal parameter (the last one may be variadic)."""
    pairs = []
    for i, name in enumerate(actual):
        if not params:
            break
        p = params[min(i, len(params) - 1)]
        if i >= len(params) and "Variadic" not in str(p.option):
            break
        pairs.append((p, name))
    return pairs


def _check_node(node, opsets: dict, types: dict, where: str, report: Report) -> None:
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    if (domain, node.op_type) in _NOT_KERNELS:
        return
    report.nodes += 1
    label = f"{where}{node.name or '<unnamed>'}"
    op = f"{domain + '::' if domain else ''}{node.op_type}"
    if domain not in CHECKED_DOMAINS:
        report.problem_nodes.append((label, f"{op}: domain {domain!r} is not one the CUDA provider implements"))
        return
    opset = opsets.get(domain)
    schema = _schema(domain, node.op_type, opset) if opset is not None else None
    if schema is None:
        report.problem_nodes.append((label, f"{op}: ONNX Runtime 1.31 has no schema for it at opset {opset}"))
        return
    typeparams = {c.type_param_str for c in schema.type_constraints}
    args = defaultdict(list)  # constraint key -> [(actual name, element type)]
    seen = []
    for params, actual in ((schema.inputs, node.input), (schema.outputs, node.output)):
        for p, name in _formal_args(params, list(actual)):
            if not name:  # omitted optional argument
                continue
            t = types.get(name)
            keys = {p.name} | ({p.typeStr} if p.typeStr in typeparams else set())
            for key in keys:
                args[key].append((name, t))
            seen.append((p.name, t))
    report.used.add((domain, node.op_type, schema.since_version, tuple(seen)))
    unknown = [n for n, t in seen if t is None]
    candidates = [k for k in _kernels().get((domain, node.op_type), [])
                  if _version_matches(k, schema.since_version)]

    def fits(k):
        return all(t in allowed for key, allowed in k["types"].items() for _, t in args.get(key, []))

    if candidates and not unknown and any(fits(k) for k in candidates):
        return
    sig = ", ".join(f"{p}:{t or '?'}" for p, t in seen)
    head = f"{op} (opset {opset} -> {node.op_type}-{schema.since_version}) [{sig}]"
    if unknown:
        report.problem_nodes.append((label, f"{head}: element type unknown for {unknown}; cannot check"))
    elif not candidates:
        versions = sorted({(k['since'], k['until']) for k in _kernels().get((domain, node.op_type), [])})
        report.problem_nodes.append((label, f"{head}: no CUDA kernel for this version (CUDA has {versions or 'none'})"))
    elif all(t in _INT_OR_BOOL for _, t in seen):
        report.cpu_nodes.append((label, f"{head}: integer/bool only; shape arithmetic ONNX Runtime keeps on the CPU"))
    else:
        offered = sorted({f"{key}:{'|'.join(v)}" for k in candidates for key, v in k["types"].items()})
        report.problem_nodes.append((label, f"{head}: no CUDA kernel for these types (CUDA has {', '.join(offered)})"))


def _walk(graph: onnx.GraphProto, opsets: dict, outer: dict, where: str, report: Report) -> None:
    types = _types(graph, outer)
    for node in graph.node:
        _check_node(node, opsets, types, where, report)
        for a in node.attribute:  # If/Loop/Scan bodies
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for g in subs:
                _walk(g, opsets, types, f"{where}{node.name}/{a.name}/", report)


def analyze(model: onnx.ModelProto) -> Report:
    """Problems and CPU-by-design nodes of one model (see the module docstring)."""
    if model.functions:
        from onnx import inliner
        model = inliner.inline_local_functions(model)
    model = onnx.shape_inference.infer_shapes(model)
    opsets = {("" if o.domain in ("", "ai.onnx") else o.domain): o.version for o in model.opset_import}
    report = Report()
    _walk(model.graph, opsets, {}, "", report)
    return report


def check(model: onnx.ModelProto) -> list[str]:
    """Nodes that would not run on ONNX Runtime 1.31.1's CUDA provider (empty if all would)."""
    return analyze(model).problems


def _grouped(entries: list[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """Same message (op, types, reason) once, with its nodes, in first-seen order."""
    groups: dict[str, list[str]] = {}
    for node, what in entries:
        groups.setdefault(what, []).append(node)
    return list(groups.items())


def _model_paths(args: list[str]) -> list[Path]:
    paths = []
    for a in args:
        p = Path(a)
        paths += sorted(p.glob("*.onnx")) if p.is_dir() else [p]
    return paths


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m flowstep_export.pipeline.cuda_coverage ARTIFACTS_DIR_OR_MODEL.onnx...")
        return 0 if args else 2
    paths = _model_paths(args)
    if not paths:
        print(f"no .onnx files in {' '.join(args)}", file=sys.stderr)
        return 2
    failed = False
    for path in paths:
        report = analyze(onnx.load(str(path), load_external_data=False))
        status = "FAIL" if report.problems else "ok"
        print(f"{path}: {status}: {report.nodes} nodes, {len(report.problems)} without a CUDA kernel, "
              f"{len(report.cpu_by_design)} CPU by design")
        for kind, entries in (("problem", report.problem_nodes), ("cpu-by-design", report.cpu_nodes)):
            for what, nodes in _grouped(entries):
                more = f" (+{len(nodes) - 1} more)" if len(nodes) > 1 else ""
                print(f"  {kind}: {what}  -- e.g. node {nodes[0]}{more}")
        failed |= bool(report.problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
