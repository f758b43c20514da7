"""`vlmgym_model.cli`: dataclass fields as flags, with older spellings kept as aliases."""

from __future__ import annotations

import dataclasses

import pytest
from vlmgym_model.cli import build_parser, flag, parse_args


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
    assert "--model_dir MODEL_DIR, --ckpt_dir MODEL_DIR" in build_parser(Args).format_help()


@dataclasses.dataclass(frozen=True)
class Inner:
    """Inner settings."""

    size: int = flag(4, "rows", name="inner_size", aliases=("--old_size",))
    fast: bool = flag(True, "go fast")


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = flag("x", "a name")
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_sections_are_flat_on_the_command_line():
    assert parse_args(Outer, []) == Outer()
    got = parse_args(Outer, ["--inner_size", "7", "--no-fast", "--name=y"])
    assert got == Outer("y", Inner(7, False))
    assert parse_args(Outer, ["--old_size=2"]).inner.size == 2
    text = build_parser(Outer).format_help()
    assert "Inner settings." in text and "--inner_size INNER_SIZE" in text


def test_two_settings_may_not_share_a_flag():
    @dataclasses.dataclass(frozen=True)
    class Clash:
        size: int = 1
        inner: Inner = dataclasses.field(default_factory=Inner)
        other: Inner = dataclasses.field(default_factory=Inner)

    with pytest.raises(TypeError, match="--inner_size"):
        build_parser(Clash)


@dataclasses.dataclass(frozen=True)
class Checked:
    size: int = flag(1, "positive")

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"--size must be >= 1, got {self.size}")


@dataclasses.dataclass(frozen=True)
class Top:
    checked: Checked = dataclasses.field(default_factory=Checked)


def test_a_section_that_rejects_its_values_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        parse_args(Top, ["--size", "0"])
    assert "--size must be >= 1, got 0" in capsys.readouterr().err
