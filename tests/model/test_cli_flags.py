"""`vlmgym_model.cli`: dataclass fields as flags, with older spellings kept as aliases."""

from __future__ import annotations

import dataclasses

import pytest
from vlmgym_model.cli import build_parser, parse_args


@dataclasses.dataclass(frozen=True)
class Args:
    model_dir: str = dataclasses.field(metadata={"help": "where", "aliases": ("--ckpt_dir",)})
    num_generation_tokens: int = dataclasses.field(
        default=8, metadata={"aliases": ("--max_new_tokens",)}
    )
    image: list[str] = dataclasses.field(default_factory=list, metadata={"aliases": ("--images",)})
    greedy: bool = dataclasses.field(default=False, metadata={"aliases": ("--argmax",)})


def test_aliases_set_the_same_field():
    new = parse_args(Args, ["--model_dir", "m", "--num_generation_tokens=3", "--image", "a,b"])
    new = dataclasses.replace(new, greedy=True)
    old = parse_args(
        Args, ["--ckpt_dir", "m", "--max_new_tokens", "3", "--images", "a", "--image=b", "--argmax"]
    )
    assert old == new == Args("m", 3, ["a", "b"], True)


def test_required_field_is_required_under_any_spelling(capsys):
    with pytest.raises(SystemExit):
        parse_args(Args, [])
    assert "--model_dir" in capsys.readouterr().err
    assert "also --ckpt_dir" in build_parser(Args).format_help()
