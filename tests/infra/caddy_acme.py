"""Caddy's built-in ACME server (``acme_server``, step-ca's ACME inside Debian's caddy 2.6).

A second ACME server implementation for tests: it validates HTTP-01 on port 80 and
TLS-ALPN-01 on port 443 of the name's address (tests map names to 127.0.0.1 through
``tests.infra.wellknown.ensure_hosts`` and run the proxy there), keeps a challenge whose
validation failed ``pending`` with an ``error`` (RFC 8555 8.2 retries; step-ca waits for the
client to ask again), has no ARI and no profiles, and issues 12-hour certificates.

Its own HTTPS listener (``acme-ca.test`` on a free port) is signed by the CA ``local``;
issued certificates chain to the CA ``testca``. Both roots are written under ``storage``.
``skip_install_trust`` plus both CAs named in the ``pki`` block keep Caddy from installing
its roots into the system's trust store (it does so, as root, for any CA not named there).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

from tests.infra.pebble import _kill, free_port, wait_acme_directory
from tests.infra.wellknown import ensure_hosts

CADDY = shutil.which("caddy")
CA_HOST = "acme-ca.test"
CA_ID = "testca"
READY_TIMEOUT = 30.0


class CaddyAcme:
    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage = self.workdir / "storage"
        self.https_port = free_port()
        self.http_port = free_port()   # Caddy's own redirect listener, moved off :80
        self.log_path = self.workdir / "caddy.log"
        self._proc: Optional[subprocess.Popen] = None

    @property
    def directory_url(self) -> str:
        return f"https://{CA_HOST}:{self.https_port}/acme/{CA_ID}/directory"

    @property
    def trusted_ca_file(self) -> Path:
        """The root of the CA's own HTTPS listener (what ``autocert_trusted_ca_file`` names)."""
        return self.storage / "pki" / "authorities" / "local" / "root.crt"

    @property
    def issuing_root_file(self) -> Path:
        """The root that issued certificates chain to."""
        return self.storage / "pki" / "authorities" / CA_ID / "root.crt"

    def caddyfile(self) -> str:
        return f"""{{
	admin off
	skip_install_trust
	storage file_system {self.storage}
	http_port {self.http_port}
	https_port {self.https_port}
	pki {{
		ca local {{
			name "autocert-proxy test listener CA"
		}}
		ca {CA_ID} {{
			name "autocert-proxy test ACME CA"
		}}
	}}
}}
https://{CA_HOST}:{self.https_port} {{
	tls {{
		issuer internal {{
			ca local
		}}
	}}
	acme_server {{
		ca {CA_ID}
	}}
}}
"""

    def start(self) -> "CaddyAcme":
        if CADDY is None:
            raise RuntimeError("caddy (Debian package) is not installed")
        ensure_hosts([CA_HOST])
        path = self.workdir / "Caddyfile"
        path.write_text(self.caddyfile())
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.workdir),
               "XDG_DATA_HOME": str(self.workdir / "data"), "XDG_CONFIG_HOME": str(self.workdir / "config")}
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen([CADDY, "run", "--config", str(path), "--adapter", "caddyfile"],
                                          stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=env, cwd=self.workdir)
        try:   # (its roots are written at start: the directory answers once they are there)
            wait_acme_directory(self.directory_url, {"caddy": self._proc}, self.log, cafile=self.trusted_ca_file,
                                ready=self.issuing_root_file.exists, timeout=READY_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        _kill(self._proc)
        self._proc = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
