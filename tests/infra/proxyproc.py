"""Start the proxy the way a user does: its CLI with a config file, in a subprocess."""
from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import yaml

REPO = Path(__file__).resolve().parents[2]
PASSED_THROUGH = ("AUTOCERT_PROXY_HTTP_PARSER", "AUTOCERT_PROXY_PURE_PYTHON")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class ProxyProcess:
    """A running ``autocert-proxy --config FILE``; ``config`` is the dict written as YAML."""

    def __init__(self, workdir: Path, config: dict, env: Optional[dict] = None, name: str = "proxy",
                 command: Optional[list] = None):
        self.workdir = Path(workdir)
        # what runs before ``--config FILE`` (e.g. the installed command under setpriv)
        self.command = list(command or [sys.executable, "-m", "proxy"])
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = dict(config)
        # a port we chose ourselves may be taken by another process before the proxy binds it
        self._auto_port = "_port" not in self.config and "address" not in self.config
        self.port = self.config.setdefault("_port", free_port())
        self.config.pop("_port")
        self.config.setdefault("address", f"127.0.0.1:{self.port}")
        self.redirect_port: Optional[int] = None
        if self.config.get("http_redirect_addr"):
            self.redirect_port = int(str(self.config["http_redirect_addr"]).rsplit(":", 1)[1])
        self.config_path = self.workdir / f"{name}.yaml"
        self.log_path = self.workdir / f"{name}.log"
        # AUTOCERT_PROXY_HTTP_PARSER and AUTOCERT_PROXY_PURE_PYTHON pass through: parts of the
        # suite run again with h11 and with the request path's Python source (scripts/test.sh).
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("AUTOCERT", "ROUTES", "ADDRESS")) or k in PASSED_THROUGH}
        self.env.update(env or {})
        self.proc: Optional[subprocess.Popen] = None
        self.write_config()

    def write_config(self, config: Optional[dict] = None) -> None:
        if config is not None:
            self.config = config
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))

    def start(self, wait: bool = True, timeout: float = 15.0) -> "ProxyProcess":
        for attempt in range(3):
            try:
                return self._start(wait, timeout)
            except RuntimeError:
                if not (self._auto_port and "already in use" in self.log() and attempt < 2):
                    raise
                self.port = free_port()
                self.config["address"] = f"127.0.0.1:{self.port}"
                self.write_config()
        raise AssertionError("unreachable")

    def _start(self, wait: bool, timeout: float) -> "ProxyProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*self.command, "--config", str(self.config_path)],
            cwd=str(REPO), env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        if wait:
            deadline = time.monotonic() + timeout
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"proxy exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    wait_port(self.port, timeout=0.2)
                    break
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"proxy did not listen in {timeout}s:\n{self.log()}")
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, text: str, timeout: float = 10.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log().count(text) >= count:
                return
            time.sleep(0.05)
        raise TimeoutError(f"{text!r} not seen {count}x in the log within {timeout}s:\n{self.log()[-4000:]}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def reload(self) -> None:
        self.signal(signal.SIGHUP)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def url(self, host: str = "localhost", path: str = "/") -> str:
        return f"https://{host}:{self.port}{path}"

    def curl(self, host: str, path: str = "/", *args: str, cacert: Optional[Path] = None,
             timeout: float = 10.0) -> subprocess.CompletedProcess:
        """curl with --resolve so that ``host`` reaches the proxy (SNI and Host = host)."""
        cmd = ["curl", "-sS", "--max-time", str(timeout), "--resolve", f"{host}:{self.port}:127.0.0.1"]
        cmd += ["--cacert", str(cacert)] if cacert else ["-k"]
        cmd += list(args) + [f"https://{host}:{self.port}{path}"]
        return subprocess.run(cmd, capture_output=True, timeout=timeout + 5)


def tls_client_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def tls_connect(port: int, server_name: Optional[str] = "localhost", timeout: float = 10.0) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return tls_client_context().wrap_socket(raw, server_hostname=server_name)


def s_client(port: int, server_name: Optional[str], *extra: str, timeout: float = 10.0) -> str:
    """``openssl s_client`` output (certificate chain, status) for one handshake."""
    cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-showcerts"]
    cmd += ["-servername", server_name] if server_name else ["-noservername"]
    cmd += list(extra)
    out = subprocess.run(cmd, input=b"", capture_output=True, timeout=timeout)
    return out.stdout.decode(errors="replace") + out.stderr.decode(errors="replace")


def served_certificate(port: int, server_name: Optional[str]):
    """The leaf certificate the proxy presents for ``server_name`` (cryptography x509)."""
    from cryptography import x509
    with tls_connect(port, server_name) as s:
        der = s.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der)


def wait_until(pred, what: str, log=lambda: "", timeout: float = 30.0):
    """``pred()``'s first true value within ``timeout`` s, else an AssertionError with ``log()``'s end."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"{what} not seen within {timeout}s:\n{log()[-4000:]}")
