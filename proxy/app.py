"""Wiring and lifecycle: start the listeners, reload on SIGHUP, drain and stop on SIGTERM."""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from typing import Optional

from . import __version__, metrics
from ._source import compiled
from .config import ConfigError, Options, load_config
from .http.access_log import AccessLog
from .http.metrics_listener import DRAINING, SERVING, STARTING, MetricsConnection
from .http import proxy as proxy_module
from .http.proxy import HTTP, ClientConnection, ProxyState
from .http.redirect import RedirectConnection
from .http.routes import RouteTable
from .http.upstream import UpstreamPool
from .listening import listen_error, unprivileged_port_start
from .tls.certcache import MANUAL, Certificate, CertificateCache
from .tls.engine import TLSEngine, self_signed_certificate
from .tls.socketstream import TLSServerStream, Waiting, check_pyopenssl, start_tls_server
from .tls.transport import Stream

log = logging.getLogger("proxy")


def manual_certificates(options: Options) -> list[Certificate]:
    # load_config has parsed the chains and matched every key to its certificate already
    return [Certificate(chain_pem=p.cert_data, key_pem=p.key_data, source=MANUAL, origin=p.origin,
                        key_checked=True, parsed=p.certs) for p in options.certificates]


def settle_heap() -> None:
    """Keep what start-up or a reload made (the configuration, thousands of certificates with
    their contexts) out of the garbage collector's way until the next reload: ``gc.freeze``.
    Otherwise every full collection walks all of it, and under load full collections come
    every few hundred connections (with 10,000 certificates, about a tenth of a handshake's
    instructions, benchmarks/README.md). A reload first hands the previous ones back
    (``gc.unfreeze``) and collects, so that the old configuration's cycles are freed. The
    collector runs again from here if start-up had paused it (``cli.main``: loading thousands
    of certificates made it walk the growing heap again and again)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    gc.enable()


def tune_malloc(environ, mmap_threshold: int = 1 << 20, trim_threshold: int = 4 << 20) -> bool:
    """Keep bulk-transfer buffers in the heap instead of returning them to the OS each time.

    glibc gives a freed block above its trim threshold (dynamic, a few hundred KiB) back to
    the kernel, and serves blocks above its mmap threshold with mmap: a proxy that moves
    256 KiB chunks then faults fresh, zeroed pages in for most of what it moves (measured:
    about 235 page faults per 1 MiB response, system CPU 1.3 ms per MiB instead of 0.7). Fixed
    thresholds (heap up to 1 MiB blocks, at most 4 MiB kept free) stop that churn. Skipped
    when the operator set glibc's own malloc settings; a no-op where there is no mallopt."""
    if any(k.startswith("MALLOC_") and k.endswith("_") for k in environ) \
            or "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        import ctypes
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))


def set_log_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())


class App:
    def __init__(self, options: Options, environ: Optional[dict] = None):
        self.options = options
        self.environ = dict(os.environ if environ is None else environ)
        self.cache = CertificateCache()
        self.cache.set_fallback(self_signed_certificate())
        self.engine = TLSEngine(self.cache)
        self.pool = UpstreamPool()
        self.state = ProxyState(options=options, routes=RouteTable(options.routes, options.address.port), pool=self.pool,
                                access_log=AccessLog(options.access_log_format))
        self.servers: list[asyncio.AbstractServer] = []   # the traffic listeners
        self.connections: dict = {}   # the task serving each open connection -> the connection
        # the metrics listener and its connections: they answer health probes while draining
        self.metrics_server: Optional[asyncio.AbstractServer] = None
        self.metrics_connections: dict = {}
        self.phase = STARTING   # then SERVING when start() is done, DRAINING from shutdown() on
        # TLS connections without a request yet: made by start, before anything reads it
        self.waiting: Optional[Waiting] = None
        self.stopped = asyncio.Event()
        self.autocert = None      # the autocert manager, when enabled
        self.stapler = None
        self._stapler_task: Optional[asyncio.Task] = None
        self._reloading = False
        self._loop: Optional[asyncio.AbstractEventLoop] = None   # set by start()
        # Bound methods made once: each connection keeps the ones it is given (64 B apiece)
        self._new_tls_connection = self.engine.new_connection
        self._untrack_cb = self._untrack
        self._get_state_cb = self._get_state

    # --- connection factories ---
    def _track(self, conn) -> None:
        task = self._loop.create_task(conn.run())
        self.connections[task] = conn
        task.add_done_callback(self._untrack_cb)   # (no closure per connection: it would stay as long)

    def _untrack(self, task) -> None:
        self.connections.pop(task, None)

    def _get_state(self) -> ProxyState:
        return self.state

    def _tls_protocol(self) -> TLSServerStream:
        # The connection waits on its own (handshake, first byte) until it has a request to
        # serve: only then does it get its task and HTTP state (``_start_tls``).
        return TLSServerStream(self._new_tls_connection, self.engine.prepare, self._loop, self.waiting)

    def _start_tls(self, stream: TLSServerStream) -> None:
        self._track(ClientConnection(stream, self._get_state_cb, scheme="https"))

    def _redirect_protocol(self) -> Stream:
        stream = Stream(self._loop)
        http01 = self.autocert.http01 if self.autocert is not None else None
        kwargs = {"http01": http01} if http01 else {}
        self._track(RedirectConnection(stream, lambda: self.state.options.address.port,
                                       timeout=self.state.options.timeout_read_header, **kwargs))
        return stream

    # --- lifecycle ---
    async def start(self) -> None:
        self._loop = loop = asyncio.get_running_loop()
        self.waiting = Waiting(loop, self.options.timeout_read_header, self._start_tls)
        tune_malloc(self.environ)
        opts = self.options
        for w in opts.warnings:
            log.warning("%s", w)
        log.info("autocert-proxy %s, HTTP/1.1 parser: %s, request path: %s", __version__,
                 "h11" if HTTP.__name__ == "h11" else "httptools (llhttp)",
                 "compiled (Cython)" if compiled(proxy_module) else "Python source")
        for sig, handler in ((signal.SIGTERM, self._on_stop), (signal.SIGINT, self._on_stop),
                             (signal.SIGHUP, self._on_reload)):
            try:
                loop.add_signal_handler(sig, handler)
            except (NotImplementedError, RuntimeError):
                pass
        metrics.register_gauges(self._gauges)
        manual = manual_certificates(opts)
        self.cache.replace_manual(manual)
        storage = None
        if opts.autocert:
            from .autocert.manager import AutocertManager   # only when enabled
            from .storage import open_storage
            storage = open_storage(opts.autocert_dir)
            self.autocert = AutocertManager(opts, self.cache, self.environ, storage=storage,
                                            before_publish=self._before_publish)
            self.engine.challenge_lookup = self.autocert.tls_alpn
            self.engine.prepare = self.autocert.prepare_handshake
        from .tls.ocsp import Stapler
        poll = float(self.environ.get("AUTOCERT_PROXY_OCSP_POLL", "5"))
        self.stapler = Stapler(self.cache, storage, on_revoked=self._on_revoked, poll_interval=poll)
        # A must-staple manual certificate gets a few seconds for its first staple, so that it
        # is served from the first handshake on; after that, priming goes on in the background.
        await self._install_manual(manual, wait=5.0)
        # Listeners before anything slow: they never wait for storage or a CA (a handshake
        # for a managed name waits briefly for the first look into storage).
        check_pyopenssl()   # a clear error now, not on every connection
        self.servers.append(await self._listen(opts.address, start_tls_server(
            self._tls_protocol, opts.address.host or None, opts.address.port,
            reuse_address=True, reuse_port=opts.workers > 1, backlog=2048)))
        log.info("listening for HTTPS on %s", opts.address)
        if opts.http_redirect_addr is not None:
            a = opts.http_redirect_addr
            self.servers.append(await self._listen(a, loop.create_server(
                self._redirect_protocol, a.host or None, a.port,
                reuse_address=True, reuse_port=opts.workers > 1, backlog=1024)))
            log.info("listening for HTTP (redirect, HTTP-01) on %s", a)
        if opts.metrics_address is not None:
            m = opts.metrics_address
            self.metrics_server = await self._listen(m, loop.create_server(
                self._metrics_protocol, m.host or None, m.port,
                reuse_address=True, reuse_port=opts.workers > 1))
            log.info("serving metrics on http://%s/metrics, health probes on /healthz and /readyz", m)
        self._stapler_task = loop.create_task(self.stapler.run())
        if self.autocert is not None:
            await self.autocert.start()
        settle_heap()
        if self.phase == STARTING:   # (a SIGTERM may have come during start-up)
            self.phase = SERVING

    @staticmethod
    async def _listen(address, opening):
        try:
            return await opening
        except OSError as e:
            raise listen_error(address, e, unprivileged_port_start()) from None

    def _metrics_protocol(self) -> Stream:
        stream = Stream(self._loop)
        conn = MetricsConnection(stream, lambda: self.phase)
        task = self._loop.create_task(conn.run())
        self.metrics_connections[task] = conn
        task.add_done_callback(lambda t: self.metrics_connections.pop(t, None))
        return stream

    def _gauges(self):
        yield ("autocert_proxy_connections_open", {},
               float(len(self.connections) + len(self.waiting) + len(self.metrics_connections)))
        for c in self.cache.all():
            yield ("autocert_proxy_certificate_not_after_seconds",
                   {"name": c.names[0] if c.names else "", "source": c.source}, c.not_after.timestamp())

    async def _before_publish(self, cert: Certificate) -> None:
        """A must-staple certificate enters the cache only with a good staple (raises otherwise)."""
        if cert.must_staple and self.stapler is not None:
            await self.stapler.prime(cert)

    def _on_revoked(self, cert: Certificate) -> None:
        if cert.source == MANUAL:
            log.error("manual certificate %s (%s) is REVOKED according to its OCSP responder: replace it",
                      ", ".join(cert.names), cert.origin)
        elif self.autocert is not None:
            log.error("certificate for %s was revoked: renewing it now with a new key", ", ".join(cert.names))
            self.autocert.request_renewal(cert)

    async def _install_manual(self, certs: list[Certificate], wait: float = 0.0) -> None:
        """Serve the manual certificates. The cache never picks a must-staple certificate
        without a staple; priming here fetches its first staple at once (the stapler keeps
        retrying afterwards) and says clearly when it cannot be served yet."""
        # an unchanged certificate keeps its served object (and staple): a reload while the
        # responder is down must not drop a must-staple certificate that holds a valid staple
        certs = self.cache.replace_manual(certs)
        pending = [c for c in certs if c.must_staple and c.ocsp_staple is None]
        if pending:
            task = asyncio.get_running_loop().create_task(self._prime(pending))
            if wait:
                await asyncio.wait([task], timeout=wait)

    async def _prime(self, certs: list[Certificate]) -> None:
        async def one(c: Certificate) -> None:
            try:
                await self._before_publish(c)
            except Exception as e:
                log.error("manual certificate %s not served until its OCSP staple can be obtained: %s",
                          c.origin, e)
        await asyncio.gather(*(one(c) for c in certs))

    def _on_stop(self) -> None:
        asyncio.get_running_loop().create_task(self.shutdown())

    def _on_reload(self) -> None:
        # A reload while draining would install a fresh, non-draining state.
        if not self._reloading and not self.state.draining:
            asyncio.get_running_loop().create_task(self.reload())

    async def reload(self) -> bool:
        """Reload the config file and certificates; keep the old config when the new one is invalid."""
        self._reloading = True
        try:
            try:
                new = await asyncio.to_thread(load_config, self.options.source or None, os.environ)
            except ConfigError as e:
                log.error("reload rejected, still serving the previous configuration:\n%s",
                          "\n".join(f"  - {p}" for p in e.problems))
                return False
            except Exception as e:
                log.error("reload failed, still serving the previous configuration: %s", e)
                return False
            if new.address != self.options.address or new.http_redirect_addr != self.options.http_redirect_addr:
                log.warning("listener addresses changed in the configuration: restart to apply them")
            await self._install_manual(manual_certificates(new))
            set_log_level(new.log_level)
            self.state = ProxyState(options=new, routes=RouteTable(new.routes, new.address.port), pool=self.pool,
                                    access_log=AccessLog(new.access_log_format))
            self.options = new
            self.waiting.timeout = new.timeout_read_header
            if self.autocert is not None:
                await self.autocert.reconfigure(new)
            settle_heap()
            for w in new.warnings:
                log.warning("%s", w)
            log.info("configuration reloaded: %d routes, %d manual certificates",
                     len(new.routes), len(new.certificates))
            return True
        finally:
            self._reloading = False

    async def shutdown(self) -> None:
        if self.state.draining:
            return
        log.info("shutting down: draining %d connections (up to %ss)",
                 len(self.connections) + len(self.waiting), self.state.options.shutdown_timeout)
        self.state.draining = True
        self.phase = DRAINING
        for s in self.servers:
            s.close()
        if self.stapler is not None:
            await self.stapler.close()
        if self._stapler_task is not None:
            self._stapler_task.cancel()
        if self.autocert is not None:
            await self.autocert.stop()
        deadline = asyncio.get_running_loop().time() + self.state.options.shutdown_timeout
        for stream in self.waiting:   # no request on them: closed now (they leave ``waiting``)
            stream.close()
        while self.connections:
            for c in list(self.connections.values()):
                if not c.busy:
                    c.stream.close()
            if asyncio.get_running_loop().time() >= deadline:
                log.warning("drain timeout: closing %d connections", len(self.connections))
                for c in list(self.connections.values()):
                    c.stream.abort()
                break
            await asyncio.sleep(0.05)
        self.pool.close()
        if self.metrics_server is not None:   # probes said 503 until here
            self.metrics_server.close()
        for c in list(self.metrics_connections.values()):
            c.stream.close()
        self.stopped.set()

    async def run_forever(self) -> None:
        await self.start()
        await self.stopped.wait()
