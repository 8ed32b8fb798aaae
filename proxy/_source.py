"""Which form of the request path runs: the modules compiled by setup.py (Cython), or their
Python source.

The compiled modules are the same source files compiled; the interpreter prefers an
extension module to a .py of the same name. ``AUTOCERT_PROXY_PURE_PYTHON=1`` in the
environment makes this package load the sources instead (to compare the two, to debug with
Python's tools, or when a compiled module is suspected): ``use_sources`` puts a finder in
front of the import system for this package's modules.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

PACKAGE = __name__.rpartition(".")[0]


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Finds ``proxy.*`` modules as the path finder does, but takes a module's .py file over
    its compiled extension module when both are there."""

    def find_spec(self, name, path=None, target=None):
        if not name.startswith(PACKAGE + ".") or path is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or not isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
            return spec
        source = os.path.join(os.path.dirname(spec.origin), name.rpartition(".")[2] + ".py")
        if not os.path.exists(source):
            return spec   # (an installation without the sources: the compiled module it is)
        return importlib.util.spec_from_file_location(name, source) or spec


def use_sources() -> None:
    if not any(isinstance(f, _SourceFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceFinder())


def compiled(module) -> bool:
    """Whether ``module`` was loaded from a compiled extension module."""
    return isinstance(getattr(module, "__loader__", None), importlib.machinery.ExtensionFileLoader)
