"""OCSP responders for tests.

``OpenSSLResponder``: the real thing, ``openssl ocsp`` answering for a ``TestCA`` from an
OpenSSL CA database (index.txt), signing with a delegated responder certificate.

``BadResponder``: a test double for *misbehaving* responders (garbage bodies, responses
about another certificate, responses signed by a stranger). No real responder can be made
to misbehave on demand, so this one is a small HTTP server that answers whatever bytes the
test sets, and counts requests.
"""
from __future__ import annotations

import datetime as dt
import http.server
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from .pki import Issued, TestCA

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _index_time(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%y%m%d%H%M%SZ")


def _serial_hex(cert: x509.Certificate) -> str:
    h = format(cert.serial_number, "X")
    return h if len(h) % 2 == 0 else "0" + h   # openssl looks serials up as BN_bn2hex: whole bytes


def _dn(cert: x509.Certificate) -> str:
    return "".join(f"/{a.oid._name}={a.value}" for a in cert.subject)


def ocsp_query(url: str, leaf: x509.Certificate, issuer: x509.Certificate,
               timeout: float = 2.0) -> bytes:
    """One blocking OCSP POST (for readiness checks and direct assertions)."""
    req = (ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA1()).build()
           .public_bytes(serialization.Encoding.DER))
    r = urllib.request.Request(url, data=req, headers={"Content-Type": "application/ocsp-request"})
    with urllib.request.urlopen(r, timeout=timeout) as resp:
        return resp.read()


class OpenSSLResponder:
    """``openssl ocsp`` for ``ca`` on 127.0.0.1:<free port>. Use ``url`` in issued certs."""

    def __init__(self, ca: TestCA, directory: Path, port: Optional[int] = None,
                 nmin: Optional[int] = None, signer: Optional[Issued] = None,
                 signing_args: Sequence[str] = ()):
        """``nmin``: responses valid for that many minutes (``-nmin``) instead of a day
        (``-ndays 1``), so a proxy refreshing at half-validity asks again soon.
        ``signer``: the responder certificate and key (default: an EC one the CA issues);
        ``signing_args``: more ``openssl ocsp`` arguments, e.g. ``-rsigopt rsa_padding_mode:pss``."""
        self.ca = ca
        self.nmin = nmin
        self.signing_args = list(signing_args)
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.index_path = self.dir / "index.txt"
        self.log_path = self.dir / "ocsp-responder.log"
        self.signer = signer or ca.issue(["OCSP Responder"], filename="ocsp-responder", ocsp_signing=True)
        self._entries: dict[int, tuple[x509.Certificate, Optional[dt.datetime]]] = {}
        self._last_mtime = 0
        self.proc: Optional[subprocess.Popen] = None
        self._write_index()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- the CA database ---
    def add(self, issued: Issued, wait: float = 10.0) -> None:
        """Add as valid; if running, wait (bounded) until the responder says "good"."""
        self._entries[issued.cert.serial_number] = (issued.cert, None)
        self._write_index()
        if self.proc is not None and wait:
            self.wait_status(issued, ocsp.OCSPCertStatus.GOOD, wait)

    def revoke(self, issued: Issued, when: Optional[dt.datetime] = None, wait: float = 10.0) -> None:
        """Mark revoked in index.txt and wait (bounded) until the running responder says so.

        openssl checks index.txt for changes before it waits for the next connection, so
        the first answer after a change may still be the old one: hence the polling.
        """
        when = when or dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
        self._entries[issued.cert.serial_number] = (issued.cert, when)
        self._write_index()
        if self.proc is not None and wait:
            self.wait_status(issued, ocsp.OCSPCertStatus.REVOKED, wait)

    def forget(self, issued: Issued, wait: float = 10.0) -> None:
        """Remove from the CA database: the running responder then says "unknown"."""
        self._entries.pop(issued.cert.serial_number, None)
        self._write_index()
        if self.proc is not None and wait:
            self.wait_status(issued, ocsp.OCSPCertStatus.UNKNOWN, wait)

    def wait_status(self, issued: Issued, status: ocsp.OCSPCertStatus, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                resp = ocsp.load_der_ocsp_response(ocsp_query(self.url, issued.cert, self.ca.cert))
                last = resp.certificate_status
                if last == status:
                    return
            except (OSError, ValueError) as e:
                last = e
            time.sleep(0.1)
        raise TimeoutError(f"responder did not report {status} within {timeout} s (last: {last})")

    def _write_index(self) -> None:
        lines = []
        for cert, revoked_at in self._entries.values():
            exp = _index_time(cert.not_valid_after_utc)
            if revoked_at is None:
                lines.append(f"V\t{exp}\t\t{_serial_hex(cert)}\tunknown\t{_dn(cert)}\n")
            else:
                lines.append(f"R\t{exp}\t{_index_time(revoked_at)}\t{_serial_hex(cert)}\tunknown\t{_dn(cert)}\n")
        tmp = self.index_path.with_suffix(".tmp")
        tmp.write_text("".join(lines))
        # openssl notices changes by mtime with 1 s resolution: make every write's mtime
        # strictly newer than the last one so two writes within a second are both seen.
        mtime = max(int(time.time()), self._last_mtime + 1)
        self._last_mtime = mtime
        os.utime(tmp, (mtime, mtime))
        os.replace(tmp, self.index_path)

    # --- the process ---
    def start(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            return
        self._logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [OPENSSL, "ocsp", "-index", str(self.index_path), "-port", str(self.port),
             "-rsigner", str(self.signer.cert_path), "-rkey", str(self.signer.key_path),
             "-CA", str(self.ca.cert_path),
             *self.signing_args,
             *(["-nmin", str(self.nmin)] if self.nmin else ["-ndays", "1"]), "-ignore_err"],
            stdout=self._logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"openssl ocsp exited at start-up; see {self.log_path}: "
                                   + self.log_path.read_text(errors="replace")[-2000:])
            try:   # ready = answers a real OCSP request (about its own signer: "unknown")
                ocsp_query(self.url, self.signer.cert, self.ca.cert, timeout=1.0)
                return
            except (OSError, urllib.error.URLError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"openssl ocsp not ready on {self.url} within {timeout} s")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        proc.terminate()   # by PID: the Popen object's own process only
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        self._logf.close()


# --------------------------------------------------------------------------- test double

def make_response(leaf: x509.Certificate, issuer: x509.Certificate,
                  signer_cert: x509.Certificate, signer_key, *,
                  status: ocsp.OCSPCertStatus = ocsp.OCSPCertStatus.GOOD,
                  this_update: Optional[dt.datetime] = None,
                  next_update: Optional[dt.datetime] = None,
                  no_next_update: bool = False,
                  revocation_time: Optional[dt.datetime] = None,
                  include_signer: bool = True,
                  algorithm: hashes.HashAlgorithm = hashes.SHA256()) -> bytes:
    """A signed OCSPResponse built with cryptography (for responses no real responder gives)."""
    now = dt.datetime.now(dt.timezone.utc)
    tu = this_update or now - dt.timedelta(minutes=1)
    nu = None if no_next_update else (next_update or tu + dt.timedelta(days=1))
    b = ocsp.OCSPResponseBuilder().add_response(
        cert=leaf, issuer=issuer, algorithm=hashes.SHA1(), cert_status=status,
        this_update=tu, next_update=nu,
        revocation_time=(revocation_time or now - dt.timedelta(hours=1))
        if status == ocsp.OCSPCertStatus.REVOKED else None,
        revocation_reason=None,
    ).responder_id(ocsp.OCSPResponderEncoding.HASH, signer_cert)
    if include_signer:
        b = b.certificates([signer_cert])
    return b.sign(signer_key, algorithm).public_bytes(serialization.Encoding.DER)


class BadResponder:
    """Test double for a misbehaving OCSP responder: answers ``body`` (bytes) with
    ``status`` to every GET/POST and counts requests. Runs in a thread on 127.0.0.1."""

    def __init__(self, body: bytes = b"garbage, not DER", status: int = 200,
                 reject_post: bool = False, delay: float = 0.0):
        self.body = body
        self.delay = delay               # seconds to stall before answering (a slow responder)
        self.answered = 0
        self.reject_post = reject_post   # answer POST with 405 (a GET-only responder)
        self.status = status
        self.requests = 0
        self.methods: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    self.rfile.read(min(n, 1 << 20))
                outer.requests += 1
                outer.methods.append(self.command)
                if outer.delay:
                    time.sleep(outer.delay)
                if outer.reject_post and self.command == "POST":
                    self.send_response(405)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/ocsp-response")
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)
                outer.answered += 1

            do_GET = do_POST = _answer

            def log_message(self, *a):   # quiet
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)
