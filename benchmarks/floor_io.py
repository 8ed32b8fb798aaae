"""Two ways for Python to move TLS bytes, in the same minimal proxy: is a transport redesign worth it?

    python benchmarks/floor_io.py CERT KEY PORT UPSTREAM_PORT membio|sockbio

A measuring stick for benchmarks/instructions.py (--floor-io membio|sockbio), not the product.
Like floor.py (httptools callbacks, a list of idle upstream connections, no routing, no
timeouts, GET without a body, POST bodies streamed), but response and request bodies are
streamed chunk by chunk as the proxy does, and the client side's TLS I/O is one of:

- membio: what the proxy does. pyOpenSSL memory BIOs on a uvloop transport, OpenSSL called
  directly as in proxy/tls/transport.py (exact-size BIO reads handed to the transport,
  records decrypted into one buffer per arrival, writes in 64 KiB pieces).
- sockbio: OpenSSL reads and writes the socket itself (SSL_set_fd; pyOpenSSL's binding has
  no read-ahead switch, so each record is read in two system calls: header, then body),
  the socket watched with loop.add_reader/add_writer, accepted by our own accept loop.
- syslib: sockbio on the system's libssl.so.3 (Debian 12: OpenSSL 3.0, the library nginx links)
  through a minimal cffi binding in ABI mode, with read-ahead on: what the same design would
  cost on the OpenSSL nginx uses instead of the OpenSSL 4.0 that cryptography's wheels bundle.
  Certificate and key only (no SNI, OCSP or ALPN callbacks).
"""
import asyncio
import socket
import sys

import httptools
import uvloop
from OpenSSL import SSL
from OpenSSL.SSL import _ffi, _lib

cert, key, port, up_port, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
if mode == "syslib":
    import cffi
    _ffi = cffi.FFI()
    _ffi.cdef("""
        typedef struct ssl_st SSL; typedef struct ssl_ctx_st SSL_CTX; typedef struct ssl_method_st SSL_METHOD;
        const SSL_METHOD *TLS_server_method(void);
        SSL_CTX *SSL_CTX_new(const SSL_METHOD *);
        int SSL_CTX_use_certificate_chain_file(SSL_CTX *, const char *);
        int SSL_CTX_use_PrivateKey_file(SSL_CTX *, const char *, int);
        long SSL_CTX_ctrl(SSL_CTX *, int, long, void *);
        SSL *SSL_new(SSL_CTX *);
        void SSL_free(SSL *);
        int SSL_set_fd(SSL *, int);
        void SSL_set_accept_state(SSL *);
        int SSL_do_handshake(SSL *);
        int SSL_read(SSL *, void *, int);
        int SSL_write(SSL *, const void *, int);
        int SSL_get_error(const SSL *, int);
        int SSL_shutdown(SSL *);
        const char *OpenSSL_version(int);
    """)
    _lib = _ffi.dlopen("libssl.so.3")
    _ffi.cdef("void ERR_clear_error(void);")
    _crypto = _ffi.dlopen("libcrypto.so.3")
    sysctx = _lib.SSL_CTX_new(_lib.TLS_server_method())   # (for the process's life)
    assert _lib.SSL_CTX_use_certificate_chain_file(sysctx, cert.encode()) == 1
    assert _lib.SSL_CTX_use_PrivateKey_file(sysctx, key.encode(), 1) == 1
    # SSL_CTRL_MODE (33): RELEASE_BUFFERS | ENABLE_PARTIAL_WRITE | ACCEPT_MOVING_WRITE_BUFFER
    _lib.SSL_CTX_ctrl(sysctx, 33, 0x10 | 0x1 | 0x2, _ffi.NULL)
    _lib.SSL_CTX_ctrl(sysctx, 41, 1, _ffi.NULL)   # SSL_CTRL_SET_READ_AHEAD
    print("floor_io syslib:", _ffi.string(_lib.OpenSSL_version(0)).decode(), flush=True)
    WANT_READ, WANT_WRITE, ZERO = 2, 3, 6
    _lib_err = _crypto
else:
    _lib_err = _lib
ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
ctx.use_certificate_chain_file(cert)
ctx.use_privatekey_file(key)
ctx.set_mode(SSL.MODE_RELEASE_BUFFERS | 0x1 | 0x2)   # + ENABLE_PARTIAL_WRITE, ACCEPT_MOVING_WRITE_BUFFER
ctx.set_alpn_select_callback(lambda c, p: b"http/1.1")
alloc = _ffi.new_allocator(should_clear_after_alloc=False)
NULL = _ffi.NULL
if mode != "syslib":
    WANT_READ, WANT_WRITE, ZERO = _lib.SSL_ERROR_WANT_READ, _lib.SSL_ERROR_WANT_WRITE, _lib.SSL_ERROR_ZERO_RETURN
PIECE = 64 * 1024
idle = []
loop = None


class Up(asyncio.Protocol):
    def connection_made(self, t):
        self.t = t
        self.p = httptools.HttpResponseParser(self)
        self.client = None
        self.h = []

    def on_header(self, n, v):
        if n.lower() not in (b"connection", b"keep-alive"):
            self.h.append(n + b": " + v + b"\r\n")

    def on_headers_complete(self):
        self.client.send(b"HTTP/1.1 %d OK\r\n" % self.p.get_status_code() + b"".join(self.h) + b"\r\n")
        self.h = []

    def on_body(self, b):
        self.client.send(b)

    def on_message_complete(self):
        c, self.client = self.client, None
        if c.req_done:        # the upstream goes back to the list once both messages are complete
            c.up = None
            idle.append(self)
        else:
            c.up_done = True

    def data_received(self, d):
        self.p.feed_data(d)


class Base:
    """The HTTP side of a client connection (the same for both designs)."""

    def setup(self):
        self.p = httptools.HttpRequestParser(self)
        self.h = []
        self.up = None
        self.pending = []
        self.req_done = self.up_done = False

    def on_url(self, u):
        self.url = u

    def on_message_begin(self):
        self.req_done = False
        self.up_done = False

    def on_message_complete(self):
        self.req_done = True
        if self.up_done and self.up is not None:
            idle.append(self.up)
            self.up = None

    def on_header(self, n, v):
        if n.lower() not in (b"connection", b"keep-alive"):
            self.h.append(n + b": " + v + b"\r\n")

    def on_headers_complete(self):
        req = b"".join([self.p.get_method(), b" ", self.url, b" HTTP/1.1\r\n"] + self.h +
                       [b"x-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: https\r\n\r\n"])
        self.h = []
        if idle:
            u = idle.pop()
            u.client = self
            self.up = u
            u.t.write(req)
        else:
            self.pending.append(req)
            loop.create_task(self.connect())

    def on_body(self, b):
        if self.up is not None:
            self.up.t.write(b)
        else:
            self.pending.append(b)

    async def connect(self):
        _, u = await loop.create_connection(Up, "127.0.0.1", up_port)
        u.client = self
        self.up = u
        for b in self.pending:
            u.t.write(b)
        self.pending = []


class MemBIO(asyncio.Protocol, Base):
    def connection_made(self, t):
        self.t = t
        self.c = SSL.Connection(ctx, None)
        self.c.set_accept_state()
        self.hs = False
        self.setup()

    def send(self, data):
        ssl, p, n, off = self.c._ssl, _ffi.from_buffer(data), len(data), 0
        while off < n:
            k = min(n - off, PIECE)
            off += _lib.SSL_write(ssl, p + off, k)
            self.flush()

    def flush(self):
        wbio = self.c._from_ssl
        n = _lib.BIO_get_mem_data(wbio, NULL)
        if n > 0:
            buf = alloc("char[]", n)
            _lib.BIO_read(wbio, buf, n)
            self.t.write(memoryview(_ffi.buffer(buf, n)))

    def data_received(self, d):
        c = self.c
        ssl, rbio = c._ssl, c._into_ssl
        _lib.BIO_write(rbio, _ffi.from_buffer(d), len(d))
        if not self.hs:
            r = _lib.SSL_do_handshake(ssl)
            if r != 1:
                if _lib.SSL_get_error(ssl, r) != WANT_READ:
                    self.t.close()
                self.flush()
                return
            self.hs = True
        avail = _lib.BIO_get_mem_data(rbio, NULL) + _lib.SSL_pending(ssl)
        if avail > 0:
            avail += 16384
            buf = alloc("char[]", avail)
            got = 0
            while got < avail:
                r = _lib.SSL_read(ssl, buf + got, avail - got)
                if r > 0:
                    got += r
                    continue
                if _lib.SSL_get_error(ssl, r) != WANT_READ:   # close_notify: answer and close
                    _lib.SSL_shutdown(ssl)
                    self.flush()
                    self.t.close()
                    return
                break
            if got:
                self.p.feed_data(_ffi.buffer(buf, got)[:])
        self.flush()


class SockBIO(Base):
    def __init__(self, sock):
        self.sock = sock
        self.fd = sock.fileno()
        if mode == "syslib":
            self.ssl = _ffi.gc(_lib.SSL_new(sysctx), _lib.SSL_free)
            _lib.SSL_set_fd(self.ssl, self.fd)
            _lib.SSL_set_accept_state(self.ssl)
        else:
            self.c = SSL.Connection(ctx, sock)   # SSL_set_fd: OpenSSL reads and writes the socket
            self.c.set_accept_state()
            self.ssl = self.c._ssl
        self.hs = False
        self.out = []            # plaintext not yet taken by SSL_write (socket full)
        self.writing = False
        self.setup()
        loop.add_reader(self.fd, self.readable)

    def send(self, data):
        if self.out:
            self.out.append(data)
            return
        self._write(data)

    def _write(self, data):
        ssl, p, n, off = self.ssl, _ffi.from_buffer(data), len(data), 0
        while off < n:
            r = _lib.SSL_write(ssl, p + off, n - off)
            if r > 0:
                off += r
                continue
            if _lib.SSL_get_error(ssl, r) == WANT_WRITE:
                self.out.insert(0, data[off:])
                if not self.writing:
                    self.writing = True
                    loop.add_writer(self.fd, self.writable)
                    if self.up is not None:
                        self.up.t.pause_reading()
                return
            self.close()
            return

    def writable(self):
        out, self.out = self.out, []
        for i, data in enumerate(out):
            self._write(data)
            if self.out:
                self.out.extend(out[i + 1:])
                return
        self.writing = False
        loop.remove_writer(self.fd)
        if self.up is not None:
            self.up.t.resume_reading()

    def close(self):
        loop.remove_reader(self.fd)
        if self.writing:
            loop.remove_writer(self.fd)
        self.sock.close()

    def readable(self):
        ssl = self.ssl
        if not self.hs:
            r = _lib.SSL_do_handshake(ssl)
            if r != 1:
                if _lib.SSL_get_error(ssl, r) not in (WANT_READ, WANT_WRITE):
                    self.close()
                return
            self.hs = True
        size = 65536
        buf = alloc("char[]", size)
        got = 0
        while True:
            r = _lib.SSL_read(ssl, buf + got, size - got)
            if r > 0:
                got += r
                if got == size:
                    self.p.feed_data(_ffi.buffer(buf, got)[:])
                    got = 0
                continue
            err = _lib.SSL_get_error(ssl, r)
            if err == WANT_READ:
                break
            if got:
                self.p.feed_data(_ffi.buffer(buf, got)[:])
            if err == ZERO:
                _lib.SSL_shutdown(ssl)
            _lib_err.ERR_clear_error()
            self.close()
            return
        if got:
            self.p.feed_data(_ffi.buffer(buf, got)[:])


async def main():
    global loop
    loop = asyncio.get_running_loop()
    if mode == "membio":
        srv = await loop.create_server(MemBIO, "127.0.0.1", port, backlog=4096)
        await srv.serve_forever()
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", port))
    lsock.listen(4096)
    lsock.setblocking(False)

    def accept():
        while True:
            try:
                s, _ = lsock.accept()
            except BlockingIOError:
                return
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            SockBIO(s)

    loop.add_reader(lsock.fileno(), accept)
    await asyncio.Event().wait()

uvloop.run(main())
