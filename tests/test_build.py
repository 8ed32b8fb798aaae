"""The request path compiled by setup.py (Cython): an install builds every module it names,
the proxy says at start which form runs, and AUTOCERT_PROXY_PURE_PYTHON=1 runs the sources."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

from tests.infra.build import compiled_modules, stale_builds
from tests.infra.proxyproc import REPO, ProxyProcess
from tests.infra.upstream import UpstreamServer

PURE = bool(os.environ.get("AUTOCERT_PROXY_PURE_PYTHON"))


def loaded_from(modules: list[str], pure: bool) -> dict[str, str]:
    """Where a fresh interpreter (the tests' one, as the proxy runs) loads each module from."""
    env = {k: v for k, v in os.environ.items() if k != "AUTOCERT_PROXY_PURE_PYTHON"}
    if pure:
        env["AUTOCERT_PROXY_PURE_PYTHON"] = "1"
    code = ("import importlib, sys\n"
            "for m in sys.argv[1:]:\n"
            "    print(m, importlib.import_module(m).__file__)\n")
    r = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True,
                       cwd=str(REPO), env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return dict(line.split(" ", 1) for line in r.stdout.splitlines())


def test_the_install_compiled_every_module_setup_names():
    modules = compiled_modules()
    assert "proxy.http.proxy" in modules and "proxy.http.fastcodec" in modules
    files = loaded_from(modules, pure=False)
    assert all(f.endswith(".so") for f in files.values()), files


def test_pure_python_setting_loads_the_sources():
    modules = compiled_modules()
    files = loaded_from(modules, pure=True)
    for m, f in files.items():
        assert f == str(REPO / (m.replace(".", "/") + ".py")), (m, f)


def test_the_proxy_says_which_request_path_runs(tmp_path):
    up = UpstreamServer()
    p = ProxyProcess(tmp_path, {"routes": [{"from": "https://app.test", "to": up.url}]})
    try:
        p.start()
        r = p.curl("app.test", "/echo")
        assert r.returncode == 0, r.stderr
        expected = "request path: Python source" if PURE else "request path: compiled (Cython)"
        assert expected in p.log(), p.log()[-2000:]
    finally:
        p.stop()
        up.stop()


def test_declared_attributes_are_the_slots():
    """A .pxd declares a class's attributes for the compiled module: one missing there would be
    an AttributeError in the compiled proxy only. Each declared class has exactly its slots."""
    pxds = sorted((REPO / "proxy").rglob("*.pxd"))
    assert pxds
    for pxd in pxds:
        declared: dict[str, set] = {}
        cls = None
        for line in pxd.read_text().splitlines():
            m = re.match(r"cdef class (\w+)", line)
            if m:
                cls = declared.setdefault(m.group(1), set())
            m = re.match(r"\s+cdef public (?:object|bint|int) (.+)", line)
            if m:
                cls.update(n.strip() for n in m.group(1).split(","))
        tree = ast.parse(pxd.with_suffix(".py").read_text())
        slots = {node.name: set(ast.literal_eval(stmt.value))
                 for node in tree.body if isinstance(node, ast.ClassDef)
                 for stmt in node.body if isinstance(stmt, ast.Assign)
                 and getattr(stmt.targets[0], "id", None) == "__slots__"}
        assert declared, pxd
        for name, attrs in declared.items():
            assert attrs == slots.get(name), (pxd.name, name, attrs ^ slots.get(name, set()))


def test_a_stale_or_leftover_compiled_module_is_reported():
    """conftest refuses to test a build that the sources no longer match (tests/infra/build.py)."""
    assert stale_builds() == []
    so = next((REPO / "proxy" / "http").glob("routes.*.so"))
    times = so.stat()
    leftover = REPO / "proxy" / "zz_leftover.cpython-311-x86_64-linux-gnu.so"
    try:
        os.utime(so, ns=(times.st_atime_ns, 0))   # built before its source was written
        leftover.write_bytes(b"")
        assert stale_builds() == [   # (routes has no .pxd)
            "proxy/http/routes.py changed after its compiled module was built",
            "proxy/zz_leftover.cpython-311-x86_64-linux-gnu.so is not named by setup.py any more (delete it)"]
    finally:
        os.utime(so, ns=(times.st_atime_ns, times.st_mtime_ns))
        leftover.unlink(missing_ok=True)
    assert stale_builds() == []
