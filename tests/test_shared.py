"""Shared storage end to end: several proxies (started from the CLI) on one bucket, one Pebble.

Real servers only: moto (S3) and fake-gcs-server (GCS) from ``tests/infra``, Pebble, curl.

"Who orders" is decided by the proxies' own locks, so to prove that a challenge was answered
by an instance that did NOT place the order the tests gate the ACME conversation: before the
proxies start, the test writes the account lock record (``locks/account_<issuer>.lock``, the
storage layout's lock, as another instance registering the account would) with a lease far in
the future. Every instance then contends for the per-name lock ``issue_cert_<name>`` and the
winners wait for the account lock, holding their name lock. The test reads the name lock
records (owner = ``host:pid:uuid``) to learn which process will order each name, starts Pebble
with its validation port on a process that holds no name lock, and deletes the gate record.
Pebble is started only then: its directory URL is fixed when the ``Pebble`` object is made,
its ports are written to its config at ``start``.
"""
from __future__ import annotations

import http.server
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Callable, Optional
from unittest import mock
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from proxy.autocert.challenges import safe_key
from proxy.autocert.issuer import issuer_id
from tests.infra import gcsserver, s3server
from tests.infra.gcsserver import gcs_server  # noqa: F401  (fixture)
from tests.infra.pebble import Pebble, pebble_factory  # noqa: F401  (fixture)
from tests.infra.proxyproc import REPO, ProxyProcess, free_port, served_certificate, wait_port
from tests.infra.s3server import s3_server  # noqa: F401  (fixture)

# Quick maintenance checks; a failure is not retried within a test.
FAST = {"AUTOCERT_PROXY_CHECK_INTERVAL": "0.2", "AUTOCERT_PROXY_RETRY_BASE": "300"}
ISSUE_TIMEOUT = 30.0
PREFIX = "team-a/autocert"


# --------------------------------------------------------------------------------------------
# a bucket (or a directory) seen raw, not through the code under test
# --------------------------------------------------------------------------------------------
class Bucket:
    """One S3 bucket (moto), GCS bucket (fake-gcs-server) or directory, with raw access."""

    def __init__(self, kind: str, tmp: Path):
        self.kind = kind
        self.root = tmp / "file-store"
        self.srv = None
        if kind == "s3":
            self.srv = s3server.start_s3_server()
        elif kind == "gcs":
            self.srv = gcsserver.start_gcs_server()
        else:
            self.root.mkdir()

    @property
    def env(self) -> dict:
        return dict(self.srv.env) if self.srv is not None else {}

    def url(self, prefix: str) -> str:
        return self.srv.url(prefix) if self.srv is not None else str(self.root / prefix)

    def stop(self) -> None:
        if self.kind == "s3":
            s3server.stop_s3_server(self.srv)
        elif self.kind == "gcs":
            gcsserver.stop_gcs_server(self.srv)

    def restart(self) -> None:
        """Start the store again on the same port, with the bucket created again (empty)."""
        port = self.srv.port
        mod, start = (s3server, s3server.start_s3_server) if self.kind == "s3" else \
            (gcsserver, gcsserver.start_gcs_server)
        with mock.patch.object(mod, "free_port", lambda: port):
            deadline = time.monotonic() + 10
            while True:                        # the old port may linger for a moment
                try:
                    srv = start(self.srv.bucket)
                    break
                except RuntimeError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        assert srv.port == port
        self.srv = srv
        self._client = None

    # raw object access (S3: signed, as moto keeps objects private to their writer)
    def _s3(self):
        if getattr(self, "_client", None) is None:
            import boto3
            self._client = boto3.client(
                "s3", endpoint_url=self.srv.endpoint, region_name="us-east-1",
                aws_access_key_id=self.srv.env["AWS_ACCESS_KEY_ID"],
                aws_secret_access_key=self.srv.env["AWS_SECRET_ACCESS_KEY"])
        return self._client

    def _obj_url(self, name: str) -> str:
        return f"{self.srv.endpoint}/storage/v1/b/{self.srv.bucket}/o/{quote(name, safe='')}"

    def keys(self) -> list[str]:
        if self.kind == "s3":
            return self.srv.object_keys()
        if self.kind == "gcs":
            return self.srv.object_names()
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())

    def get(self, name: str) -> Optional[bytes]:
        if self.kind == "file":
            p = self.root / name
            return p.read_bytes() if p.exists() else None
        if self.kind == "s3":
            try:
                return self._s3().get_object(Bucket=self.srv.bucket, Key=name)["Body"].read()
            except self._s3().exceptions.NoSuchKey:
                return None
        url = self._obj_url(name) + "?alt=media"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise

    def put(self, name: str, data: bytes) -> None:
        if self.kind == "file":
            p = self.root / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            return
        if self.kind == "s3":
            self._s3().put_object(Bucket=self.srv.bucket, Key=name, Body=data)
            return
        req = urllib.request.Request(
            f"{self.srv.endpoint}/upload/storage/v1/b/{self.srv.bucket}/o?uploadType=media"
            f"&name={quote(name, safe='')}", data=data, method="POST",
            headers={"Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status in (200, 201), r.status

    def delete(self, name: str) -> None:
        if self.kind == "file":
            (self.root / name).unlink()
            return
        if self.kind == "s3":
            self._s3().delete_object(Bucket=self.srv.bucket, Key=name)
            return
        req = urllib.request.Request(self._obj_url(name), method="DELETE")
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status in (200, 204), r.status


@pytest.fixture
def bucket_factory(tmp_path):
    made: list[Bucket] = []

    def make(kind: str) -> Bucket:
        b = Bucket(kind, tmp_path)
        made.append(b)
        return b

    yield make
    for b in made:
        b.stop()


def quiet_port() -> int:
    """A port free for TCP and UDP on 127.0.0.1 below the kernel's ephemeral range, so that no
    outgoing connection takes it between now and a late bind (Pebble starts mid-test)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t, \
                    socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                t.bind(("127.0.0.1", port))
                u.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port
    raise RuntimeError("no quiet port")


@pytest.fixture
def idle_pebble(tmp_path):
    """A Pebble object not started yet: its directory URL is known (proxies are configured
    with it), its validation ports are set by the test before ``start``."""
    ca = Pebble(tmp_path / "pebble")
    ca.acme_port, ca.mgmt_port, ca.dns_port, ca.dns_mgmt_port = (quiet_port() for _ in range(4))
    ca._write_config()
    yield ca
    ca.stop()


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def from_pebble(cert: x509.Certificate) -> bool:
    cn = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    return bool(cn) and str(cn[0].value).startswith("Pebble Intermediate CA")


def wait_served(proxy: ProxyProcess, name: str, pred: Callable[[x509.Certificate], bool],
                timeout: float = ISSUE_TIMEOUT, peers: tuple[ProxyProcess, ...] = ()) -> x509.Certificate:
    """Wait until ``proxy`` serves a certificate for ``name`` that satisfies ``pred``; give up at
    once when it or a peer logs a failed issuance (nothing retries within a test)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        for p in (proxy, *peers):
            if "autocert: obtaining a certificate for" in p.log():
                raise AssertionError(f"{p.config_path.stem}: issuance failed:\n{p.log()[-4000:]}")
        try:
            last = served_certificate(proxy.port, name)
        except OSError:
            last = None
        if last is not None and pred(last):
            return last
        time.sleep(0.05)
    raise AssertionError(f"{proxy.config_path.stem}: wanted certificate for {name} not served in "
                         f"{timeout}s (last: {last and hex(last.serial_number)})\n{proxy.log()[-4000:]}")


def proxy_config(ca: Pebble, store_url: str, names: list[str], port: int, upstream_url: str,
                 **extra) -> dict:
    cfg = {
        "_port": port,
        "autocert": True,
        "autocert_ca": ca.directory_url,
        "autocert_trusted_ca_file": str(ca.trusted_ca_file),
        "autocert_dir": store_url,
        "routes": [{"from": f"https://{n}", "to": upstream_url} for n in names],
    }
    cfg.update(extra)
    return cfg


def start_together(start_proxy, configs: list[dict], env: dict) -> list[ProxyProcess]:
    """Launch all processes first, then wait for each to listen (the same moment, give or take
    a fork)."""
    procs = [start_proxy(cfg, env=env, name=f"p{i}", wait=False) for i, cfg in enumerate(configs)]
    for p in procs:
        deadline = time.monotonic() + 20
        while True:
            assert p.proc.poll() is None, f"{p.config_path.stem} exited:\n{p.log()}"
            try:
                wait_port(p.port, timeout=0.2)
                break
            except TimeoutError:
                assert time.monotonic() < deadline, f"{p.config_path.stem} not listening:\n{p.log()}"
    return procs


def cli(proxy: ProxyProcess, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", *args, "--config", str(proxy.config_path)],
                          cwd=str(REPO), env=proxy.env, capture_output=True, text=True, timeout=timeout)


def lock_obj(prefix: str, lock: str) -> str:
    return f"{prefix}/locks/{lock}.lock"


class AccountGate:
    """Holds the account lock (as a record another instance could have written) until opened."""

    def __init__(self, bucket: Bucket, prefix: str, ca: Pebble):
        self.bucket = bucket
        self.key = lock_obj(prefix, f"account_{issuer_id(ca.directory_url)}")
        bucket.put(self.key, json.dumps({"owner": "test-gate:0:gate", "expires": time.time() + 300}).encode())

    def open(self) -> None:
        self.bucket.delete(self.key)


def wait_lock_holders(bucket: Bucket, prefix: str, names: list[str], procs: list[ProxyProcess],
                      timeout: float = 20.0) -> dict[str, ProxyProcess]:
    """name -> the process holding ``issue_cert_<name>`` (read from the raw lock records)."""
    by_pid = {p.proc.pid: p for p in procs}
    deadline = time.monotonic() + timeout
    holders: dict[str, ProxyProcess] = {}
    while len(holders) < len(names):
        for n in names:
            data = bucket.get(lock_obj(prefix, f"issue_cert_{safe_key(n)}"))
            if data:
                pid = int(json.loads(data)["owner"].rsplit(":", 2)[1])
                assert pid in by_pid, f"lock for {n} held by unknown pid {pid}"
                holders[n] = by_pid[pid]
        if len(holders) < len(names):
            assert time.monotonic() < deadline, \
                f"name locks not all taken in {timeout}s: {bucket.keys()}\n" + \
                "\n".join(p.log()[-1500:] for p in procs)
            time.sleep(0.05)
    return holders


class KeyWatcher(threading.Thread):
    """Records every raw object key seen in the bucket while it runs."""

    def __init__(self, bucket: Bucket):
        super().__init__(daemon=True)
        self.bucket = bucket
        self.interval = 0.05 if bucket.kind == "s3" else 0.01   # moto is the slow one
        self.seen: set[str] = set()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.seen.update(self.bucket.keys())
            except Exception:
                pass
            self._halt.wait(self.interval)

    def stop(self) -> set[str]:
        self._halt.set()
        self.join(10)
        self.seen.update(self.bucket.keys())
        return self.seen


def wait_locks_released(bucket: Bucket, prefix: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while any(k.startswith(f"{prefix}/locks/") and k.endswith(".lock") for k in bucket.keys()):
        assert time.monotonic() < deadline, f"locks still held after {timeout}s: {bucket.keys()}"
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------
# three instances, one bucket: one order per name, TLS-ALPN-01 answered by a non-orderer
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["s3", "gcs", "file"])
def test_three_instances_one_order_per_name_all_serve_it(kind, bucket_factory, idle_pebble,
                                                         start_proxy, upstream, tmp_path):
    bucket = bucket_factory(kind)
    names = ["one.test", "two.test"]
    ca = idle_pebble
    gate = AccountGate(bucket, PREFIX, ca)
    ports = [free_port() for _ in range(3)]
    procs = start_together(start_proxy, [proxy_config(ca, bucket.url(PREFIX), names, port, upstream.url)
                                         for port in ports], {**FAST, **bucket.env})
    holders = wait_lock_holders(bucket, PREFIX, names, procs)
    orderers = set(holders.values())
    bystander = next(p for p in procs if p not in orderers)

    # The CA reaches only an instance that ordered nothing: each TLS-ALPN-01 validation is
    # answered from the challenge the orderer wrote to storage.
    ca.tls_port = bystander.port
    ca._write_config()
    ca.start()
    watcher = KeyWatcher(bucket)
    watcher.start()
    gate.open()

    serials = {}
    for n in names:
        certs = [wait_served(p, n, from_pebble, peers=tuple(procs)) for p in procs]
        assert len({c.serial_number for c in certs}) == 1, \
            f"{n}: instances serve different certificates {[hex(c.serial_number) for c in certs]}"
        assert x509.DNSName(n) in certs[0].extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
        serials[n] = certs[0].serial_number
    wait_locks_released(bucket, PREFIX)      # every instance is past its locked re-check
    seen = watcher.stop()

    # exactly one ACME order per name, placed by the lock holder, nobody else
    assert Counter(ca.validated_names()) == {n: 1 for n in names}, ca.validated_names()
    assert ca.order_count() == 2
    assert sorted(ca.issued_serials()) == sorted(serials.values())
    for n in names:
        placed = [p for p in procs if f"autocert: obtained a certificate for {n} " in p.log()]
        assert placed == [holders[n]], (n, [p.config_path.stem for p in placed])
    assert "obtained a certificate" not in bystander.log()
    assert "acme-tls/1 handshake" not in bystander.log()    # no "no pending challenge" warning
    for p in procs:
        assert p.proc.poll() is None, p.log()
        assert "Traceback" not in p.log(), p.log()

    # the prefix is honoured for every object: certificates, account, locks, challenges
    issuer = issuer_id(ca.directory_url)
    outside = [k for k in seen if not k.startswith(PREFIX + "/")]
    assert not outside, outside
    rel = {k[len(PREFIX) + 1:] for k in seen}
    for n in names:
        assert f"certificates/{issuer}/{n}/{n}.crt" in rel
        assert f"certificates/{issuer}/{n}/{n}.key" in rel
        assert f"locks/issue_cert_{n}.lock" in rel
        assert f"acme/{issuer}/challenge_tokens/{n}.json" in rel, sorted(rel)
    assert any(k.startswith(f"acme/{issuer}/users/") and k.endswith(".key") for k in rel), sorted(rel)
    # the stored certificate is the one served
    for n in names:
        stored = x509.load_pem_x509_certificate(
            bucket.get(f"{PREFIX}/certificates/{issuer}/{n}/{n}.crt"))
        assert stored.serial_number == serials[n]

    # curl trusts it through every instance
    root = tmp_path / "root.pem"
    root.write_bytes(ca.issuing_root_pem())
    for p in procs:
        out = p.curl("two.test", "/shared", cacert=root)
        assert out.returncode == 0, out.stderr
        assert b'"path": "/shared"' in out.stdout


# --------------------------------------------------------------------------------------------
# HTTP-01 answered by an instance that did not place the order
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_http01_answered_by_the_instance_that_did_not_order(kind, bucket_factory, idle_pebble,
                                                            start_proxy, upstream, tmp_path):
    bucket = bucket_factory(kind)
    name = "h01.test"
    ca = idle_pebble
    gate = AccountGate(bucket, PREFIX, ca)
    ports = [free_port() for _ in range(4)]
    cfgs = [proxy_config(ca, bucket.url(PREFIX), [name], ports[i], upstream.url,
                         http_redirect_addr=f"127.0.0.1:{ports[2 + i]}") for i in range(2)]
    procs = start_together(start_proxy, cfgs, {**FAST, **bucket.env})
    orderer = wait_lock_holders(bucket, PREFIX, [name], procs)[name]
    helper = next(p for p in procs if p is not orderer)

    # TLS-ALPN-01 reaches nobody (a closed port), so the orderer falls back to HTTP-01; the
    # CA's HTTP-01 request reaches only the other instance's redirect listener.
    ca.tls_port = free_port()
    ca.http_port = helper.redirect_port
    ca._write_config()
    ca.start()
    gate.open()

    certs = [wait_served(p, name, from_pebble, peers=(orderer, helper)) for p in (orderer, helper)]
    assert certs[0].serial_number == certs[1].serial_number
    wait_locks_released(bucket, PREFIX)
    olog, hlog = orderer.log(), helper.log()
    assert f"autocert: obtained a certificate for {name} " in olog
    assert "tls-alpn-01 validation failed for h01.test" in olog
    assert "answered HTTP-01" not in olog
    assert f"answered HTTP-01 challenge for {name}" in hlog
    assert "obtained a certificate" not in hlog
    assert ca.order_count() == 2                    # the TLS-ALPN-01 attempt, then HTTP-01
    assert Counter(ca.validated_names()) == {name: 2}
    root = tmp_path / "root.pem"
    root.write_bytes(ca.issuing_root_pem())
    out = helper.curl(name, "/", cacert=root)
    assert out.returncode == 0, out.stderr


# --------------------------------------------------------------------------------------------
# the store goes away while serving, comes back, renewal proceeds
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_store_outage_keeps_serving_then_renewal_proceeds(kind, bucket_factory, pebble_factory,
                                                          start_proxy, upstream, tmp_path):
    bucket = bucket_factory(kind)
    name = "outage.test"
    port = free_port()
    metrics_port = free_port()
    ca = pebble_factory(tls_port=port)
    proxy = start_proxy(proxy_config(ca, bucket.url(PREFIX), [name], port, upstream.url,
                                     metrics_address=f"127.0.0.1:{metrics_port}"),
                        env={**FAST, **bucket.env})
    first = wait_served(proxy, name, from_pebble)
    root = tmp_path / "root.pem"
    root.write_bytes(ca.issuing_root_pem())
    assert proxy.curl(name, "/", cacert=root).returncode == 0
    describe = bucket.url(PREFIX)

    bucket.stop()
    # the maintenance checks (every 0.2 s) now fail against the store: logged, once
    proxy.wait_log("storage unreachable", timeout=15)
    for _ in range(5):
        out = proxy.curl(name, "/during", cacert=root)
        assert out.returncode == 0, (out.stderr, proxy.log()[-3000:])
        assert b'"path": "/during"' in out.stdout
    # a renewal cannot be requested while the store is down: a clear error, not a hang
    req = cli(proxy, "renew")
    assert req.returncode != 0
    assert describe in req.stderr, req.stderr
    time.sleep(1.0)                                 # several more failing checks
    assert proxy.proc.poll() is None, proxy.log()
    assert proxy.log().count("storage unreachable") == 1, proxy.log()[-3000:]
    assert "Traceback" not in proxy.log(), proxy.log()
    # logged once, but counted every time (a failed S3 call can take seconds: botocore retries)
    deadline = time.monotonic() + 20
    while True:
        scraped = subprocess.run(["curl", "-sS", f"http://127.0.0.1:{metrics_port}/metrics"],
                                 capture_output=True, text=True, timeout=10).stdout
        faults = [ln for ln in scraped.splitlines() if ln.startswith("autocert_proxy_storage_errors_total")]
        if sum(float(ln.rsplit(" ", 1)[1]) for ln in faults) >= 2:
            break
        assert time.monotonic() < deadline, scraped
        time.sleep(0.2)
    assert proxy.log().count("storage unreachable") == 1, proxy.log()[-3000:]
    assert served_certificate(proxy.port, name).serial_number == first.serial_number

    bucket.restart()                                # same port, bucket created again, empty
    req = cli(proxy, "renew")
    assert req.returncode == 0, req.stderr
    assert f"renewal requested: {name}" in req.stdout
    second = wait_served(proxy, name, lambda c: from_pebble(c) and c.serial_number != first.serial_number)
    log = proxy.log()
    assert f"renewal of {name} requested" in log
    assert "storage reachable again" in log
    assert ca.order_count() == 2
    issuer = issuer_id(ca.directory_url)
    stored = bucket.get(f"{PREFIX}/certificates/{issuer}/{name}/{name}.crt")
    assert stored is not None, bucket.keys()
    assert x509.load_pem_x509_certificate(stored).serial_number == second.serial_number
    out = proxy.curl(name, "/after", cacert=root)
    assert out.returncode == 0, out.stderr
    assert proxy.proc.poll() is None


# --------------------------------------------------------------------------------------------
# unusable autocert_dir: a clear error at start, non-zero exit
# --------------------------------------------------------------------------------------------
class _RefusingTokenServer(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        body = b'{"error": "invalid_grant", "error_description": "Invalid JWT Signature."}'
        self.send_response(400)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def refusing_gcs_credentials(tmp_path):
    """A service-account key file whose token endpoint (local) refuses it."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RefusingTokenServer)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    info = {"type": "service_account", "client_email": "proxy@example.iam.gserviceaccount.com",
            "private_key_id": "k1", "token_uri": f"http://127.0.0.1:{srv.server_port}/token",
            "private_key": key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()).decode()}
    path = tmp_path / "sa.json"
    path.write_text(json.dumps(info))
    yield {"GOOGLE_APPLICATION_CREDENTIALS": str(path), "GCE_METADATA_HOST": "127.0.0.1:9"}
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def moto_with_auth():
    """A moto server that checks credentials (it knows no access key, so refuses all)."""
    port = s3server.free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    try:
        wait_port(port, timeout=20)
        yield port
    finally:
        proc.kill()
        proc.wait(10)


def s3_env(endpoint: str) -> dict:
    return {"AWS_ACCESS_KEY_ID": "AKIAREFUSEDREFUSED00", "AWS_SECRET_ACCESS_KEY": "nope",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint,
            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


def _bad_store_case(case: str, request) -> tuple[str, dict, str]:
    """(autocert_dir, env, the reason the error must give)"""
    if case == "malformed-s3-bucket":
        return "s3://Not_A_Bucket!/p", {}, "bucket name 'Not_A_Bucket!' has characters other than"
    if case == "malformed-gs-no-bucket":
        return "gs:///only/a/prefix", {}, "missing bucket name"
    if case == "malformed-s3-port":
        return "s3://bucket:9000/p", {}, "a port is not allowed in the URL"
    if case == "missing-bucket-s3":
        srv = request.getfixturevalue("s3_server")
        return "s3://no-such-bucket/p", srv.env, "bucket 'no-such-bucket' does not exist"
    if case == "missing-bucket-gcs":
        srv = request.getfixturevalue("gcs_server")
        return "gs://no-such-bucket/p", srv.env, "bucket 'no-such-bucket' does not exist"
    if case == "refused-s3":
        port = request.getfixturevalue("moto_with_auth")
        return "s3://autocert/p", s3_env(f"http://127.0.0.1:{port}"), "refused"
    if case == "refused-gcs":
        return "gs://autocert/p", request.getfixturevalue("refusing_gcs_credentials"), "refused"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["malformed-s3-bucket", "malformed-gs-no-bucket", "malformed-s3-port",
                                  "missing-bucket-s3", "missing-bucket-gcs", "refused-s3", "refused-gcs"])
def test_unusable_autocert_dir_is_a_clear_error_at_start(case, request, tmp_path):
    url, env, reason = _bad_store_case(case, request)
    cfg = {"address": f"127.0.0.1:{free_port()}", "autocert": True,
           "autocert_ca": "https://127.0.0.1:9/dir", "autocert_dir": url,
           "routes": [{"from": "https://bad.test", "to": "http://127.0.0.1:9"}]}
    p = ProxyProcess(tmp_path / "p", {**cfg, "_port": int(cfg["address"].rsplit(":", 1)[1])},
                     env={"AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                          **env}, name="p")
    if "STORAGE_EMULATOR_HOST" not in env:
        p.env.pop("STORAGE_EMULATOR_HOST", None)
    p.start(wait=False)
    try:
        p.proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        p.kill()
        raise AssertionError(f"proxy still running with autocert_dir={url!r}:\n{p.log()}")
    finally:
        p.stop()
    log = p.log()
    assert p.proc.returncode != 0, log
    assert "autocert_dir" in log and reason in log, log
    assert "Traceback" not in log, log
    # the error is one line that names the setting and its value
    line = next(ln for ln in log.splitlines() if "autocert_dir" in ln)
    assert reason in line and url.rstrip("/").split("/")[2].split(":")[0] in line, line
