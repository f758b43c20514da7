"""Tools a model may call: declaring them, parsing Qwen's calls, checking arguments, and the
text the chat templates render around them.

    @tool
    def zoom(x0: float, y0: float, x1: float, y1: float, context: ToolContext) -> Image:
        '''Look at a region of the image at full resolution.'''

    parsed = parse_tool_calls(text)      # never raises; calls and errors in text order

Formats (Qwen2.5's and Qwen3-VL's chat templates, reproduced exactly):

- a call, as the model writes it: `<tool_call>\\n{"name": "zoom", "arguments": {...}}\\n
  </tool_call>` (`format_tool_call`); several calls per reply are allowed;
- the tools in the system prompt: the system text, then `tools_prompt(tools)`: "\\n\\n# Tools
  ..." with one JSON line per tool (`Tool.schema()`, dumped as the templates' `tojson`)
  between `<tools>` and `</tools>`, then the instructions on `<tool_call>`;
- results: the templates render each `role: tool` message as `<tool_response>\\n` + content
  + `\\n</tool_response>`, consecutive ones joined by "\\n" inside ONE user turn.
  `tool_response_message` builds that user turn directly (images as image parts, where
  Qwen3-VL's template places them), so a template without tool support (Qwen2.5-VL's)
  renders the same text as a tool-aware one does: the documented equivalent.

Parsing rules (`parse_tool_calls`): a call is the JSON object between `<tool_call>` and the
next `</tool_call>`, whitespace around it ignored. An opening tag with no closing tag is
accepted only at the very end of the text, and only when the rest of the text is exactly one
JSON call object (samplers that stop on `</tool_call>` cut the tag); anything else there is
an "unclosed" error. `"arguments"` may be missing (no arguments) or a JSON string holding
the object (the OpenAI spelling). Text outside the tags is ignored.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image

from vlmgym_envs.core import Message, as_text

ToolOutput = str | Image.Image | Sequence[str | Image.Image]
"""What a tool function returns: text, an image, or a sequence of them (in order)."""

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"

TOOLS_HEADER = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)

# Error kinds, as counted in `info["tool_errors"]`.
ERROR_KINDS: tuple[str, ...] = (
    "unclosed",  # <tool_call> without </tool_call>
    "invalid_json",  # the body is not JSON
    "not_object",  # the body is JSON but not an object
    "missing_name",  # no string "name"
    "bad_arguments",  # "arguments" not an object, or not matching the schema
    "unknown_tool",
    "exception",  # the tool raised
    "timeout",
    "bad_output",  # the tool returned something other than text or images
    "budget",  # the episode's call budget was used up
)


class ToolArgumentError(ValueError):
    """Raised by a tool function for arguments its schema cannot express as invalid
    (x0 >= x1...): reported to the model as a "bad_arguments" error."""


@dataclass(frozen=True)
class ToolContext:
    """What a tool may read besides its arguments.

    images: the episode's images at full resolution (first observation order).
    state: the wrapped environment's state of the episode (read only).
    """

    images: tuple[Image.Image, ...] = ()
    state: Any = None


@dataclass(frozen=True)
class Tool:
    """A function the model may call.

    name, description: as rendered to the model.
    parameters: the JSON schema of the arguments (an "object" schema; `check_arguments`
        documents the subset checked).
    fn: called as `fn(**arguments)`, plus `context=ToolContext(...)` when `takes_context`;
        returns a `ToolOutput`. It may raise: the model sees the error as text.
    """

    name: str
    description: str
    parameters: Mapping[str, Any]
    fn: Callable[..., ToolOutput]
    takes_context: bool = False

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"a tool needs a non-empty name, got {self.name!r}")
        if self.parameters.get("type") != "object":
            raise ValueError(f"tool {self.name}: parameters must be an object schema")

    def schema(self) -> dict[str, Any]:
        """The tool as chat templates take it in `tools=` (OpenAI's function format)."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": dict(self.parameters),
            },
        }

    def __call__(self, arguments: Mapping[str, Any], context: ToolContext) -> ToolOutput:
        """Run the function (arguments already checked)."""
        if self.takes_context:
            return self.fn(**arguments, context=context)
        return self.fn(**arguments)

    @classmethod
    def from_function(
        cls,
        fn: Callable[..., ToolOutput],
        *,
        name: str | None = None,
        description: str | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> Tool:
        """A tool from a typed Python function.

        The schema comes from the signature (int, float, str, bool, Literal[...] and
        list[...] annotations; parameters without defaults are required; no other
        properties allowed) unless `parameters` is given; a parameter named `context`
        receives the `ToolContext` and is not part of the schema. The description is the
        docstring's first paragraph, parameter descriptions its `Args:` lines.
        """
        signature = inspect.signature(fn)
        takes_context = "context" in signature.parameters
        doc = inspect.getdoc(fn) or ""
        if parameters is None:
            parameters = _signature_schema(fn, signature, _arg_docs(doc))
        summary = doc.split("\n\n")[0].strip().replace("\n", " ")
        return cls(
            name=name or fn.__name__,
            description=description if description is not None else summary,
            parameters=parameters,
            fn=fn,
            takes_context=takes_context,
        )


def tool(
    fn: Callable[..., ToolOutput] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> Any:
    """Decorator form of `Tool.from_function`: `@tool` or `@tool(name=..., ...)`."""

    def wrap(f: Callable[..., ToolOutput]) -> Tool:
        return Tool.from_function(f, name=name, description=description, parameters=parameters)

    return wrap(fn) if fn is not None else wrap


_JSON_TYPES: dict[type, str] = {int: "integer", float: "number", str: "string", bool: "boolean"}


def _annotation_schema(annotation: Any) -> dict[str, Any]:
    if annotation in _JSON_TYPES:
        return {"type": _JSON_TYPES[annotation]}
    origin = typing.get_origin(annotation)
    if origin is Literal:
        values = list(typing.get_args(annotation))
        kinds = {_JSON_TYPES.get(type(v)) for v in values}
        out: dict[str, Any] = {"enum": values}
        if len(kinds) == 1 and None not in kinds:
            out = {"type": kinds.pop(), "enum": values}
        return out
    if origin in (list, tuple, Sequence):
        args = typing.get_args(annotation)
        return {"type": "array", **({"items": _annotation_schema(args[0])} if args else {})}
    return {}


def _signature_schema(
    fn: Callable[..., Any], signature: inspect.Signature, docs: dict[str, str]
) -> dict[str, Any]:
    hints = typing.get_type_hints(fn)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for pname, param in signature.parameters.items():
        if pname == "context":
            continue
        prop = _annotation_schema(hints.get(pname, Any))
        if pname in docs:
            prop["description"] = docs[pname]
        properties[pname] = prop
        if param.default is inspect.Parameter.empty:
            required.append(pname)
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


_ARG_LINE = re.compile(r"^\s+(\w+)(?:\s*\([^)]*\))?:\s*(.+)$")


def _arg_docs(doc: str) -> dict[str, str]:
    """`name: text` lines of a Google-style `Args:` section."""
    out: dict[str, str] = {}
    _, found, rest = doc.partition("Args:")
    if not found:
        return out
    for line in rest.splitlines()[1:]:
        if line and not line[0].isspace():
            break
        match = _ARG_LINE.match(line)
        if match:
            out[match.group(1)] = match.group(2).strip()
    return out


# Parsing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    """One well-formed call: the tool's name and its arguments object."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class CallError:
    """A call that could not be run; `kind` is one of `ERROR_KINDS`."""

    kind: str
    message: str
    name: str | None = None


@dataclass(frozen=True)
class ParsedCalls:
    """What `parse_tool_calls` found: calls and errors, in the order they appear."""

    items: tuple[ToolCall | CallError, ...] = field(default_factory=tuple)

    @property
    def calls(self) -> list[ToolCall]:
        """The well-formed calls."""
        return [item for item in self.items if isinstance(item, ToolCall)]

    @property
    def errors(self) -> list[CallError]:
        """The malformed ones."""
        return [item for item in self.items if isinstance(item, CallError)]

    def __bool__(self) -> bool:
        return bool(self.items)


def parse_tool_calls(text: object) -> ParsedCalls:
    """Every `<tool_call>...</tool_call>` of `text` (see the module docstring). Never raises."""
    s = as_text(text)
    items: list[ToolCall | CallError] = []
    start = s.find(OPEN_TAG)
    while start != -1:
        body_start = start + len(OPEN_TAG)
        close = s.find(CLOSE_TAG, body_start)
        reopen = s.find(OPEN_TAG, body_start)
        if close == -1 or (reopen != -1 and reopen < close):
            at_end = reopen == -1
            item = _parse_body(s[body_start:]) if at_end else None
            if item is None or isinstance(item, CallError):
                item = CallError("unclosed", f"{OPEN_TAG} without {CLOSE_TAG}")
            items.append(item)
            start = reopen
            continue
        items.append(_parse_body(s[body_start:close]))
        start = s.find(OPEN_TAG, close + len(CLOSE_TAG))
    return ParsedCalls(tuple(items))


def _parse_body(body: str) -> ToolCall | CallError:
    try:
        obj = json.loads(body.strip())
    except (ValueError, RecursionError) as e:
        return CallError("invalid_json", f"the call is not valid JSON ({type(e).__name__})")
    if not isinstance(obj, dict):
        return CallError("not_object", 'a call must be a JSON object {"name": ..., ...}')
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return CallError("missing_name", 'a call needs a string "name"')
    arguments = obj.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            arguments = None
    if not isinstance(arguments, dict):
        return CallError("bad_arguments", '"arguments" must be a JSON object', name)
    return ToolCall(name, arguments)


# Arguments -----------------------------------------------------------------------------

_TYPE_CHECKS: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: (
        not isinstance(v, bool)
        and (isinstance(v, int) or (isinstance(v, float) and math.isfinite(v) and v.is_integer()))
    ),
    "number": lambda v: (
        not isinstance(v, bool)
        and (isinstance(v, int) or (isinstance(v, float) and math.isfinite(v)))
    ),
}


def check_arguments(schema: Mapping[str, Any], value: Any, path: str = "arguments") -> list[str]:
    """The ways `value` breaks `schema`; empty when it is valid.

    The JSON-schema subset checked: `type` (a name or a list of names; integers are numbers,
    booleans are neither, NaN and infinities are no numbers), `enum`, `minimum`, `maximum`,
    and for objects `properties`, `required` and `additionalProperties` (a bool or a
    schema), for arrays `items`. Other keywords are ignored.
    """
    problems: list[str] = []
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_TYPE_CHECKS.get(t, lambda v: True)(value) for t in names):
            return [f"{path} must be of type {' or '.join(names)}"]
    if "enum" in schema and value not in list(schema["enum"]):
        problems.append(f"{path} must be one of {json.dumps(list(schema['enum']))}")
    if _TYPE_CHECKS["number"](value):
        if "minimum" in schema and value < schema["minimum"]:
            problems.append(f"{path} must be >= {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            problems.append(f"{path} must be <= {schema['maximum']}")
    if isinstance(value, dict):
        problems += _check_object(schema, value, path)
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for i, item in enumerate(value):
            problems += check_arguments(schema["items"], item, f"{path}[{i}]")
    return problems


def _check_object(schema: Mapping[str, Any], value: dict[str, Any], path: str) -> list[str]:
    problems: list[str] = []
    properties = schema.get("properties") or {}
    for key in schema.get("required") or ():
        if key not in value:
            problems.append(f"{path} is missing {key!r}")
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        if key in properties:
            problems += check_arguments(properties[key], item, f"{path}.{key}")
        elif extra is False:
            problems.append(f"{path} has an unexpected {key!r}")
        elif isinstance(extra, Mapping):
            problems += check_arguments(extra, item, f"{path}.{key}")
    return problems


# Rendering -----------------------------------------------------------------------------


def tojson(value: Any) -> str:
    """JSON as the chat templates' `tojson` writes it (HF's: `json.dumps`, no ASCII escapes,
    keys in insertion order)."""
    return json.dumps(value, ensure_ascii=False)


def format_tool_call(name: str, arguments: Mapping[str, Any]) -> str:
    """One call exactly as Qwen's templates render an assistant's `tool_calls` entry."""
    return f'{OPEN_TAG}\n{{"name": "{name}", "arguments": {tojson(dict(arguments))}}}\n{CLOSE_TAG}'


def tools_prompt(tools: Sequence[Tool]) -> str:
    """The text the templates append to the system text when given `tools=`."""
    return TOOLS_HEADER + "".join("\n" + tojson(t.schema()) for t in tools) + TOOLS_FOOTER


def output_parts(output: ToolOutput) -> list[dict[str, Any]]:
    """A tool's output as message content parts (text parts and image parts)."""
    values = [output] if isinstance(output, str | Image.Image) else list(output)
    parts: list[dict[str, Any]] = []
    for value in values:
        if isinstance(value, Image.Image):
            parts.append({"type": "image", "image": value})
        elif isinstance(value, str):
            parts.append({"type": "text", "text": value})
        else:
            raise TypeError(f"a tool returned {type(value).__name__}, not text or an image")
    return parts


def tool_response_message(results: Sequence[Sequence[Mapping[str, Any]]]) -> Message:
    """ONE user message holding every result of a turn (each a list of content parts), as
    Qwen's templates render consecutive `role: tool` messages (see the module docstring)."""
    parts: list[dict[str, Any]] = []
    for i, result in enumerate(results):
        parts.append({"type": "text", "text": ("\n" if i else "") + "<tool_response>\n"})
        parts.extend(dict(p) for p in result)
        parts.append({"type": "text", "text": "\n</tool_response>"})
    return {"role": "user", "content": _merge_text(parts)}


def _merge_text(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adjacent text parts joined into one (templates concatenate them anyway)."""
    merged: list[dict[str, Any]] = []
    for part in parts:
        if part.get("type") == "text" and merged and merged[-1].get("type") == "text":
            merged[-1] = {"type": "text", "text": merged[-1]["text"] + part["text"]}
        else:
            merged.append(part)
    return merged
