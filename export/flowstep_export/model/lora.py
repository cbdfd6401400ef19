"""LoRA injection with PEFT/DiffSynth semantics and key names.

`blocks.0.self_attn.q` becomes a Linear with `lora_A.default` [r, in] and `lora_B.default`
[out, r]; output = W x + b + s · B A x with s = alpha / r. A is kaiming-uniform (a = √5), B is
zero. s is each LoRALinear's `lora_scale` buffer, which the exported graphs take as their
`lora_scale` input (docs/DESIGN.md §3.4): alpha is chosen at train time, rank at export time.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_TARGETS = ("q", "k", "v", "o", "ffn.0", "ffn.2")
ADAPTER = "default"
SCALE = "lora_scale"  # the buffer's name, and the graphs' input


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 32
    alpha: float | None = None  # None: alpha = rank (DiffSynth)
    targets: tuple[str, ...] = DEFAULT_TARGETS
    init: str = "kaiming"  # "kaiming" (A kaiming-uniform, B zero) or "gaussian" (A ~ N(0, 1/r))

    @property
    def scaling(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    @property
    def alpha_value(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


class LoRALinear(nn.Linear):
    """nn.Linear plus a LoRA branch; keeps `weight`/`bias` names, so base keys are unchanged."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float):
        # The base Linear's own weight and bias are used: allocate none here (14B: ~60 GB).
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        # A buffer, not a constant: the step functions bind the graphs' `lora_scale` input here.
        self.register_buffer(SCALE, torch.tensor(scaling, dtype=torch.float32), persistent=False)
        self.lora_A = nn.ModuleDict({ADAPTER: nn.Linear(base.in_features, rank, bias=False)})
        self.lora_B = nn.ModuleDict({ADAPTER: nn.Linear(rank, base.out_features, bias=False)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .fp8 import linear  # fp8 base weights are dequantized there

        base = linear(self, x)
        # float32 master weights, applied in the activations' dtype (DiffSynth: bf16 LoRA).
        # PEFT scales the output, (B·A·x)·s; scaling B instead is the same product and costs
        # one pass over [out, r] instead of two (forward, backward) over [tokens, out].
        a = self.lora_A[ADAPTER].weight.to(x.dtype)
        b = (self.lora_B[ADAPTER].weight * self.lora_scale).to(x.dtype)
        return base + F.linear(F.linear(x, a), b)


def is_target(module_name: str, targets) -> bool:
    """PEFT's suffix match: `q` hits `blocks.0.self_attn.q`, not `k_img`."""
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


def inject_lora(model: nn.Module, config: LoraConfig, seed: int = 0) -> list[str]:
    """Replace every targeted Linear by a LoRALinear; returns the LoRA parameter names in
    module order (the flat buffer's layout)."""
    generator = torch.Generator().manual_seed(seed)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and is_target(name, config.targets)]
    if not targets:
        raise ValueError(f"no Linear layer matches LoRA targets {config.targets}")
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lora = LoRALinear(module, config.rank, config.scaling)
        init_lora(lora, config, generator)
        setattr(parent, child, lora)
    return [n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def lora_modules(model: nn.Module) -> list[str]:
    """The names of the LoRALinear modules, in module order."""
    return [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def set_lora_scale(model: nn.Module, scale: float) -> None:
    """Every LoRALinear's s = alpha / r (a run's --lora-alpha, in eager references)."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.lora_scale.fill_(scale)


def init_lora(layer: LoRALinear, config: LoraConfig, generator: torch.Generator) -> None:
    a = layer.lora_A[ADAPTER].weight
    b = layer.lora_B[ADAPTER].weight
    with torch.no_grad():
        if config.init == "kaiming":
            # nn.init.kaiming_uniform_(a, a=sqrt(5)): bound = 1/sqrt(fan_in).
            bound = 1.0 / math.sqrt(a.shape[1])
            a.copy_(torch.empty(a.shape).uniform_(-bound, bound, generator=generator))
        elif config.init == "gaussian":
            a.copy_(torch.randn(a.shape, generator=generator) / config.rank)
        else:
            raise ValueError(f"unknown LoRA init {config.init!r}")
        b.zero_()


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen weights (views of the parameters, not copies: the 14B model is 57 GB)."""
    return {n: p.detach() for n, p in model.named_parameters() if ".lora_A." not in n and ".lora_B." not in n}
