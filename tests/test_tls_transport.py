"""The TLS server stream, in process: OpenSSL on the accepted socket at our end, real clients
(Python's ssl module, openssl s_client, raw sockets) at the other.

Every byte both ways, in order; flow control both ways with bounded memory; KeyUpdate;
close_notify both ways; resets and aborted handshakes leave no descriptor behind; the
engine's prepare hook sees the ClientHello before OpenSSL does.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import ssl
import struct
import time

import pytest
import uvloop
from OpenSSL import SSL
from OpenSSL.SSL import _ffi, _lib

from proxy import metrics
from proxy.tls import socketstream
from proxy.tls.clienthello import parse_client_hello
from proxy.tls.transport import READ_LIMIT, StreamClosed
from tests.infra.pki import TestCA

CHUNK = 256 * 1024


@pytest.fixture(scope="module")
def leaf(tmp_path_factory):
    ca = TestCA(tmp_path_factory.mktemp("pki"))
    return ca.issue(["stream.test"])


_HTTP11 = _ffi.new("unsigned char[]", b"http/1.1")


@_ffi.callback("int (*)(SSL *, unsigned char **, unsigned char *, const unsigned char *, unsigned int, void *)")
def _alpn_http11(ssl, out, outlen, in_, inlen, arg):
    # (on the binding, as the engine's: pyOpenSSL's own callback wrappers need a pyOpenSSL
    # Connection, which the streams do not make)
    out[0], outlen[0] = _HTTP11, 8
    return _lib.SSL_TLSEXT_ERR_OK


def server_context(leaf) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_certificate_chain_file(str(leaf.cert_path))
    ctx.use_privatekey_file(str(leaf.key_path))
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    _lib.SSL_CTX_set_alpn_select_cb(ctx._context, _alpn_http11, _ffi.NULL)
    return ctx


def client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


async def serve_tls(ctx, on_stream, prepare=None):
    """A TLS listener on a free local port; every connection is a TLSServerStream handed to
    ``on_stream`` as it is made. Returns (listener, port)."""
    loop = asyncio.get_running_loop()

    def factory():
        stream = socketstream.TLSServerStream(lambda fd: socketstream.new_ssl(ctx), prepare, loop)
        on_stream(stream)
        return stream

    server = await socketstream.start_tls_server(factory, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def echo_server(leaf, seen: list):
    """Echoes what it reads (draining as the proxy does), then answers EOF with close_notify."""
    loop = asyncio.get_running_loop()

    async def serve(stream) -> None:
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

    def on_stream(stream) -> None:
        assert stream.server_name is None and stream.alpn is None and stream.tls_version == ""
        loop.create_task(serve(stream))

    server, _ = await serve_tls(server_context(leaf), on_stream)
    return server


def in_thread(fn, *args):
    return asyncio.get_running_loop().run_in_executor(None, fn, *args)


@pytest.mark.parametrize("run", [uvloop.run, asyncio.run], ids=["uvloop", "asyncio"])
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_echo_is_exact_both_ways(leaf, version, run):
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


def test_short_records_arriving_together_are_all_read(leaf):
    """A read stops after a short record without asking the socket again (no read just to
    learn it is empty): records that arrived together with it must still be read, each,
    with no further bytes from the client to wake the server up."""
    records = [b"record %d;" % i for i in range(50)]

    def client(port: int) -> bytes:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = client_context().wrap_bio(inc, out, server_hostname="stream.test")
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(out.read())
                inc.write(sock.recv(65536))
        sock.sendall(out.read())
        for r in records:      # 50 records, each short, sent in one write
            tls.write(r)
        sock.sendall(out.read())
        want, got = len(b"".join(records)), b""
        while len(got) < want:
            try:
                got += tls.read(65536)
            except ssl.SSLWantReadError:
                data = sock.recv(65536)
                if not data:
                    break
                inc.write(data)
        sock.close()
        return got

    async def go():
        server = await echo_server(leaf, [])
        port = server.sockets[0].getsockname()[1]
        got = await asyncio.wait_for(in_thread(client, port), 20)
        server.close()
        return got

    assert uvloop.run(go()) == b"".join(records)


def test_a_large_write_leaves_the_socket_uncorked(leaf):
    """Writes of more than a record are corked while OpenSSL writes their records: after
    each, the socket is uncorked (else the kernel would hold the last partial segment back
    for up to 200 ms), whether the socket took it all or kept some for later."""
    payload = os.urandom(5 * 1024 * 1024 + 7)
    corks, drained = [], []

    async def go():
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        async def serve(stream):
            await stream.wait_ready(10)
            sock = socket.socket(fileno=os.dup(stream._fd))
            try:
                for off in range(0, len(payload), 300_000):
                    stream.write(payload[off:off + 300_000])
                    corks.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK))
                    if stream.must_drain:   # (the socket was full: some was kept for later)
                        drained.append(off)
                        await stream.drain(10)
                        corks.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK))
            finally:
                sock.close()
            stream.close()
            done.set_result(None)

        server, port = await serve_tls(server_context(leaf), lambda st: loop.create_task(serve(st)))

        def client() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                s = client_context().wrap_socket(raw, server_hostname="stream.test")
                got = bytearray()
                while len(got) < len(payload):
                    if len(got) < 1 << 20:
                        time.sleep(0.001)   # a slow start: the server's socket fills
                    chunk = s.recv(1 << 20)
                    if not chunk:
                        break
                    got += chunk
                return bytes(got)

        got = await asyncio.wait_for(in_thread(client), 30)
        await done
        server.close()
        return got

    assert uvloop.run(go()) == payload
    assert set(corks) == {0}
    assert drained   # the case that keeps some for later happened (and left it uncorked too)


def test_close_notify_both_ways(leaf):
    """The client's close_notify reads as EOF; the server's close answers with its own (the
    client's unwrap completes), tlsload's cycle."""
    async def go():
        server = await echo_server(leaf, [])
        port = server.sockets[0].getsockname()[1]

        def client():
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                s = client_context().wrap_socket(raw, server_hostname="stream.test")
                s.sendall(b"ping")
                assert s.recv(4) == b"ping"
                s.unwrap()   # raises unless the server's close_notify arrives
            return True

        ok = await in_thread(client)
        server.close()
        return ok

    assert uvloop.run(go())


def test_shutdown_write_sends_close_notify_and_keeps_reading(leaf):
    """shutdown_write: the client reads EOF (close_notify), and what it sends afterwards is
    still read by the server."""
    async def go():
        loop = asyncio.get_running_loop()
        got = loop.create_future()

        async def serve(stream):
            await stream.wait_ready(10)
            stream.write(b"bye")
            stream.shutdown_write()
            with pytest.raises(StreamClosed):
                stream.write(b"late")
            rest = b""
            while data := await stream.read(100, 10):
                rest += data
            got.set_result(rest)
            stream.close()

        server, port = await serve_tls(server_context(leaf), lambda s: loop.create_task(serve(s)))

        def client():
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                s = client_context().wrap_socket(raw, server_hostname="stream.test")
                data = b""
                while chunk := s.recv(100):   # b"" at the server's close_notify
                    data += chunk
                assert data == b"bye"
                s.sendall(b"more")
                s.unwrap()
        await in_thread(client)
        assert await asyncio.wait_for(got, 10) == b"more"
        server.close()

    uvloop.run(go())


def test_a_reader_that_stalls_does_not_make_the_server_buffer_everything(leaf):
    """A client that reads nothing: the writer waits in drain with at most WRITE_HIGH plus
    one chunk kept (the rest stays upstream); once the client reads, every byte arrives."""
    total = 48 * 1024 * 1024
    block = os.urandom(CHUNK)

    async def go():
        loop = asyncio.get_running_loop()
        progress = {"written": 0, "most_kept": 0}
        streams = []

        async def serve(stream):
            await stream.wait_ready(10)
            while progress["written"] < total:
                stream.write(block)
                progress["written"] += CHUNK
                progress["most_kept"] = max(progress["most_kept"], stream._out_size)
                if stream.must_drain:
                    await stream.drain(30)
            stream.close()

        def on_stream(stream):
            streams.append(stream)
            loop.create_task(serve(stream))

        server, port = await serve_tls(server_context(leaf), on_stream)
        raw = socket.create_connection(("127.0.0.1", port))
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s = await in_thread(lambda: client_context().wrap_socket(raw, server_hostname="stream.test"))
        await asyncio.sleep(1.0)   # the client reads nothing meanwhile
        stalled_at = progress["written"]
        assert stalled_at < total / 4, stalled_at
        assert streams[0]._write_paused
        assert progress["most_kept"] <= socketstream.WRITE_HIGH + CHUNK, progress

        def read_all():
            h, n = hashlib.sha256(), 0
            while chunk := s.recv(1 << 20):
                h.update(chunk)
                n += len(chunk)
            return n, h.hexdigest()
        n, digest = await in_thread(read_all)
        s.close()
        server.close()
        assert progress["most_kept"] <= socketstream.WRITE_HIGH + CHUNK, progress
        return n, digest

    n, digest = uvloop.run(go())
    expected = hashlib.sha256()
    for _ in range(total // CHUNK):
        expected.update(block)
    assert n == total and digest == expected.hexdigest()


def test_a_server_that_does_not_read_stops_reading_the_socket(leaf):
    """Received plaintext waiting for the HTTP layer stays near READ_LIMIT (reading stops, and
    resumes below half); then every byte arrives in order."""
    payload = os.urandom(16 * 1024 * 1024)

    async def go():
        streams = []
        server, port = await serve_tls(server_context(leaf), streams.append)

        def client():
            with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
                s = client_context().wrap_socket(raw, server_hostname="stream.test")
                s.sendall(payload)
                s.unwrap()
        sending = in_thread(client)
        while not streams or not streams[0].ready.done():
            await asyncio.sleep(0.01)
        stream = streams[0]
        await asyncio.sleep(1.0)   # nothing read meanwhile
        assert stream._reading_paused and not sending.done()
        held = stream._size
        assert READ_LIMIT < held <= READ_LIMIT + socketstream._SCRATCH_SIZE + 16384, held
        got = bytearray()
        while data := await stream.read(1 << 20, 20):
            got += data
            assert stream._size <= READ_LIMIT + socketstream._SCRATCH_SIZE + 16384
        stream.close()   # close_notify: the client's unwrap completes
        await sending
        server.close()
        return bytes(got)

    assert uvloop.run(go()) == payload


def test_key_update_while_the_socket_is_full(leaf, tmp_path):
    """A client's KeyUpdate (update requested) that the server reads while its own writes
    wait for a full socket: OpenSSL 3.0 sends its answer with the next SSL_write once the
    pending record is out (ssl3_write_bytes), i.e. from our retries on writability; the
    client sees it and the conversation goes on, exact both ways."""
    msgs = tmp_path / "msgs"
    line = b"x" * 1023 + b"\n"   # never starts with a s_client command letter
    sent_lines = 640              # 640 KiB: the server stops reading after READ_LIMIT
    big = os.urandom(8 * 1024 * 1024)

    async def go():
        streams = []
        server, port = await serve_tls(server_context(leaf), streams.append)
        proc = await asyncio.create_subprocess_exec(
            "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-msg",
            "-msgfile", str(msgs), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        try:
            while not streams or not streams[0].ready.done():
                await asyncio.sleep(0.01)
            stream = streams[0]
            proc.stdin.write(line * sent_lines)
            await proc.stdin.drain()
            while not stream._reading_paused:   # the server holds READ_LIMIT and waits
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
            proc.stdin.write(b"K\n")              # KeyUpdate, update_requested
            await proc.stdin.drain()
            for _ in range(500):
                if b"KeyUpdate" in msgs.read_bytes():
                    break
                await asyncio.sleep(0.01)
            os.kill(proc.pid, signal.SIGSTOP)     # the client stops reading
            stream.write(big)                     # the socket fills; the rest is kept
            assert stream._out is not None
            got = bytearray()
            while len(got) < len(line) * sent_lines:   # reading resumes: data, then KeyUpdate
                got += await stream.read(1 << 20, 10)
            await asyncio.sleep(0.2)
            os.kill(proc.pid, signal.SIGCONT)
            echo = bytearray()

            async def read_client():
                while big not in echo:
                    echo.extend(await proc.stdout.read(1 << 20))
            await asyncio.wait_for(read_client(), 30)
            stream.write(b"after the update\n")
            await asyncio.wait_for(proc.stdout.readuntil(b"after the update\n"), 10)
            proc.stdin.write(b"client after\n")
            await proc.stdin.drain()
            more = await stream.read(100, 10)
            assert bytes(got) == line * sent_lines and more == b"client after\n"
            stream.close()
        finally:
            if proc.returncode is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
            await proc.wait()
            server.close()

    uvloop.run(go())
    log = msgs.read_text(errors="replace")
    updates = [ln for ln in log.splitlines() if ln.endswith("KeyUpdate")]
    assert any(ln.startswith(">>>") for ln in updates), log   # the client's
    assert any(ln.startswith("<<<") for ln in updates), log   # the server's answer


def test_a_read_stopped_by_want_write_waits_for_writability(leaf):
    """The state SSL_read's WANT_WRITE leads to (OpenSSL must send something before it reads
    on), forced through _read_stopped: reading stops, the socket is watched for writability,
    then reading goes on. (SSL_read returning it is not produced here: OpenSSL 3.0 clients
    answer a KeyUpdate from the next write, see the KeyUpdate test.)"""
    async def go():
        streams = []
        server, port = await serve_tls(server_context(leaf), streams.append)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(),
                                                       server_hostname="stream.test")
        while not streams or not streams[0].ready.done():
            await asyncio.sleep(0.01)
        stream = streams[0]
        stream._read_stopped(socketstream._WANT_WRITE)
        assert stream._watching == socketstream._WRITE and not stream.at_eof
        writer.write(b"ping")
        assert await asyncio.wait_for(stream.read(10, 10), 10) == b"ping"
        assert stream._watching == socketstream._READ
        writer.close()
        stream.close()
        server.close()

    uvloop.run(go())


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_aborted_handshakes_leave_no_descriptors(leaf):
    """Connections reset mid-handshake, closed before a byte, or sending garbage: each ends
    (ready fails, closed resolves), no descriptor stays open, and only the garbage counts as
    a failed handshake."""
    async def go():
        streams = []
        server, port = await serve_tls(server_context(leaf), streams.append)
        hello = await in_thread(_client_hello_bytes)

        def clients():
            for i in range(300):
                s = socket.create_connection(("127.0.0.1", port))
                kind = i % 3
                if kind == 0:   # half a ClientHello, then a reset
                    s.sendall(hello[:len(hello) // 2])
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                elif kind == 1:   # garbage: a failed handshake, answered with an alert
                    s.sendall(b"GET / HTTP/1.1\r\n\r\n")
                s.close()
        before_errors = metrics.value("autocert_proxy_tls_handshake_errors_total")
        await asyncio.sleep(0.1)
        before = _fds()
        await in_thread(clients)
        for _ in range(500):
            if len(streams) == 300 and all(s._lost for s in streams):
                break
            await asyncio.sleep(0.02)
        assert len(streams) == 300 and all(s._lost for s in streams)
        assert all(isinstance(s.ready.exception(), StreamClosed) for s in streams)
        assert all(s.closed.done() for s in streams)
        after = _fds()
        errors = metrics.value("autocert_proxy_tls_handshake_errors_total") - before_errors
        server.close()
        return before, after, errors

    before, after, errors = uvloop.run(go())
    assert after <= before, (before, after)
    assert errors == 100


def _client_hello_bytes() -> bytes:
    """A real ClientHello (Python's ssl over a memory BIO)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_context().wrap_bio(incoming, outgoing, server_hostname="stream.test")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def test_prepare_sees_the_client_hello_and_can_hold_the_handshake(leaf):
    """The prepare hook gets the ClientHello before OpenSSL reads it (the ALPN and SNI are
    in it); while its future is pending the handshake does not advance; then it completes."""
    async def go():
        loop = asyncio.get_running_loop()
        seen, gate = [], loop.create_future()
        streams = []

        def prepare(first_bytes):
            seen.append(first_bytes)
            return gate

        server, port = await serve_tls(server_context(leaf), streams.append, prepare=prepare)

        def client():
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                s = client_context().wrap_socket(raw, server_hostname="stream.test")
                s.sendall(b"hello")
                s.unwrap()
        done = in_thread(client)
        while not seen:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        assert not streams[0].ready.done() and not done.done()   # held
        facts = parse_client_hello(seen[0])
        assert facts is not None and facts.server_name == "stream.test" and b"http/1.1" in facts.alpn
        gate.set_result(None)
        await asyncio.wait_for(streams[0].ready, 10)
        assert await streams[0].read(100, 10) == b"hello"
        assert await streams[0].read(100, 10) == b""
        streams[0].close()
        await asyncio.wait_for(done, 10)
        server.close()
        return len(seen)

    assert uvloop.run(go()) == 1


def test_a_lost_connection_wakes_every_waiter(leaf):
    """A reset while the server waits in read, in drain and on ``closed``: all three wake."""
    async def go():
        loop = asyncio.get_running_loop()
        streams = []
        server, port = await serve_tls(server_context(leaf), streams.append)
        raw = socket.create_connection(("127.0.0.1", port))
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s = await in_thread(lambda: client_context().wrap_socket(raw, server_hostname="stream.test"))
        while not streams or not streams[0].ready.done():
            await asyncio.sleep(0.01)
        stream = streams[0]
        while not stream.must_drain:   # fill the socket until the writer must wait
            stream.write(os.urandom(CHUNK))
        reading = loop.create_task(stream.read(100, 30))
        draining = loop.create_task(stream.drain(30))
        closed = stream.closed
        await asyncio.sleep(0.2)
        assert not reading.done() and not draining.done() and not closed.done()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()   # a reset
        assert await asyncio.wait_for(reading, 10) == b""
        with pytest.raises(StreamClosed):
            await asyncio.wait_for(draining, 10)
        await asyncio.wait_for(closed, 10)
        assert stream.is_closing and stream.at_eof
        server.close()

    uvloop.run(go())


def test_handshake_timeout_leaves_the_stream_consistent(leaf):
    """wait_ready's timeout lands on ``ready`` itself: TimeoutError for the waiter, and the
    abort that follows closes the socket."""
    async def go():
        loop = asyncio.get_running_loop()
        outcome = loop.create_future()

        async def serve(stream):
            try:
                await stream.wait_ready(0.2)
                outcome.set_result("ready")
            except TimeoutError:
                outcome.set_result("timeout")
                stream.abort()

        server, port = await serve_tls(server_context(leaf), lambda s: loop.create_task(serve(s)))
        raw = socket.create_connection(("127.0.0.1", port))   # says nothing
        try:
            assert await asyncio.wait_for(outcome, 10) == "timeout"
            raw.settimeout(5)
            assert await in_thread(raw.recv, 10) == b""
        finally:
            raw.close()
            server.close()

    uvloop.run(go())


def test_corrupt_record_after_handshake_closes_only_that_connection(leaf):
    """A record that fails to decrypt ends that connection; OpenSSL's error queue is left
    clean (a stale entry would make the next connection's reads look failed)."""
    async def go():
        server = await echo_server(leaf, [])
        port = server.sockets[0].getsockname()[1]

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

        await in_thread(corrupt)
        await in_thread(good)
        server.close()

    uvloop.run(go())


def test_closed_listener_refuses_new_connections_and_keeps_open_ones(leaf):
    async def go():
        server = await echo_server(leaf, [])
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(),
                                                       server_hostname="stream.test")
        server.close()
        await server.wait_closed()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"still here")
        assert await asyncio.wait_for(reader.readexactly(10), 10) == b"still here"
        assert not server.poller._epoll.closed   # (open while a connection is)
        writer.close()
        for _ in range(250):   # the last connection gone: the listener's epoll set closes
            if server.poller._epoll.closed:
                break
            await asyncio.sleep(0.02)
        assert server.poller._epoll.closed and len(server.poller) == 0

    uvloop.run(go())


def test_a_connection_paused_when_the_listener_closes_resumes(leaf):
    """A stream watched for nothing (reading paused above READ_LIMIT) while the listener
    closes is still watched again when its reader catches up (graceful drain)."""
    async def go():
        streams = []
        server, port = await serve_tls(server_context(leaf), streams.append)
        payload = os.urandom(3 * READ_LIMIT)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(),
                                                       server_hostname="stream.test")
        writer.write(payload)
        for _ in range(250):
            if streams and streams[0]._reading_paused and streams[0]._watching == 0:
                break
            await asyncio.sleep(0.02)
        stream = streams[0]
        assert stream._reading_paused and stream._watching == 0
        server.close()
        got = b""
        while len(got) < len(payload):
            got += await stream.read(1 << 20, 10)
        assert got == payload
        stream.close()
        writer.close()

    uvloop.run(go())


def test_check_pyopenssl_names_what_is_missing(monkeypatch, leaf):
    """(app.py calls it before the listeners start.) A Context without its ``_context``, or a
    binding without a function the listener calls, is refused with its name."""
    socketstream.check_pyopenssl()   # this pyOpenSSL: nothing missing
    monkeypatch.setattr(socketstream, "_NEEDED", socketstream._NEEDED + ("SSL_no_such_function",))
    with pytest.raises(RuntimeError, match="lacks SSL_no_such_function, which the TLS listener"):
        socketstream.check_pyopenssl()

    class Context:   # a pyOpenSSL Context as a future release might shape it
        def __init__(self, method):
            pass
    monkeypatch.setattr(SSL, "Context", Context)
    with pytest.raises(RuntimeError, match="lacks Context._context, SSL_no_such_function"):
        socketstream.check_pyopenssl()


def test_reads_share_one_timer_and_each_keeps_its_own_deadline():
    """One timer per stream serves its reads: a read that ends in time leaves it armed, a read
    with a later deadline does not re-arm it (it fires early and re-arms itself), one with an
    earlier deadline does; every read still times out at its own deadline, not another's."""
    from proxy.tls.transport import Stream

    async def main():
        loop = asyncio.get_running_loop()
        s = Stream(loop)
        loop.call_later(0.05, s._feed, b"a")
        assert await s.read(10, timeout=0.3) == b"a"            # in time: timer left armed
        first = s._timer
        assert first is not None and not first.cancelled()
        loop.call_later(0.4, s._feed, b"b")                      # after the first deadline
        t0 = loop.time()
        assert await s.read(10, timeout=1.0) == b"b"             # the early timer re-armed
        assert loop.time() - t0 >= 0.35 and s._timer is not first
        t0 = loop.time()
        with pytest.raises(TimeoutError):                         # an earlier deadline re-arms
            await s.read(10, timeout=0.1)
        assert 0.09 <= loop.time() - t0 < 0.5
        t0 = loop.time()
        with pytest.raises(TimeoutError):                         # a later one times out at its own
            await s.read(10, timeout=0.3)
        assert 0.29 <= loop.time() - t0 < 0.8
        loop.call_later(0.2, s._feed, b"c")                       # no timeout: the timer lapses
        assert await s.read(10) == b"c"
        loop.call_later(0.02, s._feed, b"d")                      # the halves run's idle wait uses:
        w = s.readable(0.1)
        await w
        assert s.read_now(10) == b"d" and s._timer is not None    # in time, the timer left armed
        loop.call_later(0.3, s._feed, b"e")                       # a wait without timeout after it:
        w = s.readable(None)                                      # the armed timer fires and lapses
        await w
        assert s.read_now(10) == b"e" and s.readable(None) is not None
        s._gone(None)                                             # a lost stream keeps no timer
        assert s._timer is None

    uvloop.run(main())


async def serve_waiting(ctx, first_timeout: float = 10.0):
    """A listener whose streams wait on their own until their first bytes (as the proxy's):
    returns (listener, port, started streams, the ``waiting`` dict, every stream made)."""
    loop = asyncio.get_running_loop()
    started, made = [], []
    waiting = socketstream.Waiting(loop, first_timeout, started.append)

    def factory():
        stream = socketstream.TLSServerStream(lambda fd: socketstream.new_ssl(ctx), None, loop, waiting)
        made.append(stream)
        return stream

    server = await socketstream.start_tls_server(factory, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], started, waiting, made


async def _until(cond, what: str, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not reached: {what}")


def test_a_waiting_connection_is_handed_over_with_its_first_bytes(leaf):
    """Handshake done, nothing sent: the stream waits on its own (in ``waiting``, nothing
    started); the first bytes start the HTTP layer once, with the bytes in the stream."""
    async def go():
        server, port, started, waiting, made = await serve_waiting(server_context(leaf))
        raw = await in_thread(socket.create_connection, ("127.0.0.1", port))
        s = await in_thread(lambda: client_context().wrap_socket(raw, server_hostname="stream.test"))
        try:
            await _until(lambda: made and made[0].opened_at is not None, "handshake")
            await asyncio.sleep(0.2)
            assert started == [] and list(waiting) == made and made[0]._timer is None
            await in_thread(s.sendall, b"hello")
            await _until(lambda: started, "start")
            stream = started[0]
            assert started == made and len(waiting) == 0
            assert await stream.read(100, 5) == b"hello" and stream.server_name == "stream.test"
            stream.write(b"world")
            assert await in_thread(s.recv, 100) == b"world"
            await in_thread(s.sendall, b"again")
            assert await stream.read(100, 5) == b"again" and len(started) == 1
        finally:
            s.close()
            server.close()

    uvloop.run(go())


def test_a_connection_that_asks_nothing_is_ended_by_its_stream(leaf):
    """Without a first byte nothing is started, and the stream ends the connection itself: a
    client's close_notify is answered (its unwrap completes); a handshake not done within
    ``first_timeout`` is aborted; a handshaked client silent that long is closed with
    close_notify (a clean EOF). Each leaves ``waiting`` and its descriptor."""
    async def go():
        server, port, started, waiting, made = await serve_waiting(server_context(leaf), first_timeout=0.5)
        await asyncio.sleep(0.1)
        before = _fds()

        def closes_first():
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                s = client_context().wrap_socket(raw, server_hostname="stream.test")
                s.unwrap()   # raises unless the server answers with its close_notify
            return True

        def silent_tcp():
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                t0 = time.monotonic()
                assert raw.recv(10) == b""
                return time.monotonic() - t0

        def silent_tls():
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                s = client_context().wrap_socket(raw, server_hostname="stream.test", suppress_ragged_eofs=False)
                t0 = time.monotonic()
                assert s.recv(10) == b""   # close_notify: an EOF without ssl.SSLEOFError
                return time.monotonic() - t0

        assert await in_thread(closes_first)
        assert 0.4 <= await in_thread(silent_tcp) < 3
        assert 0.3 <= await in_thread(silent_tls) < 3
        await _until(lambda: len(made) == 3 and all(s._lost for s in made), "all ended")
        assert started == [] and len(waiting) == 0 and waiting._timer is None
        after = _fds()
        server.close()
        return before, after

    before, after = uvloop.run(go())
    assert after <= before, (before, after)


@pytest.mark.parametrize("end", ["close_notify", "fin"])
def test_a_request_followed_by_close_notify_is_handed_over_whole(leaf, end):
    """Bytes and the client's close_notify in one read: the HTTP layer is started, reads the
    bytes, then EOF, and can still answer. The same when the client ends with a TCP FIN and no
    close_notify (after the handshake an EOF is an end of input, as in nginx)."""
    async def go():
        server, port, started, waiting, made = await serve_waiting(server_context(leaf))

        def client():
            cctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
            with socket.create_connection(("127.0.0.1", port)) as raw:   # (blocking, for pyOpenSSL)
                c = SSL.Connection(cctx, raw)
                c.set_connect_state()
                c.set_tlsext_host_name(b"stream.test")
                c.do_handshake()
                c.sendall(b"question")
                if end == "fin":
                    raw.shutdown(socket.SHUT_WR)   # no close_notify, reading goes on
                else:
                    c.shutdown()   # close_notify sent, reading goes on
                got = b""
                try:
                    while True:
                        got += c.recv(100)
                except SSL.ZeroReturnError:
                    pass
                return got

        answer = asyncio.ensure_future(in_thread(client))
        await _until(lambda: started, "start")
        stream = started[0]
        data = b""
        while True:
            chunk = await stream.read(100, 5)
            if not chunk:
                break
            data += chunk
        assert data == b"question" and stream.at_eof
        stream.write(b"answer")
        stream.close()
        assert await asyncio.wait_for(answer, 10) == b"answer"
        assert len(waiting) == 0
        server.close()

    uvloop.run(go())


def test_waiting_expires_each_connection_at_its_own_deadline():
    """One timer for all the waiting connections: each expires at its deadline, in order; one
    that moved on (discarded) never expires; a wait started again counts from then."""
    class Conn:   # what Waiting uses of a stream
        peer = "-"

        def __init__(self, name, log):
            self.name, self.log = name, log
            self._wprev = self._wnext = self._deadline = None

        def _expired(self, timeout):
            self.log.append((self.name, asyncio.get_running_loop().time() - t0))

    async def go():
        global t0
        loop = asyncio.get_running_loop()
        log = []
        w = socketstream.Waiting(loop, 0.3, lambda stream: None)
        t0 = loop.time()
        a, b, c, d = (Conn(n, log) for n in "abcd")
        w.add(a)
        await asyncio.sleep(0.1)
        w.add(b)
        w.add(c)
        await asyncio.sleep(0.1)
        w.add(d)
        w.discard(c)       # c asked something: it never expires
        w.discard(c)       # (twice: nothing happens)
        w.add(a)           # a's handshake is done: its first byte has 0.3 s from now (0.2)
        assert len(w) == 3 and list(w) == [b, d, a]
        await asyncio.sleep(0.7)
        assert len(w) == 0 and w._timer is None
        return log

    log = uvloop.run(go())
    assert [name for name, _ in log] == ["b", "d", "a"], log
    for (_, at), due in zip(log, (0.4, 0.5, 0.5)):   # (deadlines as set; the sleeps may run late)
        assert due - 0.01 <= at < due + 0.3, log


@pytest.mark.parametrize("fails", ["setblocking", "factory", "ssl_new"])
def test_a_connection_that_cannot_be_set_up_is_closed_once(leaf, monkeypatch, fails):
    """Whatever step of setting up an accepted connection fails (the socket's options, the
    stream, the SSL object inside attach), its descriptor is closed exactly once (a second
    close could hit a descriptor reused by another connection), the client sees the end,
    and the listener goes on serving."""
    import _socket
    made = []

    class Sock(_socket.socket):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

        def setblocking(self, flag):
            if fails == "setblocking" and len(made) == 1:
                raise OSError("refused by the test")
            return super().setblocking(flag)

    monkeypatch.setattr(socketstream, "_c_socket", Sock)

    async def go():
        loop = asyncio.get_running_loop()
        ctx = server_context(leaf)
        calls = []

        def new_connection(fd):
            if fails == "ssl_new" and len(calls) == 1:
                raise MemoryError("refused by the test")
            return socketstream.new_ssl(ctx)

        def factory():
            calls.append(1)
            if fails == "factory" and len(calls) == 1:
                raise RuntimeError("refused by the test")
            return socketstream.TLSServerStream(new_connection, None, loop)

        server = await socketstream.start_tls_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        await asyncio.sleep(0.05)
        before = _fds()

        def refused():
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                return s.recv(10)
        assert await in_thread(refused) == b""
        await asyncio.sleep(0.05)
        assert made and all(s.fileno() == -1 for s in made), [s.fileno() for s in made]
        assert _fds() <= before

        def served():   # the next connection is set up and handshakes
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                with client_context().wrap_socket(raw, server_hostname="stream.test") as s:
                    return s.version()
        assert await in_thread(served) in ("TLSv1.2", "TLSv1.3")
        server.close()

    uvloop.run(go())
