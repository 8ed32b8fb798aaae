"""acme2certifier (PyPI): an ACME server in Python, here with its openssl CA handler (a local CA
made by ``TestCA``) and its sqlite ("wsgi") database, served by ``tests/infra/a2c_server.py``.

It is installed on first use into its own virtualenv (``.venv-a2c`` beside the project's
``.venv``; ``A2C_VENV`` overrides): its dependencies (``acme``, ``requests``, its own pins of
cryptography and pyOpenSSL) stay out of the proxy's environment.

What this version (0.46.3) does, as seen by these tests: HTTP-01 and TLS-ALPN-01 validated on
the name's ports 80 and 443 (names resolved through pebble-challtestsrv, every name to
127.0.0.1); a failed validation makes the challenge ``invalid`` at once, with no ``error``
in it; account registration needs a contact email; the directory offers ``renewalInfo``
(ARI) and, with ``profiles`` set, ``meta.profiles``, and an unknown profile is refused with
``invalidProfile``; IP identifiers (RFC 8738) are accepted. Plain HTTP on 127.0.0.1.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tests.infra.pebble import _kill, free_port, start_challtestsrv, wait_acme_directory
from tests.infra.pki import TestCA
from tests.infra.proxyproc import REPO

VERSION = "0.46.3"
VENV = Path(os.environ.get("A2C_VENV", REPO / ".venv-a2c"))
READY_TIMEOUT = 60.0


def python() -> Path:
    """acme2certifier's virtualenv's Python, creating the virtualenv on first use."""
    py = VENV / "bin" / "python"
    check = [str(py), "-c", f"import importlib.metadata as m; assert m.version('acme2certifier') == '{VERSION}'"]
    if py.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return py
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", f"acme2certifier=={VERSION}"],
                   check=True, timeout=900)
    return py


class Acme2Certifier:
    def __init__(self, workdir: Path, *, profiles: Optional[dict[str, str]] = None,
                 validity_days: int = 6):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.dns_port = free_port()
        self.dns_mgmt_port = free_port()
        self.ca = TestCA(self.workdir / "ca", name="acme2certifier test CA")
        self.profiles = profiles
        self.validity_days = validity_days
        self.config_path = self.workdir / "acme_srv.cfg"
        self.log_path = self.workdir / "a2c.log"
        self._proc: Optional[subprocess.Popen] = None
        self._dns: Optional[subprocess.Popen] = None

    @property
    def directory_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/directory"

    @property
    def issuing_root_file(self) -> Path:
        return self.ca.cert_path

    def _write_crl(self) -> Path:
        """The openssl handler needs a CRL file (it adds to it on revocation): an empty one."""
        now = dt.datetime.now(dt.timezone.utc)
        crl = (x509.CertificateRevocationListBuilder().issuer_name(self.ca.cert.subject)
               .last_update(now).next_update(now + dt.timedelta(days=30))
               .sign(self.ca.key, hashes.SHA256()))
        path = self.workdir / "ca" / "crl.pem"
        path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        return path

    def config(self) -> str:
        (self.workdir / "certs").mkdir(exist_ok=True)
        crl = self._write_crl()
        order = ""
        if self.profiles is not None:
            order = f"profiles: {json.dumps(self.profiles)}\nprofiles_check_disable: False\n"
        return f"""[DEFAULT]
debug: False

[Nonce]
nonce_check_disable: False

[CAhandler]
handler_module: acme2certifier.cahandlers.openssl_ca_handler
issuing_ca_key: {self.ca.key_path}
issuing_ca_cert: {self.ca.cert_path}
issuing_ca_crl: {crl}
cert_save_path: {self.workdir / 'certs'}
cert_validity_days: {self.validity_days}

[DBhandler]
handler_module: acme2certifier.dbhandlers.wsgi_handler
dbfile: {self.workdir / 'acme_srv.db'}

[Order]
{order}
[Challenge]
"""

    def start(self) -> "Acme2Certifier":
        py = python()
        self.config_path.write_text(self.config())
        self._dns = start_challtestsrv(self.dns_port, self.dns_mgmt_port, self.log_path)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "ACME_SRV_CONFIGFILE": str(self.config_path)}
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [str(py), str(Path(__file__).with_name("a2c_server.py")), str(self.port), str(self.dns_port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=self.workdir)
        try:
            wait_acme_directory(self.directory_url, {"acme2certifier": self._proc, "pebble-challtestsrv": self._dns},
                                self.log, timeout=READY_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        return self

    def directory(self) -> dict:
        with urllib.request.urlopen(self.directory_url, timeout=5) as r:
            return json.loads(r.read())

    def order_profiles(self) -> list[str]:
        """The profile of every order the CA took, oldest first ("" when none was asked)."""
        with sqlite3.connect(self.workdir / "acme_srv.db") as db:
            return [r[0] or "" for r in db.execute("SELECT profile FROM orders ORDER BY id")]

    def stop(self) -> None:
        _kill(self._proc)
        _kill(self._dns)
        self._proc = self._dns = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
