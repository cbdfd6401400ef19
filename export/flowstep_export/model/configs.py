"""Wan DiT configurations: the real checkpoints' shapes (Wan2.1 T2V/I2V, Wan2.2 TI2V and the
A14B expert pairs) and tiny presets of each variant for CI."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class WanConfig:
    name: str
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    # "t2v"; "i2v": `y` (mask + image latents) concatenated to the latents on the channel axis,
    # plus CLIP image tokens when image_tokens > 0 (Wan2.1 I2V); "ti2v": the first latent frame
    # is the given image's latents, with per-token timesteps (Wan2.2 TI2V-5B).
    variant: str = "t2v"
    # CLIP image tokens through img_emb and k_img/v_img (DiffSynth's has_image_input): 257 for
    # Wan2.1 I2V, 0 for none. DiffSynth's img_emb takes CLIP ViT-H features of width 1280.
    image_tokens: int = 0
    clip_dim: int = 1280
    # Wan2.2 A14B: the fraction of DiffSynth's timestep table (index = ⌊b·1000⌋) where the
    # high-noise expert ends and the low-noise one starts, and the timestep at which inference
    # switches experts (DiffSynth's switch_DiT_boundary · 1000). None: a single model.
    expert_boundary: float | None = None
    expert_switch_timestep: float | None = None
    # Default latent size used for example inputs: [frames, height, width].
    example_latent: tuple[int, int, int] = (2, 8, 8)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def check(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"{self.name}: dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if (self.head_dim // 3) % 2:
            # Wan's 3D RoPE splits head_dim into frame/row/column parts of even size.
            raise ValueError(f"{self.name}: head_dim {self.head_dim} needs (head_dim // 3) even for 3D RoPE")
        if self.variant not in VARIANTS:
            raise ValueError(f"{self.name}: unknown variant {self.variant!r}; one of {', '.join(VARIANTS)}")
        if self.variant == "i2v" and self.in_dim <= self.out_dim:
            raise ValueError(f"{self.name}: i2v needs in_dim > out_dim (latents + y channels)")
        if self.variant != "i2v" and (self.in_dim != self.out_dim or self.image_tokens):
            raise ValueError(f"{self.name}: {self.variant} needs in_dim == out_dim and no image tokens")

    @property
    def first_frame(self) -> bool:
        """TI2V: latent frame 0 is the conditioning image, at timestep 0, and out of the loss."""
        return self.variant == "ti2v"

    @property
    def conditioning(self) -> list[tuple[str, tuple]]:
        """The conditioning inputs after x_t/timestep/context, in graph order, with their
        per-sample shapes (no batch axis) under DiffSynth's cache names."""
        if self.variant == "i2v":
            inputs = [("y", (self.in_dim - self.out_dim, "frames", "height", "width"))]
            if self.image_tokens:
                inputs.append(("clip_feature", (self.image_tokens, self.clip_dim)))
            return inputs
        if self.variant == "ti2v":
            return [("first_frame_latents", (self.out_dim, 1, "height", "width"))]
        return []

    def expert_manifest(self, role: str | None) -> dict | None:
        """manifest.expert: which expert of a pair this export is, its timestep range in
        DiffSynth's units and the switch timestep for sampling with both."""
        if self.expert_boundary is None:
            if role is not None:
                raise ValueError(f"{self.name} is a single model; --expert applies to the Wan2.2 A14B pairs")
            return None
        if role not in EXPERTS:
            raise ValueError(f"{self.name} is one expert of a pair: choose --expert {' or '.join(EXPERTS)}")
        lo, hi = (0.0, self.expert_boundary) if role == "high_noise" else (self.expert_boundary, 1.0)
        return {"role": role, "min_timestep_boundary": lo, "max_timestep_boundary": hi,
                "switch_timestep": self.expert_switch_timestep}

    def to_manifest(self) -> dict:
        model = {
            "name": self.name, "variant": self.variant, "dim": self.dim, "ffn_dim": self.ffn_dim,
            "num_heads": self.num_heads, "num_layers": self.num_layers, "in_dim": self.in_dim,
            "out_dim": self.out_dim, "text_dim": self.text_dim, "text_len": self.text_len,
            "freq_dim": self.freq_dim, "patch_size": list(self.patch_size), "eps": self.eps,
        }
        if self.conditioning:  # absent: text-to-video only (and every export before it existed)
            model["conditioning"] = [{"name": n, "shape": list(shape)} for n, shape in self.conditioning]
        return model


VARIANTS = ("t2v", "i2v", "ti2v")
EXPERTS = ("high_noise", "low_noise")
# DiffSynth-Studio's example scripts: high noise [0, 0.417) ↔ t ≥ 875 (T2V-A14B) and
# [0, 0.358) ↔ t ≥ 900 (I2V-A14B); inference switches at the same timesteps.
T2V_A14B_EXPERTS = {"expert_boundary": 0.417, "expert_switch_timestep": 875.0}
I2V_A14B_EXPERTS = {"expert_boundary": 0.358, "expert_switch_timestep": 900.0}
TINY = {"dim": 64, "ffn_dim": 256, "num_heads": 2, "num_layers": 2, "text_dim": 64, "text_len": 16, "freq_dim": 64,
        "example_latent": (3, 8, 8)}
WAN_14B = {"dim": 5120, "ffn_dim": 13824, "num_heads": 40, "num_layers": 40, "example_latent": (3, 16, 16)}


PRESETS: dict[str, WanConfig] = {
    # A few hundred thousand parameters: the shipped demo and the CI parity tests.
    "tiny": WanConfig("tiny", dim=64, ffn_dim=256, num_heads=2, num_layers=2,
                      text_dim=64, text_len=16, freq_dim=64, example_latent=(3, 8, 8)),
    # The demo's toy world (flowstep_export.data.toy_world): pretrained on CPU in minutes.
    "toy": WanConfig("toy", dim=128, ffn_dim=512, num_heads=4, num_layers=4,
                     text_dim=64, text_len=16, freq_dim=64, example_latent=(4, 16, 16)),
    # The demo's image-to-video toy (flowstep_export.data.toy_i2v): the toy with `y` as Wan2.2
    # I2V-A14B takes it (mask + first-frame latents, no CLIP), from the toy's own base.
    "toy-i2v": WanConfig("toy-i2v", dim=128, ffn_dim=512, num_heads=4, num_layers=4, in_dim=36, variant="i2v",
                         text_dim=64, text_len=16, freq_dim=64, example_latent=(4, 16, 16)),
    # Wan's block at a small width with the real text encoder shape (benchmarks).
    "small": WanConfig("small", dim=256, ffn_dim=1024, num_heads=2, num_layers=4,
                       example_latent=(5, 16, 32)),
    "wan2.1-t2v-1.3b": WanConfig("wan2.1-t2v-1.3b", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30,
                                 example_latent=(3, 16, 16)),
    "wan2.1-t2v-14b": WanConfig("wan2.1-t2v-14b", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40,
                                example_latent=(3, 16, 16)),
    "wan2.1-i2v-14b": WanConfig("wan2.1-i2v-14b", **WAN_14B, in_dim=36, variant="i2v", image_tokens=257),
    "wan2.2-ti2v-5b": WanConfig("wan2.2-ti2v-5b", dim=3072, ffn_dim=14336, num_heads=24, num_layers=30,
                                in_dim=48, out_dim=48, variant="ti2v", example_latent=(3, 16, 16)),
    "wan2.2-t2v-a14b": WanConfig("wan2.2-t2v-a14b", **WAN_14B, **T2V_A14B_EXPERTS),
    "wan2.2-i2v-a14b": WanConfig("wan2.2-i2v-a14b", **WAN_14B, in_dim=36, variant="i2v", **I2V_A14B_EXPERTS),
    # Each variant at the tiny preset's width, for the parity tests and the committed CI models.
    "tiny-i2v": WanConfig("tiny-i2v", **TINY, in_dim=36, variant="i2v", image_tokens=257),
    "tiny-ti2v": WanConfig("tiny-ti2v", **TINY, in_dim=48, out_dim=48, variant="ti2v"),
    "tiny-a14b": WanConfig("tiny-a14b", **TINY, **T2V_A14B_EXPERTS),
    "tiny-i2v-a14b": WanConfig("tiny-i2v-a14b", **TINY, in_dim=36, variant="i2v", **I2V_A14B_EXPERTS),
}


def get_config(name: str) -> WanConfig:
    try:
        config = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}") from None
    config.check()
    return config
