"""The functions the graphs compute, over a flat LoRA buffer and named base weights:
training step (loss, gradient accumulation), eval loss, inference velocity, and AdamW."""

from __future__ import annotations

import dataclasses

import torch
from torch.func import functional_call

from ..model.lora import SCALE, lora_modules
from ..model.model import WanModel


@dataclasses.dataclass(frozen=True)
class LoraTensor:
    key: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def flat_layout(lora: dict[str, torch.Tensor], order: list[str]) -> list[LoraTensor]:
    layout, offset = [], 0
    for key in order:
        shape = tuple(lora[key].shape)
        layout.append(LoraTensor(key, shape, offset))
        offset += layout[-1].numel
    return layout


def flatten(lora: dict[str, torch.Tensor], layout: list[LoraTensor]) -> torch.Tensor:
    return torch.cat([lora[t.key].reshape(-1).float() for t in layout])


def unflatten(flat: torch.Tensor, layout: list[LoraTensor]) -> tuple[torch.Tensor, ...]:
    return tuple(flat[t.offset : t.offset + t.numel].reshape(t.shape) for t in layout)


def sft_loss(velocity: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, first_frame: bool = False) -> torch.Tensor:
    """FlowMatchSFTLoss: w(t) · mean((v - target)²) in float32; with first-frame conditioning
    (TI2V) frame 0 is the given image and stays out of the loss, as in DiffSynth."""
    if first_frame:
        velocity, target = velocity[:, :, 1:], target[:, :, 1:]
    return weight * torch.mean((velocity.float() - target.float()) ** 2)


class _LossAndGrad(torch.nn.Module):
    """Loss and LoRA gradient inside one functional_call, so that activation checkpointing's
    recompute (run during the backward) still sees the traced weights, not the module's own.
    Autograd's engine rather than torch.func: custom ops (attention.py) and checkpointing
    support it; torch.func.grad rejects both."""

    def __init__(self, model: WanModel):
        super().__init__()
        self.model = model

    def forward(self, lora_tensors, x_t, timestep, context, target, weight, *conditioning):
        velocity = self.model(x_t, timestep, context, *conditioning)
        loss = sft_loss(velocity, target, weight, self.model.config.first_frame)
        return loss, torch.autograd.grad(loss, lora_tensors)


class StepFunctions:
    """Closures over the model and the layouts, with positional signatures for tracing."""

    def __init__(self, model: WanModel, layout: list[LoraTensor], base_names: list[str]):
        self.model = model
        self.loss_and_grad = _LossAndGrad(model)
        self.layout = layout
        self.base_names = base_names
        self.scale_names = [f"{m}.{SCALE}" for m in lora_modules(model)]

    def _params(self, lora_tensors, lora_scale, base_tensors):
        params = dict(zip(self.base_names, base_tensors))
        params.update({t.key: v for t, v in zip(self.layout, lora_tensors)})
        # One graph input feeds every LoRA layer's scale.
        params.update(dict.fromkeys(self.scale_names, lora_scale))
        return params

    def _velocity(self, lora_tensors, lora_scale, base_tensors, x_t, timestep, context, conditioning):
        return functional_call(self.model, self._params(lora_tensors, lora_scale, base_tensors), (x_t, timestep, context, *conditioning))

    def training(self, lora_params, grad_accum, lora_scale, *rest):
        """(lora_params, grad_accum, lora_scale, *base, x_t, timestep, context, target, weight,
        *conditioning) -> (loss, grad_accum_out)"""
        nb = len(self.base_names)
        base, batch = rest[:nb], rest[nb:]
        # Differentiate w.r.t. the split tensors, not the flat vector: a flat-vector gradient
        # turns every slice's backward into a full-length scatter (docs/DESIGN.md §2).
        lora = [t.detach().requires_grad_(True) for t in unflatten(lora_params, self.layout)]
        params = {f"model.{k}": v for k, v in self._params(lora, lora_scale, base).items()}
        with torch.enable_grad():
            loss, grads = functional_call(self.loss_and_grad, params, (lora, *batch))
        flat_grad = torch.cat([g.reshape(-1) for g in grads])
        return loss.detach(), grad_accum + flat_grad

    def eval(self, lora_params, lora_scale, *rest):
        """(lora_params, lora_scale, *base, x_t, timestep, context, target, weight, *conditioning) -> (loss,)"""
        nb = len(self.base_names)
        base, (x_t, timestep, context, target, weight, *conditioning) = rest[:nb], rest[nb:]
        velocity = self._velocity(unflatten(lora_params, self.layout), lora_scale, base, x_t, timestep, context, conditioning)
        return (sft_loss(velocity, target, weight, self.model.config.first_frame),)

    def inference(self, lora_params, lora_scale, *rest):
        """(lora_params, lora_scale, *base, x_t, timestep, context, *conditioning) -> (velocity,)"""
        nb = len(self.base_names)
        base, (x_t, timestep, context, *conditioning) = rest[:nb], rest[nb:]
        velocity = self._velocity(unflatten(lora_params, self.layout), lora_scale, base, x_t, timestep, context, conditioning)
        return (velocity.float(),)  # the contract's float32, whatever the compute dtype


def adamw(params, grads, m, v, lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2, grad_scale):
    """torch.optim.AdamW (decoupled decay, bias-corrected moments, eps outside the sqrt) on
    flat buffers; `grad_norm` is the L2 norm of the gradient actually applied.

    `params_nonfinite` counts the updated parameters that are NaN or ±Inf (float32; exact up
    to 2^24, and 0 exactly when every one is finite): the trainer keeps an update only when it
    is 0, so it never copies the parameters off the device to look. A finite gradient can
    still overflow the update (huge lr or weight decay). IsNaN and IsInf are explicit ONNX ops
    (ATen keeps isnan/isinf undecomposed; isfinite would decompose to `x == x` tests), with
    float kernels in ONNX Runtime's CUDA provider, and nothing folds them away."""
    g = grads * grad_scale
    grad_norm = torch.sqrt(torch.sum(g * g))
    params = params * (1.0 - lr * weight_decay)
    m = m + (g - m) * (1.0 - beta1)
    v = v * beta2 + g * g * (1.0 - beta2)
    denom = torch.sqrt(v) / torch.sqrt(bias_correction2) + eps
    params = params - (lr / bias_correction1) * (m / denom)
    params_nonfinite = torch.sum((torch.isnan(params) | torch.isinf(params)).to(torch.float32))
    return params, m, v, grad_norm, params_nonfinite
