"""Qwen-VL architecture configs (Qwen2-VL, Qwen2.5-VL, Qwen3-VL dense), read from (and
written back to) HF `config.json`.

The family is a property of the checkpoint: `config.json`'s `model_type` picks it, and the
config records what differs between families as architecture switches (q/k norms, biases,
interleaved mRoPE, the vision tower's norm, MLP, windows, learned position table and
DeepStack), so the model code asks the config, never the family's name.

- qwen2_vl: Qwen2 text (q/k/v biases, chunked mRoPE); a LayerNorm + QuickGELU vision tower
  with full attention per image.
- qwen2_5_vl: Qwen2 text; an RMSNorm + SwiGLU tower with window attention.
- qwen3_vl: Qwen3 text (q/k RMSNorm, no biases, interleaved mRoPE); a LayerNorm + GELU(tanh)
  tower with a learned position table and DeepStack features for the first decoder layers.

Two layouts of `config.json` occur in the wild and both load here:

* the flat one of the published checkpoints (Qwen/Qwen2.5-VL-*-Instruct): text fields at
  the top level, `vision_config` nested (with `in_chans`), and
  `rope_scaling: {"type": "mrope", "mrope_section": [16, 24, 24]}`;
* the nested one that transformers 5 writes: text fields under `text_config`, rotary
  settings under `rope_parameters` (or `rope_scaling`).

The configs hold architecture only: no mesh, no dtype policy, no training settings.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
_REFUSED = {
    "qwen3_vl_moe": "Qwen3-VL MoE checkpoints (e.g. 30B-A3B) are not supported; the dense "
    "Qwen3-VL models (2B, 4B, 8B, 32B) are",
}


class ConfigError(ValueError):
    """A `config.json` that does not describe a Qwen-VL model we can build."""


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The decoder: GQA attention, SwiGLU MLP, RMSNorm, mRoPE.

    Qwen2 (Qwen2-VL, Qwen2.5-VL): q/k/v biases, mRoPE sections in chunks. Qwen3 (Qwen3-VL):
    no biases, an RMSNorm over each head's q and k before the rotary (`qk_norm`), a head
    width of its own (`head_dim`, not hidden_size / heads), and interleaved mRoPE.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 128_000
    hidden_act: str = "silu"
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    attention_bias: bool = True  # q/k/v biases (Qwen2); Qwen3 has none
    qk_norm: bool = False  # RMSNorm over head_dim on q and k (Qwen3)
    mrope_interleaved: bool = False  # Qwen3-VL: T/H/W frequencies interleaved, not chunked

    def __post_init__(self) -> None:
        if not self.head_dim and self.num_attention_heads:
            _require(
                self.hidden_size % self.num_attention_heads == 0,
                f"text config: hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads} (and no head_dim is given)",
            )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
        ):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and value > 0,
                f"text config: {name} must be a positive int, got {value!r}",
            )
        _require(self.head_dim > 0, f"text config: head_dim must be positive, got {self.head_dim}")
        _require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"text config: num_attention_heads={self.num_attention_heads} is not a multiple of "
            f"num_key_value_heads={self.num_key_value_heads} (GQA needs whole groups)",
        )
        _require(
            self.head_dim % 2 == 0, f"text config: head_dim={self.head_dim} must be even for RoPE"
        )
        _require(
            len(self.mrope_section) == 3 and all(s >= 0 for s in self.mrope_section),
            f"text config: mrope_section must hold three non-negative ints (t, h, w), "
            f"got {self.mrope_section!r}",
        )
        _require(
            sum(self.mrope_section) == self.head_dim // 2,
            f"text config: mrope_section {list(self.mrope_section)} sums to "
            f"{sum(self.mrope_section)}, but head_dim // 2 = {self.head_dim // 2} rotary "
            "frequencies need a section each",
        )
        _require(self.rope_theta > 0, f"text config: rope_theta must be > 0, got {self.rope_theta}")
        _require(self.rms_norm_eps > 0, "text config: rms_norm_eps must be > 0")
        _require(
            self.hidden_act == "silu",
            f"text config: hidden_act={self.hidden_act!r} is not supported (Qwen2 uses 'silu')",
        )

    def frequency_axes(self) -> tuple[int, ...]:
        """Which position axis (0 t, 1 h, 2 w) drives each of the head_dim // 2 rotary
        frequencies: chunks of `mrope_section` (Qwen2/2.5-VL), or interleaved (Qwen3-VL:
        h on frequencies 1, 4, 7, ... below 3 * section[1], w on 2, 5, 8, ... below
        3 * section[2], t on the rest)."""
        t, h, w = self.mrope_section
        if not self.mrope_interleaved:
            return (0,) * t + (1,) * h + (2,) * w
        axes = []
        for j in range(self.head_dim // 2):
            if j % 3 == 1 and j < 3 * h:
                axes.append(1)
            elif j % 3 == 2 and j < 3 * w:
                axes.append(2)
            else:
                axes.append(0)
        return tuple(axes)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The vision tower: a ViT with 2D RoPE over patches, and a 2x2 merger into the text.

    Qwen2.5-VL: RMSNorm, SwiGLU MLP (`hidden_act="silu"`), window attention with full
    attention in `fullatt_block_indexes`. Qwen2-VL: LayerNorm, a two-layer QuickGELU MLP,
    full attention (`window_size=0`). Qwen3-VL: LayerNorm, a GELU(tanh) MLP, full
    attention, a Conv3d bias, a learned square position table resampled to each image
    (`num_position_embeddings`), and DeepStack: the outputs of the blocks in
    `deepstack_visual_indexes` go through mergers of their own into the first decoder
    layers.
    """

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    out_hidden_size: int = 3584
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: float = 2.0
    hidden_act: str = "silu"  # "silu": SwiGLU; "quick_gelu", "gelu_pytorch_tanh": fc1-act-fc2
    rms_norm_eps: float = 1e-6  # the eps of every vision norm, RMS or Layer
    rope_theta: float = 10_000.0  # the 2D vision rotary's base (HF: rope_parameters.rope_theta)
    norm: str = "rms"  # "rms" (Qwen2.5-VL) or "layer" (LayerNorm with bias)
    patch_bias: bool = False  # the Conv3d patch embedding has a bias (Qwen3-VL)
    num_position_embeddings: int = 0  # learned position table of this many entries (a square)
    deepstack_visual_indexes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in (
            "depth",
            "hidden_size",
            "intermediate_size",
            "num_heads",
            "in_channels",
            "out_hidden_size",
            "patch_size",
            "spatial_merge_size",
            "temporal_patch_size",
        ):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and value > 0,
                f"vision config: {name} must be a positive int, got {value!r}",
            )
        _require(
            isinstance(self.window_size, int) and self.window_size >= 0,
            f"vision config: window_size must be >= 0 (0: no windows), got {self.window_size!r}",
        )
        _require(self.norm in ("rms", "layer"), f"vision config: norm={self.norm!r}")
        side = math.isqrt(self.num_position_embeddings)
        _require(
            side * side == self.num_position_embeddings,
            f"vision config: num_position_embeddings={self.num_position_embeddings} is not a "
            "square (the learned position table is side x side)",
        )
        bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
        _require(
            not bad,
            f"vision config: deepstack_visual_indexes {bad} are outside the {self.depth} blocks",
        )
        _require(
            self.hidden_size % self.num_heads == 0,
            f"vision config: hidden_size={self.hidden_size} is not divisible by "
            f"num_heads={self.num_heads}",
        )
        _require(
            self.head_dim % 4 == 0,
            f"vision config: head_dim={self.head_dim} must be a multiple of 4 for 2D RoPE",
        )
        unit = self.patch_size * self.spatial_merge_size
        _require(
            self.window_size % unit == 0,
            f"vision config: window_size={self.window_size} must be a multiple of "
            f"patch_size * spatial_merge_size = {unit}",
        )
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        _require(
            not bad,
            f"vision config: fullatt_block_indexes {bad} are outside the {self.depth} blocks",
        )
        _require(
            self.hidden_act in ("silu", "quick_gelu", "gelu_pytorch_tanh"),
            f"vision config: hidden_act={self.hidden_act!r} is not supported (silu, "
            "quick_gelu or gelu_pytorch_tanh)",
        )
        _require(
            self.rope_theta > 0, f"vision config: rope_theta must be > 0, got {self.rope_theta}"
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Inputs of the Conv3d patch embedding: C * T * p * p (1176 for Qwen2.5-VL)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        """Patches merged into one LLM token (4)."""
        return self.spatial_merge_size**2

    @property
    def window_units(self) -> int:
        """Merged units per window side: window_size / patch_size / spatial_merge_size (4);
        0 without windows."""
        return self.window_size // self.patch_size // self.spatial_merge_size

    @property
    def full_attention_blocks(self) -> tuple[int, ...]:
        """The blocks that attend over whole images (all of them without windows)."""
        return self.fullatt_block_indexes if self.window_size else tuple(range(self.depth))

    @property
    def gated_mlp(self) -> bool:
        """SwiGLU (gate, up, down) rather than fc1 -> activation -> fc2."""
        return self.hidden_act == "silu"


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig:
    """A whole Qwen-VL model of any family: text decoder, vision tower, special token ids.

    `model_type` is the family (`FAMILIES`); the switches that make the families differ
    live in `text` and `vision`. (The class keeps its first family's name; `QwenVLConfig`
    is the same class.)
    """

    text: TextConfig
    vision: VisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple[int, ...] | None = 151645
    model_type: str = "qwen2_5_vl"

    def __post_init__(self) -> None:
        _require(
            self.model_type in FAMILIES,
            f"model_type={self.model_type!r}: vlm-gym builds {', '.join(FAMILIES)}",
        )
        _require(
            self.vision.out_hidden_size == self.text.hidden_size,
            f"vision out_hidden_size={self.vision.out_hidden_size} must equal the text "
            f"hidden_size={self.text.hidden_size}: the merger feeds the decoder directly",
        )
        _require(
            len(self.vision.deepstack_visual_indexes) <= self.text.num_hidden_layers,
            f"{len(self.vision.deepstack_visual_indexes)} DeepStack features need as many "
            f"decoder layers, the text has {self.text.num_hidden_layers}",
        )
        for name in ("image_token_id", "video_token_id", "vision_start_token_id"):
            value = getattr(self, name)
            _require(
                0 <= value < self.text.vocab_size,
                f"{name}={value} is outside the vocabulary (vocab_size={self.text.vocab_size})",
            )

    # ------------------------------------------------------------------ reading

    @classmethod
    def from_hf_dict(cls, raw: Mapping[str, Any]) -> Qwen2_5_VLConfig:
        """Build from the dict of an HF `config.json`, flat or nested layout, any family."""
        _require(isinstance(raw, Mapping), "config.json must hold a JSON object")
        model_type = raw.get("model_type") or "qwen2_5_vl"
        _require(
            model_type not in _REFUSED, f"model_type={model_type!r}: {_REFUSED.get(model_type)}"
        )
        _require(
            model_type in FAMILIES,
            f"config.json has model_type={model_type!r}; vlm-gym builds {', '.join(FAMILIES)}",
        )
        text_raw: dict[str, Any] = dict(raw)
        nested = raw.get("text_config")
        if isinstance(nested, Mapping):
            # transformers 5 writes the text fields under text_config; top-level values (when
            # present, e.g. tie_word_embeddings) are only used where text_config lacks them.
            text_raw.update({k: v for k, v in nested.items() if v is not None})
        from vlmgym_model.qwen2_5_vl.hf_layout import VISION_READERS, text_config_from_hf

        text = text_config_from_hf(text_raw, model_type)
        vision_raw = raw.get("vision_config")
        _require(
            isinstance(vision_raw, Mapping),
            f"config.json has no vision_config object; is this a {model_type} checkpoint?",
        )
        vision = VISION_READERS[model_type](vision_raw)
        ids: dict[str, Any] = {}
        for name in (
            "image_token_id",
            "video_token_id",
            "vision_start_token_id",
            "vision_end_token_id",
            "bos_token_id",
            "eos_token_id",
        ):
            value = raw.get(name, text_raw.get(name))
            if value is not None:
                ids[name] = tuple(value) if isinstance(value, list) else value
        return cls(text=text, vision=vision, model_type=model_type, **ids)

    @classmethod
    def from_file(cls, path: str | Path) -> Qwen2_5_VLConfig:
        """Read `config.json` (or the `config.json` inside a model directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from err
        try:
            return cls.from_hf_dict(raw)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from err

    # ------------------------------------------------------------------ writing

    @property
    def hf_naming(self) -> Any:
        """The family's HF module names where families differ (`hf_layout.HFNaming`)."""
        from vlmgym_model.qwen2_5_vl.hf_layout import HF_NAMING

        return HF_NAMING[self.model_type]

    def to_hf_dict(self) -> dict[str, Any]:
        """The layout of the family's published checkpoints (which transformers 5 loads):
        flat for Qwen2-VL and Qwen2.5-VL, nested (`text_config`) for Qwen3-VL."""
        from vlmgym_model.qwen2_5_vl.hf_layout import write_hf_dict

        return write_hf_dict(self)


QwenVLConfig = Qwen2_5_VLConfig
