"""Chat templates rendered the way Hugging Face renders them, without transformers.

A model's own Jinja template (`load_chat_template` finds it where HF looks) runs in a
sandboxed environment with `trim_blocks` and `lstrip_blocks`, the `loopcontrols`
extension, a `{% generation %}` tag, HF's `tojson` filter (no HTML escaping),
`raise_exception`, `strftime_now`, and the named special tokens (`eos_token`,
`pad_token`...) as variables. Messages reach the template as plain JSON-like data
(`template_messages`): images become the placeholder strings `"<Image>"` / `"<ndarray>"`,
keys whose value is None are dropped. `vlmgym_model.processing.Processor` renders with it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.runtime
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_JSON_FILE = "chat_template.json"
CHAT_TEMPLATE_JINJA_FILE = "chat_template.jinja"

# The named special tokens HF passes to chat templates as variables (when set).
NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

Message = Mapping[str, Any]
Conversation = Sequence[Message]


# ----------------------------------------------------------------------------------------------
# Chat template rendering


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body unchanged.

    HF uses the tag to find assistant tokens for training masks; templates that contain it must
    still parse here.
    """

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(
            lineno
        )

    def _render_body(self, caller: Callable[[], str]) -> str:
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore-prefixed attributes (no reach into internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates may not set underscore-prefixed namespace attributes: {name!r}"
            )


class _TemplateDict:
    """`dict(...)` for templates, without exposing the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in a sandbox set up as HF sets it up.

    Raises:
        jinja2.exceptions.TemplateSyntaxError: the template does not parse.
    """
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)


def template_data(value: Any) -> Any:
    """Rebuild `value` from plain JSON-like types; anything else becomes `"<TypeName>"`.

    The sandboxed template then never sees rich objects (images, arrays); templates only test
    whether media keys are present, so the rendering is unchanged.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {template_data(k): template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [template_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(template_data(v) for v in value)
    if isinstance(value, np.generic):
        return template_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: template_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return f"<{type(value).__name__}>"


_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def template_messages(conversation: Conversation) -> list[dict[str, Any]]:
    """Messages as the template sees them: plain data, None values dropped, and a message's
    reasoning offered under both `reasoning_content` and `thinking` (as HF offers it)."""
    messages = []
    for message in conversation:
        if not isinstance(message, Mapping):
            raise TypeError(f"each message must be a dict, got {type(message).__name__}")
        plain = template_data({k: v for k, v in message.items() if v is not None})
        reasoning = next((plain[k] for k in _REASONING_KEYS if plain.get(k) is not None), None)
        if reasoning is not None:
            plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
        messages.append(plain)
    return messages


# ----------------------------------------------------------------------------------------------
# Loading


def token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, or an AddedToken dict."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return str(value["content"])
    return str(value)


def read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def load_chat_template(model_dir: str | os.PathLike[str]) -> str:
    """The model's chat template, looked up where HF looks for it.

    Order: `chat_template.json` (`{"chat_template": ...}`), `chat_template.jinja`, then the
    `chat_template` key of `tokenizer_config.json` (a string, or a list of `{name, template}`
    from which "default" is taken).

    Raises:
        FileNotFoundError: none of these holds a template.
    """
    model_dir = Path(model_dir)
    json_file = model_dir / CHAT_TEMPLATE_JSON_FILE
    if json_file.is_file():
        template = read_json(json_file).get("chat_template")
        if isinstance(template, str):
            return template
        raise ValueError(f"{json_file} has no string 'chat_template' entry")
    jinja_file = model_dir / CHAT_TEMPLATE_JINJA_FILE
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    config_file = model_dir / TOKENIZER_CONFIG_FILE
    template = read_json(config_file).get("chat_template") if config_file.is_file() else None
    if isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ValueError(
            f"{config_file} has several chat templates ({sorted(map(str, named))}) but none "
            "named 'default'"
        )
    raise FileNotFoundError(
        f"no chat template in {model_dir}: looked for {CHAT_TEMPLATE_JSON_FILE}, "
        f"{CHAT_TEMPLATE_JINJA_FILE} and a 'chat_template' key in {TOKENIZER_CONFIG_FILE}"
    )
