"""Compiles the request path (the modules in COMPILED) to C extensions with Cython, when it can.

Everything else is in pyproject.toml. The modules stay plain Python source: Cython compiles
the same files, with Python's semantics (no type annotations enforced), and the interpreter
loads the compiled module in place of the source. Beside four of them a .pxd file declares the
classes that live as long as a connection (the codec's Connection, Side, ClientConnection, the
streams) as extension types with the same attributes as their __slots__, so that compiled code
reads and writes those attributes as struct fields. A keep-alive request costs about a third
less CPU that way (benchmarks/README.md, "The compiled request path"). Compiling is optional: without
Cython or a C compiler, or with AUTOCERT_PROXY_PURE_PYTHON=1 set at install time, the
package installs as pure Python and behaves the same. AUTOCERT_PROXY_PURE_PYTHON=1 at run time
makes an installed proxy load the sources instead of the compiled modules (proxy/_source.py).
"""
import os

from setuptools import Extension, setup

# The modules a proxied request runs through, hottest first (benchmarks/opcodes.py).
COMPILED = [
    "proxy.http.fastcodec",
    "proxy.http.proxy",
    "proxy.http.codec",
    "proxy.tls.transport",
    "proxy.tls.socketstream",
    "proxy.http.upstream",
    "proxy.http.routes",
    "proxy.http.access_log",
    "proxy.metrics",
]


def extensions() -> list:
    if os.environ.get("AUTOCERT_PROXY_PURE_PYTHON"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:   # (the build requirements name Cython; an offline build may lack it)
        print("autocert-proxy: Cython not available: installing the pure-Python request path")
        return []
    exts = [Extension(name, [name.replace(".", "/") + ".py"], optional=True) for name in COMPILED]
    return cythonize(exts, quiet=True, build_dir="build/cython", compiler_directives={
        "language_level": 3,
        "binding": True,             # functions keep Python's introspection (signatures, __wrapped__)
        "annotation_typing": False,  # annotations stay documentation, as in the interpreter
    })


setup(ext_modules=extensions(), options={"build_ext": {"parallel": os.cpu_count() or 1}})
