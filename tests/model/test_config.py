"""Config reading: the published flat layout, transformers 5's nested one, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from vlmgym_model import ConfigError, Qwen2_5_VLConfig

CONFIGS = Path(__file__).parents[1] / "fixtures" / "configs"


def load(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text())


def test_published_7b_config():
    cfg = Qwen2_5_VLConfig.from_hf_dict(load("qwen2_5_vl_7b.json"))
    t, v = cfg.text, cfg.vision
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads) == (3584, 28, 28)
    assert (t.num_key_value_heads, t.head_dim, t.vocab_size) == (4, 128, 152064)
    assert t.mrope_section == (16, 24, 24) and t.rope_theta == 1e6
    assert not t.tie_word_embeddings
    assert v.in_channels == 3 and v.patch_dim == 1176 and v.window_units == 4
    assert v.fullatt_block_indexes == (7, 15, 23, 31) and v.out_hidden_size == 3584
    assert cfg.image_token_id == 151655 and cfg.eos_token_id == 151645


def test_published_3b_config_is_tied():
    cfg = Qwen2_5_VLConfig.from_hf_dict(load("qwen2_5_vl_3b.json"))
    assert cfg.text.tie_word_embeddings
    assert (cfg.text.hidden_size, cfg.text.num_key_value_heads, cfg.text.head_dim) == (2048, 2, 128)
    assert cfg.vision.out_hidden_size == 2048


def test_nested_transformers5_layout_matches_flat():
    transformers = pytest.importorskip("transformers")
    flat = load("qwen2_5_vl_3b.json")
    hf = transformers.Qwen2_5_VLConfig.from_dict(flat)
    nested = hf.to_dict()
    assert "text_config" in nested
    assert Qwen2_5_VLConfig.from_hf_dict(nested) == Qwen2_5_VLConfig.from_hf_dict(flat)


def test_to_hf_dict_round_trips():
    cfg = Qwen2_5_VLConfig.from_hf_dict(load("qwen2_5_vl_7b.json"))
    assert Qwen2_5_VLConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_from_file_reads_a_model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(load("qwen2_5_vl_7b.json")))
    assert Qwen2_5_VLConfig.from_file(tmp_path).text.num_hidden_layers == 28
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        Qwen2_5_VLConfig.from_file(tmp_path / "nope")
    (tmp_path / "bad" / "config.json").parent.mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Qwen2_5_VLConfig.from_file(tmp_path / "bad")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["rope_scaling"].update(mrope_section=[16, 24, 16]), "sums to 56"),
        (lambda c: c.update(num_key_value_heads=5), "not a multiple of"),
        (lambda c: c.update(hidden_size=3585), "not divisible"),
        (lambda c: c.pop("vision_config"), "no vision_config"),
        (lambda c: c.update(model_type="llava"), "model_type='llava'"),
        (lambda c: c.pop("vocab_size"), "missing required fields: vocab_size"),
        (lambda c: c["vision_config"].update(fullatt_block_indexes=[7, 40]), r"\[40\]"),
        (lambda c: c["vision_config"].update(out_hidden_size=1024), "out_hidden_size=1024"),
        (lambda c: c["rope_scaling"].update(type="yarn"), "'yarn' is not supported"),
        (lambda c: c["vision_config"].update(window_size=100), "window_size=100"),
    ],
)
def test_invalid_configs_name_the_problem(edit, message):
    raw = load("qwen2_5_vl_7b.json")
    edit(raw)
    with pytest.raises(ConfigError, match=message):
        Qwen2_5_VLConfig.from_hf_dict(raw)
