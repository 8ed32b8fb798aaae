"""Storage listings longer than one page (issue 23): thousands of names in S3 (moto, pages of
1000 with ContinuationToken) and GCS (fake-gcs-server, pages of 1000 with pageToken).

The objects are put into the servers directly (moto's backend in this process; a data
directory fake-gcs-server loads at start): uploading thousands one by one takes many seconds.
What is listed, deleted and checked goes through the backends' real HTTP APIs.
"""
from __future__ import annotations

import os

import pytest

from proxy.storage.gcs import GCSStorage
from proxy.storage.s3 import S3Storage
from tests.infra.gcsserver import start_gcs_server, stop_gcs_server

FLAT = [f"renew/name-{i:05d}.test" for i in range(1500)]                       # 2 pages
NESTED = [f"certificates/ca/host-{i:05d}.test/host-{i:05d}.test.crt" for i in range(1100)]
DIRS = sorted({k.rsplit("/", 1)[0] for k in NESTED})                            # 1100 "directories"


@pytest.fixture
def moto_paging(monkeypatch):
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    backend.create_bucket("paging", "us-east-1")
    for key in FLAT + NESTED:
        backend.put_object("paging", f"p/{key}", b"x")
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}",
                 "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    yield backend
    server.stop()
    s3_backends[DEFAULT_ACCOUNT_ID]["aws"].reset()


@pytest.fixture
def gcs_paging(tmp_path, monkeypatch):
    data = tmp_path / "gcs-data"
    for key in FLAT + NESTED:
        path = data / "paging" / "p" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    srv = start_gcs_server("paging", data=str(data))
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", srv.endpoint)
    yield srv
    stop_gcs_server(srv)


async def _lists_every_page(st) -> None:
    assert await st.list("renew") == FLAT
    assert await st.list("certificates/ca") == DIRS
    assert await st.list("certificates", recursive=True) == sorted(NESTED)
    assert await st.exists("renew")


async def test_s3_lists_every_page(moto_paging):
    st = S3Storage("paging", "p")
    try:
        await _lists_every_page(st)
        # a prefix delete of more than S3's 1000 keys per DeleteObjects call
        await st.delete("renew")
        assert await st.list("renew") == []
        assert len(await st.list("certificates/ca")) == len(DIRS)
    finally:
        await st.close()


async def test_gcs_lists_every_page(gcs_paging):
    st = GCSStorage("paging", "p")
    try:
        await _lists_every_page(st)
    finally:
        await st.close()
