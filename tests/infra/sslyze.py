"""sslyze (a TLS scanner on PyPI) in a virtual environment of its own, made on first use.

sslyze 6 pins cryptography below 47 while the proxy runs on a newer one (with the OpenSSL it
bundles), so the two cannot share the project's environment. ``python -m tests.infra.sslyze``
makes it ahead of the tests (scripts/test.sh does).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv-sslyze"
REQUIREMENT = "sslyze==6.3.1"


def sslyze() -> Path:
    """The sslyze command, installed into ``VENV`` first when it is not there."""
    exe = VENV / "bin" / "sslyze"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", REQUIREMENT], check=True)
    return exe


def scan(name: str, port: int, ca_file: Path, out_dir: Path, *args: str) -> tuple[int, str, dict]:
    """sslyze against 127.0.0.1:``port`` for ``name`` (SNI), trusting ``ca_file``: (exit status,
    text output, JSON result of the one server)."""
    out = out_dir / f"sslyze-{name}-{port}.json"
    r = subprocess.run([str(sslyze()), "--certinfo_ca_file", str(ca_file), "--json_out", str(out),
                        *args, f"{name}:{port}{{127.0.0.1}}"], capture_output=True, text=True, timeout=300)
    result = json.loads(out.read_text())["server_scan_results"][0] if out.exists() else {}
    return r.returncode, r.stdout + r.stderr, result


if __name__ == "__main__":
    print(sslyze())
