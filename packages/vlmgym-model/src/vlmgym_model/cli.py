"""One way to turn a frozen dataclass into a command line, shared by every entry point.

Each field becomes `--field_name` (both `--x=1` and `--x 1` work); `flag(...)` declares a
field with its help text, other spellings (`aliases=("--old_name",)`) and, where the flag
should not be the field's name, `name=`. Booleans accept `--flag`, `--flag=true|false` and
`--no-flag`. `list[...]`/`tuple[...]` fields may be repeated or given comma-separated;
`X | None` fields accept `none`. A field whose type is itself a dataclass is a section: its
fields become flags of their own, flat on the command line (one help group per section),
and two flags may not share a name. One name per setting across the commands; older
names as aliases.
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
_MISSING: Any = dataclasses.MISSING


def flag(
    default: Any = _MISSING,
    help: str = "",
    *,
    aliases: Sequence[str] = (),
    name: str | None = None,
    default_factory: Any = _MISSING,
) -> Any:
    """A dataclass field that `parse_args` turns into `--name` (the field's name unless
    `name` is given), also spelled as each of `aliases` (full flags, e.g. `"--ckpt_dir"`)."""
    metadata: dict[str, Any] = {"help": help, "aliases": tuple(aliases)}
    if name is not None:
        metadata["flag"] = name
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


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


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _default(field: dataclasses.Field[Any]) -> tuple[bool, Any]:
    if field.default is not dataclasses.MISSING:
        return True, field.default
    if field.default_factory is not dataclasses.MISSING:
        return True, field.default_factory()
    return False, None


def _add_field(parser: Any, field: dataclasses.Field[Any], tp: Any, dest: str) -> None:
    """Add the flag(s) of one leaf field."""
    tp, optional = _unwrap_optional(tp)
    help_text = field.metadata.get("help", "")
    has_default, default = _default(field)
    flag_name = field.metadata.get("flag", field.name)
    names = [f"--{flag_name}", *field.metadata.get("aliases", ())]
    metavar = "BOOL" if tp is bool else flag_name.upper()
    origin = typing.get_origin(tp)
    if tp is bool:
        parser.add_argument(
            *names,
            dest=dest,
            nargs="?",
            const=True,
            metavar=metavar,
            default=default,
            type=_parse_bool,
            help=help_text,
        )
        parser.add_argument(
            f"--no-{flag_name}", dest=dest, action="store_false", help=argparse.SUPPRESS
        )
    elif origin in (list, tuple):
        item = typing.get_args(tp)[0] if typing.get_args(tp) else str
        parse_item = _scalar_parser(item, False)

        def parse_list(text: str, parse_item: Any = parse_item) -> list[Any]:
            return [parse_item(p) for p in text.split(",") if p.strip()]

        parser.add_argument(
            *names, dest=dest, action="append", type=parse_list, default=None, help=help_text
        )
        parser.set_defaults(**{f"_default_{dest}": default})
    else:
        parser.add_argument(
            *names,
            dest=dest,
            type=_scalar_parser(tp, optional),
            metavar=metavar,
            default=default,
            required=not has_default,
            help=help_text,
        )


def _add_fields(parser: Any, group: Any, cls: type, prefix: str, seen: set[str]) -> None:
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        dest = prefix + field.name
        if _is_section(hints[field.name]):
            section = hints[field.name]
            doc = (section.__doc__ or "").strip().split("\n\n")[0]
            sub = parser.add_argument_group(field.name, doc)
            _add_fields(parser, sub, section, dest + ".", seen)
            continue
        flag_name = field.metadata.get("flag", field.name)
        if flag_name in seen:
            raise TypeError(f"{cls.__name__}: two settings are both --{flag_name}")
        seen.add(flag_name)
        _add_field(group, field, hints[field.name], dest)


def build_parser(cls: type, description: str | None = None, prog: str | None = None) -> Any:
    """An argparse parser with one flag per field of the dataclass `cls` (sections flat)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description or (cls.__doc__ or "").strip().split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_fields(parser, parser, cls, "", set())
    return parser


def _build(cls: type, ns: argparse.Namespace, prefix: str) -> Any:
    """An instance of `cls` from the parsed namespace, sections built first."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        dest = prefix + field.name
        if _is_section(hints[field.name]):
            values[field.name] = _build(hints[field.name], ns, dest + ".")
            continue
        value = getattr(ns, dest)
        tp, _ = _unwrap_optional(hints[field.name])
        if typing.get_origin(tp) in (list, tuple):
            if value is None:
                value = getattr(ns, f"_default_{dest}")
            else:
                value = [v for chunk in value for v in chunk]
            if typing.get_origin(tp) is tuple and value is not None:
                value = tuple(value)
        values[field.name] = value
    return cls(**values)


def parse_args(
    cls: type[T],
    argv: Sequence[str] | None = None,
    description: str | None = None,
    prog: str | None = None,
) -> T:
    """Parse `argv` (default: sys.argv[1:]) into an instance of the dataclass `cls`."""
    parser = build_parser(cls, description, prog)
    ns = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        return typing.cast(T, _build(cls, ns, ""))
    except (TypeError, ValueError) as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits
