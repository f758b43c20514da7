"""The converter on checkpoints written here (no torch): layouts, dtypes, errors, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from vlmgym_convert import ConversionError, hf_to_jax, jax_to_hf
from vlmgym_convert.cli import main
from vlmgym_convert.safetensors_io import (
    SafetensorsError,
    SafetensorsFile,
    open_checkpoint,
    write_safetensors,
)
from vlmgym_model import Qwen2_5_VLConfig, init_random_params, load_model, save_model
from vlmgym_model.checkpoint import flatten_params

RAW = {
    "model_type": "qwen2_5_vl",
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rope_scaling": {"type": "mrope", "mrope_section": [1, 2, 1]},
    "tie_word_embeddings": False,
    "image_token_id": 90,
    "video_token_id": 91,
    "vision_start_token_id": 92,
    "vision_end_token_id": 93,
    "vision_config": {
        "depth": 2,
        "hidden_size": 16,
        "intermediate_size": 24,
        "num_heads": 2,
        "out_hidden_size": 32,
        "fullatt_block_indexes": [1],
        "in_chans": 3,
    },
}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """An HF-layout checkpoint made by exporting random vlm-gym params."""
    root = tmp_path_factory.mktemp("ckpt")
    config = Qwen2_5_VLConfig.from_hf_dict(RAW)
    params = init_random_params(config, jax.random.key(0), scale=0.5)
    save_model(root / "src", config, params)
    (root / "src" / "tokenizer_config.json").write_text('{"chat_template": "x"}')
    return jax_to_hf(root / "src", root / "hf", progress=False)


def tensors(path: Path) -> dict[str, np.ndarray]:
    return {k: np.array(f.get(k)) for k, f in open_checkpoint(path).items()}


def write_variant(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    for name in ("config.json", "tokenizer_config.json"):
        (dst / name).write_text((src / name).read_text())
    t = tensors(src)
    edit(t)
    write_safetensors(dst / "model.safetensors", t)
    return dst


def test_roundtrip_is_exact_and_copies_side_files(hf_dir, tmp_path):
    hf_to_jax(hf_dir, tmp_path / "m", progress=False)
    assert (tmp_path / "m" / "tokenizer_config.json").read_text() == '{"chat_template": "x"}'
    back = jax_to_hf(tmp_path / "m", tmp_path / "hf2", progress=False)
    a, b = tensors(hf_dir), tensors(back)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
def test_reads_half_precision_and_keeps_it(hf_dir, tmp_path, dtype):
    src = write_variant(
        hf_dir, tmp_path / "half", lambda t: t.update({k: v.astype(dtype) for k, v in t.items()})
    )
    hf_to_jax(src, tmp_path / "m", progress=False)
    _, params = load_model(tmp_path / "m", dtype=jnp.float32)
    ref = tensors(hf_dir)["model.embed_tokens.weight"].astype(dtype).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(params.text.embed), ref)
    back = jax_to_hf(tmp_path / "m", tmp_path / "hf2", progress=False)
    assert SafetensorsFile(back / "model.safetensors").dtype("model.norm.weight") == dtype


def test_reads_sharded_checkpoints_and_new_style_names(hf_dir, tmp_path):
    t = tensors(hf_dir)
    out = tmp_path / "sharded"
    out.mkdir()
    (out / "config.json").write_text((hf_dir / "config.json").read_text())
    names = sorted(t)
    # transformers >= 4.52 module names, split over two shards with an index
    renamed = {
        (
            "model.language_model." + k[6:]
            if k.startswith("model.")
            else "model." + k
            if k.startswith("visual.")
            else k
        ): t[k]
        for k in names
    }
    keys = sorted(renamed)
    halves = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2 :]}
    for fname, ks in halves.items():
        write_safetensors(out / fname, {k: renamed[k] for k in ks})
    index = {"weight_map": {k: f for f, ks in halves.items() for k in ks}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    hf_to_jax(out, tmp_path / "m", progress=False)
    back = tensors(jax_to_hf(tmp_path / "m", tmp_path / "hf2", progress=False))
    for k in t:
        np.testing.assert_array_equal(back[k], t[k], err_msg=k)


def test_layouts_are_transposed_as_documented(hf_dir, tmp_path):
    hf_to_jax(hf_dir, tmp_path / "m", progress=False)
    _, params = load_model(tmp_path / "m", dtype=jnp.float32)
    t = tensors(hf_dir)
    q = t["model.layers.1.self_attn.q_proj.weight"]  # [N*H, D]
    np.testing.assert_array_equal(np.asarray(params.text.layers.q_proj[1]).reshape(32, 32), q.T)
    conv = t["visual.patch_embed.proj.weight"]  # [E, C, T, p, p]
    np.testing.assert_array_equal(np.asarray(params.vision.patch_embed), conv.reshape(16, -1).T)


def test_bad_checkpoint_names_every_problem(hf_dir, tmp_path):
    def edit(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        t["model.layers.7.self_attn.q_proj.weight"] = np.zeros((32, 32), np.float32)
        t["visual.merger.mlp.0.bias"] = np.zeros((63,), np.float32)

    bad = write_variant(hf_dir, tmp_path / "bad", edit)
    with pytest.raises(ConversionError) as err:
        hf_to_jax(bad, tmp_path / "m", progress=False)
    text = str(err.value)
    assert "missing tensors (1): model.layers.1.mlp.up_proj.weight" in text
    assert "unmapped tensors (1): model.layers.7.self_attn.q_proj.weight" in text
    assert "visual.merger.mlp.0.bias: checkpoint has [63], expected [64]" in text
    assert not (tmp_path / "m").exists(), "a failed conversion must not write anything"


def test_tied_checkpoints_may_omit_or_carry_lm_head(hf_dir, tmp_path):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    for carry in (False, True):
        d = write_variant(
            hf_dir,
            tmp_path / f"tied{carry}",
            lambda t, c=carry: None if c else t.pop("lm_head.weight"),
        )
        (d / "config.json").write_text(json.dumps(cfg))
        hf_to_jax(d, tmp_path / f"m{carry}", progress=False)
        _, params = load_model(tmp_path / f"m{carry}", dtype=jnp.float32)
        assert params.text.lm_head is None


def test_truncated_file_is_reported(hf_dir, tmp_path):
    d = tmp_path / "trunc"
    d.mkdir()
    data = (hf_dir / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(SafetensorsError, match="file truncated"):
        open_checkpoint(d)


def test_load_refuses_params_that_do_not_match_config(hf_dir, tmp_path):
    hf_to_jax(hf_dir, tmp_path / "m", progress=False)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["intermediate_size"] = 40
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"text\.layers\.gate_proj: stored"):
        load_model(tmp_path / "m")


def test_cli_both_ways(hf_dir, tmp_path, capsys):
    assert main(["--hf_dir", str(hf_dir), f"--model_dir={tmp_path / 'm'}"]) == 0
    assert "2 text layers" in capsys.readouterr().out
    assert main(["--hf_dir", str(hf_dir), "--model_dir", str(tmp_path / "m")]) == 2
    assert "--force" in capsys.readouterr().err
    assert (
        main(
            [
                "--to",
                "hf",
                "--model_dir",
                str(tmp_path / "m"),
                "--hf_dir",
                str(tmp_path / "out"),
                "--dtype",
                "bfloat16",
            ]
        )
        == 0
    )
    f = SafetensorsFile(tmp_path / "out" / "model.safetensors")
    assert f.dtype("lm_head.weight") == ml_dtypes.bfloat16
    flat = flatten_params(load_model(tmp_path / "m", dtype=jnp.float32)[1])
    assert len(flat) == 33
    with pytest.raises(SystemExit):
        main(["--to", "hf", "--model_dir", "x"])  # no --hf_dir
