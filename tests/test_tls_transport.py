"""The TLS stream itself, in process: real OpenSSL on both ends over real sockets.

Both ways through it must be exact (every byte, in order, whatever the chunk sizes), on the
direct OpenSSL path and on pyOpenSSL's public API path (taken when its internals differ).
"""
from __future__ import annotations

import asyncio
import os
import ssl

import pytest
import uvloop
from OpenSSL import SSL

from proxy.tls import transport
from tests.infra.pki import TestCA


@pytest.fixture(scope="module")
def leaf(tmp_path_factory):
    ca = TestCA(tmp_path_factory.mktemp("pki"))
    return ca.issue(["stream.test"])


def server_context(leaf) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_certificate_chain_file(str(leaf.cert_path))
    ctx.use_privatekey_file(str(leaf.key_path))
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    ctx.set_alpn_select_callback(lambda conn, offered: b"http/1.1")
    return ctx


def client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


@pytest.fixture(params=["direct", "api"])
def path(request, monkeypatch):
    monkeypatch.setattr(transport, "_direct", request.param == "direct")
    return request.param


async def echo_server(leaf, seen: list):
    """A TLSStream server that echoes what it reads, then answers EOF with close_notify."""
    ctx = server_context(leaf)
    loop = asyncio.get_running_loop()

    async def serve(stream: transport.TLSStream) -> None:
        await stream.wait_ready(10)
        seen.append((stream.server_name, stream.alpn, stream.tls_version))
        while True:
            data = await stream.read(1 << 20, 10)
            if not data:
                break
            assert type(data) is bytes
            stream.write(data)
            if stream.must_drain:
                await stream.drain(10)
        stream.close()

    def on_stream(stream: transport.TLSStream) -> None:
        assert stream.server_name is None and stream.alpn is None and stream.tls_version == ""
        loop.create_task(serve(stream))

    server, _ = await serve_tls(ctx, on_stream)
    return server



async def serve_tls(ctx, on_stream, cls=transport.TLSStream):
    """A TLS server on a free local port; every connection is a ``cls`` stream handed to
    ``on_stream`` as it is made. Returns (server, port)."""
    loop = asyncio.get_running_loop()

    def factory():
        stream = cls(lambda: SSL.Connection(ctx, None), None, loop)
        on_stream(stream)
        return stream

    server = await loop.create_server(factory, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("run", [uvloop.run, asyncio.run], ids=["uvloop", "asyncio"])
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_echo_is_exact_both_ways(leaf, path, version, run):
    payload = os.urandom(3 * 1024 * 1024 + 12345)
    sizes = [1, 100, 5, 16383, 16384, 16385, 70000, 300000, 1 << 20]

    async def go():
        seen = []
        server = await echo_server(leaf, seen)
        port = server.sockets[0].getsockname()[1]
        cctx = client_context()
        cctx.minimum_version = cctx.maximum_version = version
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=cctx,
                                                       server_hostname="stream.test")

        async def send():
            off, i = 0, 0
            while off < len(payload):
                n = sizes[i % len(sizes)]
                writer.write(payload[off:off + n])
                await writer.drain()
                off += n
                i += 1
            writer.write_eof() if writer.can_write_eof() else None

        sender = asyncio.create_task(send())
        got = await asyncio.wait_for(reader.readexactly(len(payload)), 60)
        await sender
        assert got == payload
        writer.close()
        server.close()
        return seen

    seen = run(go())
    name, alpn, version_name = seen[0]
    assert name == "stream.test" and alpn == b"http/1.1"
    assert version_name == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]


def test_close_notify_both_ways(leaf, path):
    """The client's close_notify reads as EOF; the server's close answers with its own (the
    client's unwrap completes), tlsload's cycle."""
    import socket

    async def go():
        seen = []
        server = await echo_server(leaf, seen)
        port = server.sockets[0].getsockname()[1]

        def client():
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                s = client_context().wrap_socket(raw, server_hostname="stream.test")
                s.sendall(b"ping")
                assert s.recv(4) == b"ping"
                s.unwrap()   # raises unless the server's close_notify arrives
            return True

        ok = await asyncio.get_running_loop().run_in_executor(None, client)
        server.close()
        return ok

    assert uvloop.run(go())


def test_large_write_goes_out_in_pieces_and_the_bio_stays_small(leaf, path):
    """One write far above WRITE_PIECE arrives whole, and the memory BIO never held more than
    one piece's records (it would otherwise grow to the whole write)."""
    payload = os.urandom(5 * transport.WRITE_PIECE + 7)
    largest = []

    async def go():
        ctx = server_context(leaf)
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        class Watched(transport.TLSStream):
            __slots__ = ()

            def _flush(self):
                if self.conn._from_ssl is not None:
                    largest.append(transport._ssl_lib.BIO_get_mem_data(self.conn._from_ssl,
                                                                       transport._ssl_ffi.NULL))
                super()._flush()

        async def serve(stream):
            await stream.wait_ready(10)
            stream.write(payload)
            await stream.read(10, 10)   # until the client's EOF
            stream.close()
            done.set_result(None)

        server, port = await serve_tls(ctx, lambda stream: loop.create_task(serve(stream)), cls=Watched)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(),
                                                       server_hostname="stream.test")
        got = await asyncio.wait_for(reader.readexactly(len(payload)), 30)
        writer.close()
        await done
        server.close()
        return got

    assert uvloop.run(go()) == payload
    assert max(largest) < transport.WRITE_PIECE + 5 * 64   # one piece plus record overhead


def test_closed_resolves_when_the_connection_goes(leaf):
    async def go():
        ctx = server_context(leaf)
        loop = asyncio.get_running_loop()
        streams = []

        server, port = await serve_tls(ctx, streams.append)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(),
                                                       server_hostname="stream.test")
        closed_early = streams[0].closed          # asked for while open
        writer.transport.abort()                  # the TCP connection goes, no TLS goodbye
        await asyncio.wait_for(closed_early, 10)
        assert streams[0].closed.done()           # asked for after: already resolved
        server.close()

    uvloop.run(go())


def test_handshake_timeout_leaves_the_stream_consistent(leaf):
    """wait_ready's timeout lands on ``ready`` itself: TimeoutError for the waiter, and a
    late handshake or close does not trip over the settled future."""
    import socket

    async def go():
        ctx = server_context(leaf)
        loop = asyncio.get_running_loop()
        outcome = loop.create_future()

        async def serve(stream):
            try:
                await stream.wait_ready(0.2)
                outcome.set_result("ready")
            except TimeoutError:
                outcome.set_result("timeout")
                stream.abort()

        server, port = await serve_tls(ctx, lambda stream: loop.create_task(serve(stream)))
        raw = socket.create_connection(("127.0.0.1", port))   # says nothing
        try:
            assert await asyncio.wait_for(outcome, 10) == "timeout"
            raw.settimeout(5)
            assert await loop.run_in_executor(None, raw.recv, 10) == b""
        finally:
            raw.close()
            server.close()

    uvloop.run(go())


def test_direct_path_stands_down_without_pyopenssl_internals(monkeypatch, caplog):
    """A pyOpenSSL release without the internals the direct calls use: one warning, and every
    connection takes the public API path (the echo tests above run that path too)."""
    import logging
    monkeypatch.setattr(transport, "_direct", True)
    monkeypatch.setattr(transport, "_direct_checked", False)

    class NoInternals:   # a pyOpenSSL Connection as a future release might shape it
        pass

    with caplog.at_level(logging.WARNING, logger="proxy.tls"):
        assert transport._check_direct(NoInternals()) is False
    assert transport._direct is False and transport._direct_checked is True
    assert sum("public API" in r.getMessage() for r in caplog.records) == 1


def test_large_arrivals_are_not_held_while_idle(leaf, path):
    """Large received chunks are read by OpenSSL in place (a read-only BIO over the bytes);
    once the stream waits for more, it holds none of them (nor a grown buffer)."""
    payload = os.urandom(2 * 1024 * 1024)

    async def go():
        ctx = server_context(leaf)
        loop = asyncio.get_running_loop()
        idle = loop.create_future()

        async def serve(stream):
            await stream.wait_ready(10)
            got = bytearray()
            while len(got) < len(payload):
                got += await stream.read(1 << 20, 10)
            stream.write(b"ok")
            reading = loop.create_task(stream.read(10, 10))   # waits: the stream goes idle
            await asyncio.sleep(0.05)
            idle.set_result((bytes(got), stream._rdata,
                             transport._ssl_lib.BIO_get_mem_data(stream.conn._into_ssl, transport._ssl_ffi.NULL)))
            await reading
            stream.close()

        server, port = await serve_tls(ctx, lambda stream: loop.create_task(serve(stream)))
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(),
                                                       server_hostname="stream.test")
        writer.write(payload)
        assert await asyncio.wait_for(reader.readexactly(2), 30) == b"ok"
        got, held, pending = await asyncio.wait_for(idle, 10)
        writer.close()
        server.close()
        return got, held, pending

    got, held, pending = uvloop.run(go())
    assert got == payload
    assert held is None and pending == 0


def test_corrupt_record_after_handshake_closes_only_that_connection(leaf, path):
    """A record that fails to decrypt ends that connection; OpenSSL's error queue is left
    clean (a stale entry would make the next connection's reads look failed)."""
    import socket

    async def go():
        seen = []
        server = await echo_server(leaf, seen)
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()

        def corrupt():
            cctx = client_context()
            cctx.maximum_version = ssl.TLSVersion.TLSv1_2   # no post-handshake messages
            s = cctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                                 server_hostname="stream.test")
            try:
                s.sendall(b"ping")
                assert s.recv(4) == b"ping"
                # an application-data record with a bad tag, straight onto the TCP stream
                os.write(s.fileno(), b"\x17\x03\x03\x00\x20" + os.urandom(32))
                try:
                    while s.recv(100):
                        pass
                except (ssl.SSLError, OSError):
                    pass
            finally:
                s.close()

        def good():
            s = client_context().wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                                             server_hostname="stream.test")
            try:
                for size in (1, 5000, 70000):
                    data = os.urandom(size)
                    s.sendall(data)
                    got = b""
                    while len(got) < size:
                        got += s.recv(size - len(got))
                    assert got == data
                s.unwrap()
            finally:
                s.close()

        await loop.run_in_executor(None, corrupt)
        await loop.run_in_executor(None, good)
        server.close()

    uvloop.run(go())
