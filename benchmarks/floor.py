"""The floor: the least a Python TLS-terminating proxy can do per keep-alive request.

    python benchmarks/floor.py CERT KEY PORT UPSTREAM_PORT

Not the product and not a test fixture: a measuring stick for benchmarks/instructions.py
(--floor). pyOpenSSL memory BIOs on uvloop like the proxy, httptools callbacks on both
sides, a list of idle upstream connections; no routing, no timeouts, no validation beyond
llhttp's, no error handling, GET without a body only; a close_notify is answered and the
connection closed (tlsload's cycle). What the proxy spends above this
figure is the price of its codec interface and its request handling.
"""
import asyncio, sys, uvloop, httptools
from OpenSSL import SSL

cert, key, port, up_port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
ctx.use_certificate_chain_file(cert); ctx.use_privatekey_file(key)
ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
ctx.set_alpn_select_callback(lambda c, p: b"http/1.1")
idle = []

class Up(asyncio.Protocol):
    def connection_made(self, t):
        self.t = t; self.p = httptools.HttpResponseParser(self); self.client = None; self.buf = []
    def on_header(self, n, v):
        if n.lower() not in (b"connection", b"keep-alive"): self.buf.append(n + b": " + v + b"\r\n")
    def on_headers_complete(self):
        self.buf.insert(0, b"HTTP/1.1 %d OK\r\n" % self.p.get_status_code()); self.buf.append(b"\r\n")
    def on_body(self, b): self.buf.append(b)
    def on_message_complete(self):
        c = self.client; self.client = None
        data = b"".join(self.buf); self.buf = []
        idle.append(self)
        c.send(data)
    def data_received(self, d): self.p.feed_data(d)

class Client(asyncio.Protocol):
    def connection_made(self, t):
        self.t = t; self.c = SSL.Connection(ctx); self.c.set_accept_state()
        self.p = httptools.HttpRequestParser(self); self.hs = False; self.h = []; self.peer = t.get_extra_info("peername")[0]
    def on_url(self, u): self.url = u
    def on_header(self, n, v):
        if n.lower() not in (b"connection", b"keep-alive"): self.h.append(n + b": " + v + b"\r\n")
    def on_message_complete(self):
        req = b"".join([self.p.get_method(), b" ", self.url, b" HTTP/1.1\r\n"] + self.h +
                       [b"x-forwarded-for: ", self.peer.encode(), b"\r\nx-forwarded-proto: https\r\n\r\n"])
        self.h = []
        if idle:
            u = idle.pop(); u.client = self; u.t.write(req)
        else:
            asyncio.get_running_loop().create_task(self.connect(req))
    async def connect(self, req):
        _, u = await asyncio.get_running_loop().create_connection(Up, "127.0.0.1", up_port)
        u.client = self; u.t.write(req)
    def send(self, data):
        self.c.sendall(data); self.flush()
    def flush(self):
        try: out = self.c.bio_read(262144)
        except SSL.WantReadError: return
        self.t.write(out)
    def data_received(self, d):
        c = self.c; c.bio_write(d)
        if not self.hs:
            try: c.do_handshake()
            except SSL.WantReadError: self.flush(); return
            self.hs = True
        while True:
            try: chunk = c.recv(65536)
            except SSL.WantReadError: break
            except (SSL.ZeroReturnError, SSL.SysCallError):   # close_notify: answer it and close
                c.shutdown(); self.flush(); self.t.close(); return
            self.p.feed_data(chunk)
        self.flush()

async def main():
    srv = await asyncio.get_running_loop().create_server(Client, "127.0.0.1", port, backlog=4096)
    await srv.serve_forever()
uvloop.run(main())
