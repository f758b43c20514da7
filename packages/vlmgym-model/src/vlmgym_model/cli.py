"""One way to turn a frozen dataclass into a command line, shared by every entry point.

Each field becomes `--field_name` (both `--x=1` and `--x 1` work). Help text comes from
`field(metadata={"help": ...})`. Booleans accept `--flag`, `--flag=true|false` and
`--no-flag`. `list[...]`/`tuple[...]` fields may be repeated or given comma-separated;
`X | None` fields accept `none`. `metadata={"aliases": ("--old_name",)}` keeps other
spellings of a flag working (one name per setting across the commands; older names as
aliases).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _scalar_parser(tp: Any, optional: bool) -> Any:
    def parse(text: str) -> Any:
        if optional and text.strip().lower() in ("none", "null", ""):
            return None
        if tp is bool:
            return _parse_bool(text)
        if typing.get_origin(tp) is typing.Literal:
            choices = typing.get_args(tp)
            if text not in choices:
                raise argparse.ArgumentTypeError(f"choose one of {list(choices)}, got {text!r}")
            return text
        try:
            return tp(text)
        except (TypeError, ValueError) as err:
            raise argparse.ArgumentTypeError(
                f"expected {getattr(tp, '__name__', tp)}, got {text!r}"
            ) from err

    return parse


def build_parser(cls: type, description: str | None = None, prog: str | None = None) -> Any:
    """An argparse parser with one flag per field of the dataclass `cls`."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description or (cls.__doc__ or "").strip().split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        tp, optional = _unwrap_optional(hints[field.name])
        help_text = field.metadata.get("help", "")
        has_default = (
            field.default is not dataclasses.MISSING
            or field.default_factory is not dataclasses.MISSING
        )
        default = (
            field.default
            if field.default is not dataclasses.MISSING
            else (field.default_factory() if has_default else None)  # type: ignore[misc]
        )
        names = [f"--{field.name}", *field.metadata.get("aliases", ())]
        if names[1:]:
            help_text += f" (also {', '.join(names[1:])})"
        origin = typing.get_origin(tp)
        if tp is bool:
            parser.add_argument(
                *names,
                dest=field.name,
                nargs="?",
                const=True,
                default=default,
                type=_parse_bool,
                help=help_text,
            )
            parser.add_argument(
                f"--no-{field.name}", dest=field.name, action="store_false", help=argparse.SUPPRESS
            )
        elif origin in (list, tuple):
            item = typing.get_args(tp)[0] if typing.get_args(tp) else str
            parse_item = _scalar_parser(item, False)

            def parse_list(text: str, parse_item: Any = parse_item) -> list[Any]:
                return [parse_item(p) for p in text.split(",") if p.strip()]

            parser.add_argument(
                *names,
                dest=field.name,
                action="append",
                type=parse_list,
                default=None,
                help=help_text,
            )
            parser.set_defaults(**{f"_default_{field.name}": default})
        else:
            parser.add_argument(
                *names,
                dest=field.name,
                type=_scalar_parser(tp, optional),
                default=default,
                required=not has_default,
                help=help_text,
            )
    return parser


def parse_args(
    cls: type[T],
    argv: Sequence[str] | None = None,
    description: str | None = None,
    prog: str | None = None,
) -> T:
    """Parse `argv` (default: sys.argv[1:]) into an instance of the dataclass `cls`."""
    parser = build_parser(cls, description, prog)
    ns = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        value = getattr(ns, field.name)
        tp, _ = _unwrap_optional(hints[field.name])
        if typing.get_origin(tp) in (list, tuple):
            if value is None:
                value = getattr(ns, f"_default_{field.name}")
            else:
                value = [v for chunk in value for v in chunk]
            if typing.get_origin(tp) is tuple and value is not None:
                value = tuple(value)
        values[field.name] = value
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits
