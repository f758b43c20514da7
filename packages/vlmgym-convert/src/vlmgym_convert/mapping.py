"""The one table between HF tensor names and vlm-gym weight names, with both directions.

Each rule names an HF tensor (with `{i}` for a layer index), the vlm-gym weight it fills
(layer-stacked weights get one HF tensor per layer) and how the layout changes:

* `copy`: the same array (embeddings, norms).
* `flat`: a 1-D HF tensor reshaped (biases: [N*H] -> [N, H]).
* `linear`: a torch Linear weight [out, in] transposed to vlm-gym's [in..., out...]; the
  rule records how many leading vlm-gym dims are the input (e.g. o_proj [N, H, D] has 2).
* `conv`: the Conv3d patch embedding [E, C, T, p, p] as a matmul [C*T*p*p, E].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np
from vlmgym_model.qwen2_5_vl.config import Qwen2_5_VLConfig

Kind = Literal["copy", "flat", "linear", "conv"]


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # HF name, with "{i}" for the layer index when `layered`
    ours: str  # dotted vlm-gym weight name
    kind: Kind
    n_in: int = 1  # for `linear`: leading input dims of the vlm-gym layout
    layered: bool = False

    def hf_names(self, num_layers: int) -> list[str]:
        return [self.hf.format(i=i) for i in range(num_layers)] if self.layered else [self.hf]


def rules(config: Qwen2_5_VLConfig) -> list[Rule]:
    """Every tensor of a Qwen2.5-VL checkpoint, in the published (legacy) HF naming."""
    t = "model.layers.{i}."
    v = "visual.blocks.{i}."
    out = [
        Rule("model.embed_tokens.weight", "text.embed", "copy"),
        Rule("model.norm.weight", "text.norm", "copy"),
        Rule(t + "input_layernorm.weight", "text.layers.input_norm", "copy", layered=True),
        Rule(t + "self_attn.q_proj.weight", "text.layers.q_proj", "linear", layered=True),
        Rule(t + "self_attn.q_proj.bias", "text.layers.q_bias", "flat", layered=True),
        Rule(t + "self_attn.k_proj.weight", "text.layers.k_proj", "linear", layered=True),
        Rule(t + "self_attn.k_proj.bias", "text.layers.k_bias", "flat", layered=True),
        Rule(t + "self_attn.v_proj.weight", "text.layers.v_proj", "linear", layered=True),
        Rule(t + "self_attn.v_proj.bias", "text.layers.v_bias", "flat", layered=True),
        Rule(t + "self_attn.o_proj.weight", "text.layers.o_proj", "linear", 2, layered=True),
        Rule(t + "post_attention_layernorm.weight", "text.layers.post_norm", "copy", layered=True),
        Rule(t + "mlp.gate_proj.weight", "text.layers.gate_proj", "linear", layered=True),
        Rule(t + "mlp.up_proj.weight", "text.layers.up_proj", "linear", layered=True),
        Rule(t + "mlp.down_proj.weight", "text.layers.down_proj", "linear", layered=True),
        Rule("visual.patch_embed.proj.weight", "vision.patch_embed", "conv"),
        Rule(v + "norm1.weight", "vision.blocks.norm1", "copy", layered=True),
        Rule(v + "attn.qkv.weight", "vision.blocks.qkv_proj", "linear", layered=True),
        Rule(v + "attn.qkv.bias", "vision.blocks.qkv_bias", "flat", layered=True),
        Rule(v + "attn.proj.weight", "vision.blocks.o_proj", "linear", 2, layered=True),
        Rule(v + "attn.proj.bias", "vision.blocks.o_bias", "copy", layered=True),
        Rule(v + "norm2.weight", "vision.blocks.norm2", "copy", layered=True),
        Rule(v + "mlp.gate_proj.weight", "vision.blocks.gate_proj", "linear", layered=True),
        Rule(v + "mlp.gate_proj.bias", "vision.blocks.gate_bias", "copy", layered=True),
        Rule(v + "mlp.up_proj.weight", "vision.blocks.up_proj", "linear", layered=True),
        Rule(v + "mlp.up_proj.bias", "vision.blocks.up_bias", "copy", layered=True),
        Rule(v + "mlp.down_proj.weight", "vision.blocks.down_proj", "linear", layered=True),
        Rule(v + "mlp.down_proj.bias", "vision.blocks.down_bias", "copy", layered=True),
        Rule("visual.merger.ln_q.weight", "vision.merger_norm", "copy"),
        Rule("visual.merger.mlp.0.weight", "vision.merger_fc1", "linear"),
        Rule("visual.merger.mlp.0.bias", "vision.merger_fc1_bias", "copy"),
        Rule("visual.merger.mlp.2.weight", "vision.merger_fc2", "linear"),
        Rule("visual.merger.mlp.2.bias", "vision.merger_fc2_bias", "copy"),
    ]
    if not config.text.tie_word_embeddings:
        out.append(Rule("lm_head.weight", "text.lm_head", "linear"))
    return out


def canonical_hf_name(name: str) -> str:
    """Map transformers>=4.52 module names to the published checkpoint names."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    if name.startswith("model.visual."):
        return "visual." + name[len("model.visual.") :]
    return name


def hf_shape(rule: Rule, ours: tuple[int, ...], config: Qwen2_5_VLConfig) -> tuple[int, ...]:
    """The HF tensor shape that corresponds to one (per-layer) vlm-gym weight shape."""
    if rule.kind == "copy":
        return ours
    if rule.kind == "flat":
        return (math.prod(ours),)
    if rule.kind == "linear":
        return (math.prod(ours[rule.n_in :]), math.prod(ours[: rule.n_in]))
    vc = config.vision
    return (ours[1], vc.in_channels, vc.temporal_patch_size, vc.patch_size, vc.patch_size)


def to_ours(rule: Rule, arr: np.ndarray, ours: tuple[int, ...]) -> np.ndarray:
    """HF layout -> vlm-gym layout (shapes already checked)."""
    if rule.kind in ("copy", "flat"):
        return arr.reshape(ours)
    if rule.kind == "linear":
        return arr.T.reshape(ours)
    return arr.reshape(arr.shape[0], -1).T


def to_hf(rule: Rule, arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """vlm-gym layout -> HF layout `shape`."""
    if rule.kind in ("copy", "flat"):
        return arr.reshape(shape)
    if rule.kind == "linear":
        return arr.reshape(shape[1], shape[0]).T
    return arr.T.reshape(shape)
