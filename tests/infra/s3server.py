"""A real S3 API for tests: moto server in a subprocess on 127.0.0.1, a free port, one bucket.

Plain functions for any test (including multi-instance proxy tests that start subprocesses):

    srv = start_s3_server()            # bucket "autocert" created
    srv.url("run-1")                   # -> "s3://autocert/run-1"   (use as autocert_dir)
    srv.env                            # env vars a subprocess (or this process) needs
    stop_s3_server(srv)

and pytest fixtures: ``s3_server`` (session-wide server) and ``s3_env`` (sets ``srv.env`` in
this process for one test).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    proc: subprocess.Popen
    port: int
    bucket: str
    env: dict = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}" if prefix else f"s3://{self.bucket}"

    def create_bucket(self, name: str) -> None:
        req = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT", data=b"")
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200, resp.status

    def object_keys(self, prefix: str = "") -> list[str]:
        """Raw object keys in the bucket (for checking where a backend really wrote)."""
        import xml.etree.ElementTree as ET
        from urllib.parse import urlencode
        keys, token = [], None
        while True:
            q = {"list-type": "2", "prefix": prefix}
            if token:
                q["continuation-token"] = token
            with urllib.request.urlopen(f"{self.endpoint}/{self.bucket}?{urlencode(q)}",
                                        timeout=10) as resp:
                root = ET.fromstring(resp.read())
            ns = {"s": root.tag.split("}")[0].strip("{")} if root.tag.startswith("{") else {}
            find = (lambda el, t: el.findall(f"s:{t}", ns)) if ns else (lambda el, t: el.findall(t))
            keys += [c.find("s:Key", ns).text if ns else c.find("Key").text
                     for c in find(root, "Contents")]
            trunc = find(root, "IsTruncated")
            if not trunc or trunc[0].text != "true":
                return keys
            token = find(root, "NextContinuationToken")[0].text


def start_s3_server(bucket: str = "autocert", timeout: float = 20.0) -> S3Server:
    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    cmd = [exe, "-H", "127.0.0.1", "-p", str(port)] if os.path.exists(exe) else \
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    srv = S3Server(proc, port, bucket)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{srv.endpoint}/", timeout=1):
                break
        except urllib.error.HTTPError:
            break                                  # any HTTP answer means it is up
        except OSError:
            if time.monotonic() > deadline:
                stop_s3_server(srv)
                raise RuntimeError(f"moto_server not ready on port {port} after {timeout}s")
            time.sleep(0.05)
    srv.create_bucket(bucket)
    srv.env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": srv.endpoint,
        # keep a developer's ~/.aws out of the picture
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    return srv


def stop_s3_server(srv: S3Server) -> None:
    if srv.proc.poll() is None:
        srv.proc.kill()
    srv.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server():
    srv = start_s3_server()
    yield srv
    stop_s3_server(srv)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server
