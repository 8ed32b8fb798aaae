"""Command line: ``autocert-proxy --config FILE [--check]`` and ``autocert-proxy certs --config FILE``."""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import sys
from typing import Optional, Sequence

from . import __version__
from .config import ConfigError, load_config


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": round(record.created, 3), "level": record.levelname.lower(),
               "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="autocert-proxy",
        description="TLS-terminating reverse proxy with automatic ACME certificates.")
    p.add_argument("--version", action="version", version=f"autocert-proxy {__version__}")
    p.add_argument("-c", "--config", help="YAML configuration file (environment variables override it)")
    p.add_argument("--check", action="store_true", help="validate the configuration and exit")
    p.add_argument("command", nargs="?", choices=["run", "certs", "renew"], default="run",
                   help="run (default): serve; certs: print the state of every certificate; "
                        "renew [NAME...]: ask the running proxies to renew now")
    p.add_argument("names", nargs="*", help="with renew: the names (default: all managed names)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    # No collections while the configuration and its certificates are loaded (they all stay):
    # the server's start-up ends with app.settle_heap, which collects once and resumes it.
    gc.disable()
    try:
        options = load_config(args.config, os.environ, full_key_check=args.check)
    except ConfigError as e:
        print(f"autocert-proxy: {e}", file=sys.stderr)
        return 2
    finally:
        if args.command != "run" or args.check:
            gc.enable()
    if args.check:
        for w in options.warnings:   # what start-up would log as warnings
            print(f"autocert-proxy: warning: {w}", file=sys.stderr)
        print(f"configuration OK: {len(options.routes)} routes, {len(options.certificates)} certificates")
        return 0
    setup_logging(options.log_level, options.access_log_format)
    if args.command == "certs":
        from .status import print_certificates
        return asyncio.run(print_certificates(options, os.environ))
    if args.command == "renew":
        from .status import request_renewal
        return asyncio.run(request_renewal(options, args.names))
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:   # uvloop is a dependency; plain asyncio keeps working without it
        runner = asyncio.run
    from .app import App
    if options.workers > 1:
        from .workers import run_workers
        gc.enable()   # (the supervisor; each worker's start ends with settle_heap)
        return run_workers(options, runner)
    from .storage import StorageError
    try:
        runner(App(options).run_forever())
    except (OSError, StorageError) as e:   # a listener address in use, an unusable autocert_dir
        logging.getLogger("proxy").error("cannot start: %s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
