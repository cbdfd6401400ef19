"""Wan DiT configurations: the real checkpoints' shapes and two toy presets."""

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
    variant: str = "t2v"
    # Default latent size used for example inputs: [in_dim, frames, height, width].
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
        if self.variant != "t2v":
            raise ValueError(f"{self.name}: only the t2v variant is exported so far")

    def to_manifest(self) -> dict:
        return {
            "name": self.name, "variant": self.variant, "dim": self.dim, "ffn_dim": self.ffn_dim,
            "num_heads": self.num_heads, "num_layers": self.num_layers, "in_dim": self.in_dim,
            "out_dim": self.out_dim, "text_dim": self.text_dim, "text_len": self.text_len,
            "freq_dim": self.freq_dim, "patch_size": list(self.patch_size), "eps": self.eps,
        }


PRESETS: dict[str, WanConfig] = {
    # A few hundred thousand parameters: the shipped demo and the CI parity tests.
    "tiny": WanConfig("tiny", dim=64, ffn_dim=256, num_heads=2, num_layers=2,
                      text_dim=64, text_len=16, freq_dim=64, example_latent=(3, 8, 8)),
    # The demo's toy world (flowstep_export.toy_world): pretrained on CPU in minutes.
    "toy": WanConfig("toy", dim=128, ffn_dim=512, num_heads=4, num_layers=4,
                     text_dim=64, text_len=16, freq_dim=64, example_latent=(4, 16, 16)),
    # Wan's block at a small width with the real text encoder shape (benchmarks).
    "small": WanConfig("small", dim=256, ffn_dim=1024, num_heads=2, num_layers=4,
                       example_latent=(5, 16, 32)),
    "wan2.1-t2v-1.3b": WanConfig("wan2.1-t2v-1.3b", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30,
                                 example_latent=(3, 16, 16)),
    "wan2.1-t2v-14b": WanConfig("wan2.1-t2v-14b", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40,
                                example_latent=(3, 16, 16)),
}


def get_config(name: str) -> WanConfig:
    try:
        config = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}") from None
    config.check()
    return config
