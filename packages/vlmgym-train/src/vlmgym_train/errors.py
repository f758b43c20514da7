"""What the command-line programs report as one line instead of a traceback.

A user error (bad flags, missing or corrupt files, data in the wrong layout, a full disk)
is printed as `<program>: error: <message>` with exit code 2; anything else is a bug and
keeps its traceback. `--debug` shows the traceback of user errors too.
"""

from __future__ import annotations

import errno
import inspect
from typing import Any

from vlmgym_envs import Env
from vlmgym_envs.data.archives import DataError

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, DataError)


def user_message(err: BaseException) -> str:
    """The one line to print for a user error."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        where = f" writing {err.filename}" if err.filename else ""
        return f"the disk is full{where}; free some space or choose another directory"
    text = str(err) or type(err).__name__
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    return " ".join(text.split())  # one line


def make_env(name: str, kwargs: dict[str, Any]) -> Env[Any]:
    """`vlmgym_envs.make(name, **kwargs)`, with an unknown name or keyword argument raised as
    a `ValueError` that names it and the choices."""
    from vlmgym_envs import registry

    try:
        factory = registry.resolve(name)
    except (KeyError, ImportError, AttributeError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        raise ValueError(f"--env_name {name!r}: {message}") from None
    takes = _keywords(factory)
    if takes is not None:
        unknown = sorted(set(kwargs) - takes)
        if unknown:
            raise ValueError(
                f"--env_kwargs: {name} takes no {', '.join(unknown)}; it takes "
                f"{', '.join(sorted(takes)) or 'nothing'}"
            )
    try:
        return registry.make(name, **kwargs)
    except TypeError as err:
        if "keyword argument" not in str(err):
            raise
        raise ValueError(f"--env_kwargs for {name}: {err}") from None


def _keywords(factory: Any) -> set[str] | None:
    """The keyword arguments `factory` takes, or None when it takes any (`**kwargs`)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL}
