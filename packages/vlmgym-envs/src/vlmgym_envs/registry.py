"""The environment registry: `make(name, **kwargs)` and `register(name, factory)`.

Built-in environments are registered by import path, so importing `vlmgym_envs` imports
none of their modules (nor pyarrow, scipy, pycountry...). A user registers a class or any
callable returning an `Env`:

    @vlmgym_envs.register("my-env", aliases=("mine",))
    class MyEnv(vlmgym_envs.Env): ...

    env = vlmgym_envs.make("my-env", split="train")
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, overload

from vlmgym_envs.core import Env

EnvFactory = Callable[..., Env[Any]]
F = TypeVar("F", bound=EnvFactory)

# name -> factory, or "module:attribute" resolved on first use.
_FACTORIES: dict[str, EnvFactory | str] = {
    "osv5m": "vlmgym_envs.geoguessr.env:OSV5MEnv",
    "geospot": "vlmgym_envs.geoguessr.env:GeospotEnv",
    "nlvr2": "vlmgym_envs.nlvr2:NLVR2Env",
    "caption": "vlmgym_envs.caption.env:CaptionEnv",
    "shapes": "vlmgym_envs.shapes:ShapesEnv",
    "wordcount": "vlmgym_envs.wordcount:WordCountEnv",
    "dataset": "vlmgym_envs.dataset_env:DatasetEnv",
    "geometry3k": "vlmgym_envs.tasks:Geometry3KEnv",
    "clevr_count": "vlmgym_envs.tasks:ClevrCountEnv",
    "mathvista": "vlmgym_envs.tasks:MathVistaEnv",
    "shapes_zoom": "vlmgym_envs.shapes_zoom:ShapesZoomEnv",
    "geoguessr_zoom": "vlmgym_envs.geoguessr.zoom:GeoZoomEnv",
    "geoguessr_feedback": "vlmgym_envs.geoguessr.feedback:GeoFeedbackEnv",
}
# Aliases: the names of the project vlm-gym descends from (sdan/vlm-gym) keep working.
_ALIASES: dict[str, str] = {
    "geoguessr": "osv5m",
    "truefalse": "nlvr2",
    "vision": "caption",
    "vision_caption": "caption",
    "osv5m_zoom": "geoguessr_zoom",
    "osv5m_feedback": "geoguessr_feedback",
}


def _key(name: str) -> str:
    return name.strip().lower()


@overload
def register(
    name: str, factory: None = None, *, aliases: Iterable[str] = (), overwrite: bool = False
) -> Callable[[F], F]: ...
@overload
def register(
    name: str, factory: F | str, *, aliases: Iterable[str] = (), overwrite: bool = False
) -> F | str: ...
def register(
    name: str,
    factory: EnvFactory | str | None = None,
    *,
    aliases: Iterable[str] = (),
    overwrite: bool = False,
) -> Any:
    """Register an environment under `name` (and `aliases`), case-insensitively.

    `factory` is an `Env` subclass, any callable returning an `Env`, or an import path
    `"package.module:Attribute"` resolved on first `make`. Without `factory`, `register`
    returns a decorator. Registering a taken name raises unless `overwrite=True`.
    """
    if factory is None:

        def decorator(obj: F) -> F:
            register(name, obj, aliases=aliases, overwrite=overwrite)
            return obj

        return decorator
    if not (callable(factory) or (isinstance(factory, str) and ":" in factory)):
        raise TypeError(f"factory must be callable or 'module:attribute', got {factory!r}")
    key = _key(name)
    alias_keys = [_key(a) for a in aliases]
    if not overwrite:
        for k in [key, *alias_keys]:
            if k in _FACTORIES or k in _ALIASES:
                raise ValueError(f"environment name {k!r} is taken; pass overwrite=True")
    _ALIASES.pop(key, None)
    _FACTORIES[key] = factory
    for alias in alias_keys:
        _FACTORIES.pop(alias, None)
        _ALIASES[alias] = key
    return factory


def unregister(name: str) -> None:
    """Remove an environment and its aliases (or just the alias, when `name` is one)."""
    key = _key(name)
    if key in _ALIASES:
        del _ALIASES[key]
        return
    if key not in _FACTORIES:
        raise KeyError(f"no environment named {name!r}")
    del _FACTORIES[key]
    for alias in [a for a, target in _ALIASES.items() if target == key]:
        del _ALIASES[alias]


def available() -> dict[str, list[str]]:
    """Registered names, each with its aliases."""
    return {
        name: sorted(a for a, target in _ALIASES.items() if target == name)
        for name in sorted(_FACTORIES)
    }


def resolve(name: str) -> EnvFactory:
    """The factory registered under `name` or one of its aliases.

    An unregistered `"package.module:Attribute"` is imported directly, so command lines
    can name an environment that no imported module registered (`--env_name my.mod:Env`).
    """
    key = _key(name)
    key = _ALIASES.get(key, key)
    if key not in _FACTORIES and ":" in name:
        return _import_factory(name.strip())
    if key not in _FACTORIES:
        known = ", ".join(sorted([*_FACTORIES, *_ALIASES]))
        raise KeyError(f"no environment named {name!r}; known: {known}")
    factory = _FACTORIES[key]
    if isinstance(factory, str):
        factory = _FACTORIES[key] = _import_factory(factory)
    return factory


def make(name: str, **kwargs: Any) -> Env[Any]:
    """Build the environment registered under `name` (an alias works too) with `kwargs`."""
    env = resolve(name)(**kwargs)
    if not isinstance(env, Env):
        raise TypeError(f"the factory for {name!r} returned {type(env).__name__}, not an Env")
    return env


def _import_factory(spec: str) -> Callable[..., Any]:
    """The callable `"package.module:Attribute"` names (imported now)."""
    module_name, _, attribute = spec.partition(":")
    factory = getattr(importlib.import_module(module_name), attribute)
    if not callable(factory):
        raise TypeError(f"{spec} is not callable")
    return factory
