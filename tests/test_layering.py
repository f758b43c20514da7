"""The packages' layering, checked by walking every import in their sources.

- `vlmgym_envs` imports no JAX and no other vlm-gym package;
- `vlmgym_model` and `vlmgym_convert` import no training code;
- `vlmgym_train` imports only names `vlmgym_model` exports at its top level (its seam: a
  second model family plugs in behind those names without the trainer changing).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import vlmgym_model

PACKAGES = Path(__file__).resolve().parents[1] / "packages"


def imports(package: str) -> list[tuple[str, str, list[str]]]:
    """(file:line, module, imported names) for every import in a package's sources."""
    src = PACKAGES / package.replace("_", "-") / "src" / package
    found = []
    for path in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(PACKAGES)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                found += [(where, alias.name, []) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.append((where, node.module, [alias.name for alias in node.names]))
    return found


def test_train_uses_only_the_models_top_level_names():
    exported = set(vlmgym_model.__all__)
    bad = []
    for where, module, names in imports("vlmgym_train"):
        if module.startswith("vlmgym_model."):
            bad.append(f"{where}: imports {module}")
        elif module == "vlmgym_model":
            bad += [f"{where}: {n} is not exported" for n in names if n not in exported]
    assert not bad, "\n".join(bad)
    assert imports("vlmgym_train"), "found no sources to check"


@pytest.mark.parametrize(
    "package,forbidden",
    [
        ("vlmgym_envs", ("jax", "vlmgym_model", "vlmgym_train", "vlmgym_convert")),
        ("vlmgym_model", ("vlmgym_train", "vlmgym_convert")),
        ("vlmgym_convert", ("vlmgym_train",)),
    ],
)
def test_no_import_goes_up_the_layers(package, forbidden):
    bad = [
        f"{where}: imports {module}"
        for where, module, _ in imports(package)
        if module.split(".")[0] in forbidden
    ]
    assert not bad, "\n".join(bad)
