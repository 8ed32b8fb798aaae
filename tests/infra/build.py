"""The compiled request path as the tests see it: which modules setup.py compiles, and whether
the in-place build (an editable install) still matches the sources."""
from __future__ import annotations

import ast

from tests.infra.proxyproc import REPO


def compiled_modules() -> list[str]:
    """setup.py's COMPILED list, read without running setup()."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "COMPILED":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py names no COMPILED modules")


def stale_builds() -> list[str]:
    """What in proxy/'s compiled modules would not be what the sources say: a .py or .pxd edited
    after its module was built, or a module setup.py no longer names (a rebuild leaves it)."""
    named = set(compiled_modules())
    stale = []
    for so in (REPO / "proxy").rglob("*.so"):
        stem = so.name.split(".", 1)[0]
        if ".".join(so.relative_to(REPO).with_name(stem).parts) not in named:
            stale.append(f"{so.relative_to(REPO)} is not named by setup.py any more (delete it)")
            continue
        for ext in (".py", ".pxd"):
            source = so.with_name(stem + ext)
            if source.exists() and source.stat().st_mtime > so.stat().st_mtime:
                stale.append(f"{source.relative_to(REPO)} changed after its compiled module was built")
    return sorted(stale)
