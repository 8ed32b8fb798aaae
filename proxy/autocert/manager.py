"""The autocert manager: which names need a certificate, and getting and keeping them.

Per name: use the certificate in memory; else the one in storage (another instance, an
earlier run, or Caddy/Pomerium may have put it there); else take the name's lock, look again,
and order one from the CA. Renew at the CA's ARI window or in the last third of the lifetime.
A failure never takes the site down: what is served stays, and the next attempt waits an
exponential, jittered backoff kept in storage, so a crash loop cannot hammer the CA.

Talks to the certificate cache and the challenge store, never to sockets. The ACME
conversation is blocking (``requests``) and runs in worker threads.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import logging
import math
import threading
import time
from dataclasses import asdict, dataclass
from typing import Awaitable, Callable, Mapping, Optional

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .. import metrics
from ..config import Options
from ..storage import NotFound, Storage, StorageError, check, open_storage
from ..tls.certcache import ACME, Certificate, CertificateCache, CertificateProblem
from ..tls.clienthello import parse_client_hello
from . import layout
from .challenges import (HTTP_01, TLS_ALPN_01, Challenge, ChallengeStore, ip_from_sni,
                         preferred_challenge_types, storage_key)
from .issuer import AcmeError, AcmeIssuer, IssuerSettings, issuer_id
from .schedule import (DEFAULT_RETRY_CAP, RenewalPlan, ari_record, next_ari_poll, plan_renewal, retry_delay,
                       window_point)

log = logging.getLogger("proxy.autocert")


async def _within(aw, seconds: float):
    """``aw`` bounded by ``seconds`` (TimeoutError). Not asyncio.wait_for: on Python 3.11 it
    can drop a cancellation that arrives as the awaited call finishes (CPython gh-86296)."""
    async with asyncio.timeout(seconds):
        return await aw

STOP_GRACE = 5.0   # s that stop() waits for running orders to clean up their challenges

# Problems that mean "the CA could not validate this way": the other challenge type may work.
_VALIDATION_PROBLEMS = ("connection", "unauthorized", "tls", "incorrectResponse", "dns")


async def load_stored_certificate(storage: Storage, issuer_key: str, name: str) -> Certificate:
    """The certificate stored for ``name`` under the CA ``issuer_key``.
    Raises NotFound, StorageError, or CertificateProblem for unusable data."""
    chain = await storage.load(layout.cert_key(issuer_key, name))
    key = await storage.load(layout.private_key_key(issuer_key, name))
    return stored_certificate(chain, key, issuer_key, name)


def stored_certificate(chain: bytes, key: bytes, issuer_key: str, name: str) -> Certificate:
    """The certificate from stored bytes; CertificateProblem for anything unusable."""
    try:
        return Certificate(chain_pem=chain, key_pem=key, source=ACME,
                           origin=layout.cert_key(issuer_key, name), issuer_id=issuer_key)
    except CertificateProblem:
        raise
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:   # a field parsed lazily (an extension)
        raise CertificateProblem(f"the certificate cannot be parsed: {e}") from None


def wanted_names(options: Options, cache: CertificateCache, now: Optional[dt.datetime] = None) -> list[str]:
    """Route hosts with an https ``from`` and no wildcard, minus names a valid manual certificate covers."""
    now = now or dt.datetime.now(dt.timezone.utc)
    names: list[str] = []
    for r in options.routes:
        if r.scheme != "https" or "*" in r.host or r.host in names:
            continue
        manual = cache.manual_covering(r.host)
        if manual is not None and not manual.expired(now):
            continue
        names.append(r.host)
    return names


@dataclass
class NameState:
    """What we remember per name between attempts and restarts (kept in storage)."""
    failures: int = 0
    next_attempt: float = 0.0          # unix time; 0 = now
    last_error: str = ""
    last_error_at: float = 0.0
    renew_requested: bool = False      # `autocert-proxy renew`, or the certificate was revoked
    renew_request: str = ""            # the stored request acted on (one attempt per request)
    last_success_at: float = 0.0

    @classmethod
    def from_json(cls, data: bytes) -> "NameState":
        """Fields of the wrong type or out of range (an edited or foreign file) get their defaults."""
        state = cls()
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError):
            return state
        if not isinstance(obj, dict):
            return state
        for f in dataclasses.fields(cls):
            v, default = obj.get(f.name), getattr(state, f.name)
            if type(v) is not type(default) and not (type(default) is float and type(v) is int):
                continue   # missing, or another type (a boolean is no number here)
            if type(v) in (int, float):
                try:
                    if not 0 <= float(v) < math.inf:   # negative, NaN or infinite
                        continue
                except OverflowError:                  # an integer beyond any float
                    continue
            setattr(state, f.name, type(default)(v))
        return state

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()


def _last_event(state: NameState) -> float:
    return max(state.last_error_at, state.last_success_at)


@dataclass
class _Unstored:
    """A certificate obtained and served but not yet in storage: stored at the next checks."""
    issuer_key: str
    serial: int
    key_pem: bytes
    meta: bytes
    chain_pem: bytes


def new_certificate_key() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class AutocertManager:
    def __init__(self, options: Options, cache: CertificateCache, environ: Mapping[str, str],
                 *, storage: Optional[Storage] = None,
                 before_publish: Optional[Callable[[Certificate], Awaitable[None]]] = None):
        self.cache = cache
        self.challenges = ChallengeStore()
        self.storage = storage or open_storage(options.autocert_dir)
        self.before_publish = before_publish
        # Tuning for tests and impatient operators; documented in the README.
        self.check_interval = float(environ.get("AUTOCERT_PROXY_CHECK_INTERVAL", "60"))
        self.retry_base = float(environ.get("AUTOCERT_PROXY_RETRY_BASE", "60"))
        self._apply(options)
        self._issuer: Optional[AcmeIssuer] = None
        self._by_type: dict[str, AcmeIssuer] = {}
        self._issuer_settings: Optional[IssuerSettings] = None
        self._issuer_lock = asyncio.Lock()
        self._states: dict[str, NameState] = {}
        # serial -> (the CA's suggested window or None, when to ask again)
        self._ari: dict[int, tuple[Optional[tuple[dt.datetime, dt.datetime]], dt.datetime]] = {}
        self._ari_reader: Optional[AcmeIssuer] = None   # account-less, for ARI before any order
        # Until the first look into storage is done, every managed name counts as missing, and
        # a handshake for one waits (briefly) for that look instead of getting the default.
        self._missing: set[str] = set(wanted_names(options, cache))
        self._ready = asyncio.Event()
        self._miss_lookups: dict[str, float] = {}
        self._challenge_reads: dict[str, asyncio.Future] = {}
        self._wake = asyncio.Event()
        self._task: Optional[asyncio.Task] = None
        self._inflight: dict[str, asyncio.Task] = {}
        self._limit = asyncio.Semaphore(4)   # orders run concurrently, a few at a time
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._warned_manual_expired: set[str] = set()
        self._store_down = False
        self._unstored: dict[str, _Unstored] = {}
        # Set at stop: issuer threads stop waiting for the CA and clean up their challenges.
        self._stopping = threading.Event()
        self._closed = False
        self._orders: dict[asyncio.Future, str] = {}   # issuer threads still running -> name

    def _apply(self, options: Options) -> None:
        self.options = options
        self.ca = options.autocert_ca
        self.issuer_key = issuer_id(options.autocert_ca)
        redirect = options.http_redirect_addr
        types = preferred_challenge_types(options.address.port, redirect.port if redirect else None)
        self.settings = IssuerSettings(
            directory_url=options.autocert_ca, email=options.autocert_email,
            eab_key_id=options.autocert_eab_key_id, eab_mac_key=options.autocert_eab_mac_key,
            trusted_ca_pem=options.autocert_trusted_ca_pem, must_staple=options.autocert_must_staple,
            profile=options.autocert_profile, preferred_chain=options.autocert_preferred_chain,
            challenge_types=types)

    # ------------------------------------------------------------------ traffic-side hooks
    def tls_alpn(self, server_name: str):
        """(certificate, key) objects for a pending TLS-ALPN-01 challenge: no parsing per handshake."""
        return self.challenges.tls_alpn_objects(server_name)

    async def http01(self, host: str, token: str) -> Optional[str]:
        key_auth = self.challenges.http01(token)
        if key_auth is not None or not host:
            return key_auth
        ch = await self._stored_challenge(host)   # placed by another instance
        if ch is not None and ch.type == HTTP_01 and ch.token == token:
            return ch.key_authorization
        return None

    def prepare_handshake(self, first_bytes: bytes) -> Optional[asyncio.Future]:
        """Before OpenSSL sees a ClientHello: fetch from storage what the handshake will need.

        Only two cases pay for parsing the hello: a CA's ``acme-tls/1`` validation whose
        challenge another instance placed, and a managed name with no certificate in memory
        (another instance may have obtained it).
        """
        alpn_hint = b"acme-tls/1" in first_bytes
        if not alpn_hint and not self._missing:
            return None
        facts = parse_client_hello(first_bytes)
        if facts is None or not facts.server_name:
            return None
        name = facts.server_name
        if b"acme-tls/1" in facts.alpn:
            if self.challenges.tls_alpn(name) is not None:
                return None
            return asyncio.ensure_future(self._adopt_stored_challenge(name))
        if name in self._missing and self.cache.managed(name) is None:
            if not self._ready.is_set():
                return asyncio.ensure_future(_within(self._ready.wait(), 5.0))
            now = time.monotonic()
            if now - self._miss_lookups.get(name, -1e9) < 2.0:
                return None
            self._miss_lookups[name] = now
            return asyncio.ensure_future(_within(self._sync_from_storage(name), 3.0))
        return None

    async def _stored_challenge(self, name: str) -> Optional[Challenge]:
        """A challenge another instance placed for ``name``. Only managed names are looked up
        (a stranger's random names cost no storage read), and concurrent lookups for one name
        (a CA validating from several vantage points) share one read."""
        if name not in wanted_names(self.options, self.cache):
            return None
        pending = self._challenge_reads.get(name)
        if pending is None:
            pending = self._challenge_reads[name] = asyncio.ensure_future(self._read_challenge(name))
            pending.add_done_callback(lambda _: self._challenge_reads.pop(name, None))
        return await asyncio.shield(pending)

    async def _read_challenge(self, name: str) -> Optional[Challenge]:
        key = storage_key(Challenge(HTTP_01, name, "-", "-"), self.issuer_key)
        try:
            async with asyncio.timeout(5.0):
                data = await self.storage.load(key)
            return Challenge.from_json(data)
        except (NotFound, StorageError, TimeoutError, ValueError, KeyError, TypeError):
            return None

    async def _adopt_stored_challenge(self, name: str) -> None:
        ch = await self._stored_challenge(ip_from_sni(name) or name)
        if ch is not None and ch.type == TLS_ALPN_01:
            self.challenges.present(ch)
            # forget it again after the CA's validation window
            asyncio.get_running_loop().call_later(120, self.challenges.remove, ch)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        opts = self.options
        if opts.address.port != 443 and (opts.http_redirect_addr is None or opts.http_redirect_addr.port != 80):
            log.warning("autocert: neither the TLS listener (%s) is on port 443 nor the HTTP listener on "
                        "port 80: a public CA will fail to validate (fine for a CA configured for these ports)",
                        opts.address)
        try:
            await check(self.storage)   # a bad autocert_dir is a start-up error naming the setting
        except BaseException:
            await self.storage.close()
            raise
        # Certificates already in storage are served from the first connection on.
        try:
            await asyncio.gather(*(self._sync_from_storage(n) for n in wanted_names(opts, self.cache)),
                                 return_exceptions=True)
        finally:
            self._ready.set()
        self._task = asyncio.get_running_loop().create_task(self._maintain())

    async def stop(self) -> None:
        if self._orders:
            log.info("autocert: order for %s abandoned at shutdown", ", ".join(sorted(set(self._orders.values()))))
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        for t in list(self._inflight.values()):
            t.cancel()
        if self._orders:
            # Their challenge clean-up needs this loop and its executor: wait while both run.
            await asyncio.wait(list(self._orders), timeout=STOP_GRACE)
        self._closed = True
        for i in [self._issuer, self._ari_reader, *self._by_type.values()]:
            if i is not None:
                i.close()
        await self.storage.close()

    async def reconfigure(self, options: Options) -> None:
        old_ca, old_settings = self.ca, self.settings
        self._apply(options)
        if self.settings != old_settings:
            # New trust, EAB key, email, must-staple or challenge types: the next order uses them
            # (the issuers were built with the old ones). In-flight orders keep their own issuer.
            self._issuer = self._ari_reader = None
            self._by_type = {}
            if options.autocert_ca == old_ca:
                # The operator changed something: names waiting out a backoff try again now.
                for n, st in list(self._states.items()):
                    if st.failures and st.next_attempt > time.time():
                        log.info("autocert settings changed: retrying %s now instead of waiting its backoff", n)
                        st.next_attempt = 0.0
                        await self._save_state(n, st)
        if options.autocert_ca != old_ca:
            # Staging and production never mix: drop what the old CA issued.
            log.info("autocert CA changed from %s to %s: obtaining new certificates", old_ca, self.ca)
            for c in list(self.cache.all()):
                if c.source == ACME:
                    for n in c.names:
                        self.cache.remove_managed(n)
            self._issuer = self._ari_reader = None
            self._states.clear()
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    def request_renewal(self, cert: Certificate) -> None:
        """Renew now (used when OCSP says the certificate was revoked)."""
        for n in cert.names:
            self._states.setdefault(n, NameState()).renew_requested = True
            self._states[n].next_attempt = 0.0
        self.wake()

    # ------------------------------------------------------------------ maintenance
    async def _maintain(self) -> None:
        while True:
            # Cleared before the check, not after: a wake() during the check (a reload, a revoked
            # certificate) must start another check at once instead of being lost.
            self._wake.clear()
            try:
                await self.check_all()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("autocert maintenance failed; will try again")
            delay = self.check_interval
            now = time.time()
            for n in wanted_names(self.options, self.cache):
                st = self._states.get(n)
                if st is not None and st.next_attempt > now:
                    delay = min(delay, st.next_attempt - now + 0.05)
            try:
                async with asyncio.timeout(max(0.05, delay)):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def check_all(self) -> None:
        names = wanted_names(self.options, self.cache)
        for c in self.cache.all():
            if c.source == "manual" and c.expired():
                for n in c.names:
                    if n in names and n not in self._warned_manual_expired:
                        self._warned_manual_expired.add(n)
                        log.warning("manual certificate for %s (%s) expired on %s: obtaining one automatically",
                                    n, c.origin, c.not_after.isoformat())
        self._missing = {n for n in names if self.cache.managed(n) is None}
        await self._read_renew_requests(names)
        tasks = []
        for n in names:
            t = self._inflight.get(n)
            if t is None or t.done():
                t = self._inflight[n] = asyncio.ensure_future(self._ensure(n))
            tasks.append(t)
        if tasks:
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for n, r in zip(names, results):
                if isinstance(r, Exception):   # never silent
                    log.error("autocert: checking %s failed: %s: %s", n, type(r).__name__, r,
                              exc_info=(type(r), r, r.__traceback__))
        self._missing = {n for n in names if self.cache.managed(n) is None}

    async def _read_renew_requests(self, names: list[str]) -> None:
        """Names someone asked to renew (``autocert-proxy renew``): one list call per check."""
        try:
            keys = await self.storage.list(layout.renew_request_prefix(self.issuer_key))
        except StorageError as e:
            metrics.inc("autocert_proxy_storage_errors_total", op="list")
            # This list runs at every check: it is how an outage of the store is noticed.
            # Logged once per outage; certificates keep being served from memory.
            if not self._store_down:
                self._store_down = True
                log.error("autocert: storage unreachable (%s); serving certificates from memory, "
                          "checking again every %gs: %s", self.storage.describe(), self.check_interval, e)
            return
        if self._store_down:
            self._store_down = False
            log.info("autocert: storage reachable again (%s)", self.storage.describe())
        requested = {k.rstrip("/").rsplit("/", 1)[-1] for k in keys}
        for n in names:
            if layout.renew_request_key(self.issuer_key, n).rsplit("/", 1)[-1] in requested:
                st = self._states.setdefault(n, await self._load_state(n))
                try:
                    request = (await self.storage.load(layout.renew_request_key(self.issuer_key, n))
                               ).decode("utf-8", "replace")
                except StorageError:   # NotFound too: done meanwhile
                    continue
                if st.renew_requested and request == st.renew_request:
                    continue   # acted on: if that attempt failed, the next one waits its backoff
                log.info("autocert: renewal of %s requested", n)
                st.renew_requested = True
                st.renew_request = request
                st.next_attempt = 0.0

    def _due(self, cert: Certificate, now: dt.datetime) -> bool:
        return now >= self.renewal_plan(cert, now).at

    def ari_window(self, cert: Certificate) -> Optional[tuple[dt.datetime, dt.datetime]]:
        known = self._ari.get(cert.leaf.serial_number)
        return known[0] if known else None

    def renewal_plan(self, cert: Certificate, now: Optional[dt.datetime] = None) -> RenewalPlan:
        serial = cert.leaf.serial_number
        return plan_renewal(cert.not_before, cert.not_after, self.ari_window(cert),
                            now=now or dt.datetime.now(dt.timezone.utc), point=window_point(serial))

    def next_renewal(self, cert: Certificate) -> dt.datetime:
        return self.renewal_plan(cert).at

    async def _ensure(self, name: str) -> None:
        unstored = self._unstored.get(name)
        if unstored is not None:
            await self._store_later(name, unstored)
        now = dt.datetime.now(dt.timezone.utc)
        state = self._states.get(name)
        if state is None:
            state = self._states[name] = await self._load_state(name)
        cert = self.cache.managed(name)
        if cert is None or self._due(cert, now) or state.renew_requested:
            stored = await self._sync_from_storage(name)
            if stored is not None:
                cert = stored
        if cert is not None:
            await self._refresh_ari(cert)
            if not self._due(cert, now) and not state.renew_requested:
                return
        if state.next_attempt > time.time():
            return
        async with self._limit:
            await self._obtain_locked(name)

    async def _obtain_locked(self, name: str) -> None:
        lock = layout.lock_name(name)
        try:
            await self.storage.lock(lock)
        except StorageError as e:
            metrics.inc("autocert_proxy_storage_errors_total", op="lock")
            log.warning("autocert: cannot take the lock for %s in %s: %s", name, self.storage.describe(), e)
            return
        try:
            # Another instance may have finished while we waited for the lock.
            stored_state = await self._load_state(name)
            local = self._states.get(name) or NameState()
            # the newer of the two: ours when saving it failed (a read-only store keeps backing off)
            state = local if local.renew_requested or _last_event(local) >= _last_event(stored_state) \
                else stored_state
            self._states[name] = state
            before = self.cache.managed(name)
            stored = await self._sync_from_storage(name)
            now = dt.datetime.now(dt.timezone.utc)
            if stored is not None and state.renew_requested and before is not None \
                    and stored.leaf.serial_number != before.leaf.serial_number:
                state.renew_requested = False   # renewed by another instance meanwhile
                return
            if stored is not None and not self._due(stored, now) and not state.renew_requested:
                return
            if state.next_attempt > time.time():
                return
            await self._obtain(name, state)
        finally:
            try:
                await self.storage.unlock(lock)
            except StorageError as e:
                log.warning("autocert: releasing the lock for %s failed (its lease will lapse): %s", name, e)

    async def _obtain(self, name: str, state: NameState) -> None:
        # The CA and settings of this order, fixed at its start: a reload switching the CA while
        # the order runs must not file the old CA's certificate (or failure) under the new CA.
        ikey, ca = self.issuer_key, self.ca
        try:
            _, by_type, settings = await self._get_issuer()
            ikey, ca = issuer_id(settings.directory_url), settings.directory_url
            key_pem = new_certificate_key()
            types = list(settings.challenge_types)
            issued = None
            i, registered_again = 0, False
            while issued is None:
                # Each challenge type in turn: a CA that cannot reach one port may reach the other.
                first = types[i]
                try:
                    issued = await self._in_thread(name, by_type[first].obtain, [name], key_pem,
                                                   self._present, self._cleanup)
                except AcmeError as e:
                    short = e.problem_type.rsplit(":", 1)[-1]
                    if short == "accountDoesNotExist" and not registered_again:
                        # the CA forgot our account (a reset, an expiry): register again, once
                        log.warning("autocert: %s no longer knows our ACME account; registering it again", ca)
                        registered_again = True
                        _, by_type, settings = await self._get_issuer(forget=by_type[first])
                        ikey, ca = issuer_id(settings.directory_url), settings.directory_url
                        types, i = list(settings.challenge_types), 0
                        continue
                    subs = [str((s.get("type") or "")).rsplit(":", 1)[-1] for s in (e.problem or {}).get("subproblems") or []]
                    validation = e.validation_failed or short in _VALIDATION_PROBLEMS or any(s in _VALIDATION_PROBLEMS for s in subs)
                    if validation and i + 1 < len(types) and not self._stopping.is_set():
                        log.warning("autocert: %s validation failed for %s (%s); trying %s", first, name, e, types[i + 1])
                        i += 1
                        continue
                    raise
        except AcmeError as e:
            if self._stopping.is_set():
                log.debug("autocert: order for %s stopped: %s", name, e)
            elif ikey == self.issuer_key:
                await self._failed(name, state, str(e), e.retry_after)
            return
        except StorageError as e:
            if ikey == self.issuer_key:
                await self._failed(name, state, f"storage: {e}", None)
            return
        except Exception as e:   # never silent (pomerium#1232): logged, and backed off like any failure
            log.exception("autocert: unexpected error while obtaining a certificate for %s", name)
            if ikey == self.issuer_key:
                await self._failed(name, state, f"unexpected error: {type(e).__name__}: {e}", None)
            return
        try:
            cert = Certificate(chain_pem=issued.chain_pem, key_pem=key_pem, source=ACME,
                               origin=layout.cert_key(ikey, name), issuer_id=ikey)
        except CertificateProblem as e:
            await self._failed(name, state, f"the CA returned an unusable certificate: {e}", None)
            return
        issuer_data = {"url": issued.cert_url, "ca": ca}
        if issued.profile:
            issuer_data["profile"] = issued.profile
        meta = json.dumps({"sans": list(issued.domains), "issuer_data": issuer_data}, indent=1).encode()
        unstored = _Unstored(ikey, cert.leaf.serial_number, key_pem, meta, issued.chain_pem)
        stored = await self._store_issued(name, unstored, first_try=True)
        metrics.inc("autocert_proxy_acme_orders_total", result="valid")
        log.info("autocert: obtained a certificate for %s from %s in %.2fs (valid until %s)",
                 name, ca, issued.elapsed, issued.not_after.isoformat())
        if ikey != self.issuer_key:
            log.info("autocert: the CA changed to %s while %s was being obtained from %s: not serving it",
                     self.ca, name, ca)
            return
        if not stored:
            self._unstored[name] = unstored
        state.failures = 0
        state.next_attempt = 0.0
        state.last_error = ""
        state.renew_requested = False
        state.last_success_at = time.time()
        await self._save_state(name, state)
        try:
            await self.storage.delete(layout.renew_request_key(self.issuer_key, name))
        except StorageError:
            pass
        await self._publish(cert)

    async def _store_issued(self, name: str, c: _Unstored, first_try: bool) -> bool:
        """Store an obtained certificate (an unusable one stored before is kept aside first)."""
        ikey = c.issuer_key
        try:
            await self._keep_aside_unusable(ikey, name)
            # key first, certificate last: a reader that sees the certificate finds its key
            await self.storage.store(layout.private_key_key(ikey, name), c.key_pem, private=True)
            await self.storage.store(layout.meta_key(ikey, name), c.meta)
            await self.storage.store(layout.cert_key(ikey, name), c.chain_pem)
            return True
        except StorageError as e:
            metrics.inc("autocert_proxy_storage_errors_total", op="store")
            if first_try:
                log.error("autocert: certificate for %s obtained but not stored (%s); serving it from "
                          "memory and storing it at the next checks", name, e)
            return False

    async def _keep_aside_unusable(self, ikey: str, name: str) -> None:
        """Copy a stored certificate that cannot be used (unreadable, or not matching its key)
        to ``<file>.unusable-<time>`` before a new one replaces it: it is evidence, not ours to lose."""
        keys = (layout.cert_key(ikey, name), layout.private_key_key(ikey, name), layout.meta_key(ikey, name))
        found: dict[str, bytes] = {}
        for k in keys:
            try:
                found[k] = await self.storage.load(k)
            except NotFound:
                pass
        if keys[0] not in found:
            return
        try:
            stored_certificate(found[keys[0]], found.get(keys[1], b""), ikey, name)
            return
        except CertificateProblem as e:
            why = e
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        for k, data in found.items():
            await self.storage.store(f"{k}.unusable-{stamp}", data, private=k == keys[1])
        log.warning("autocert: the stored certificate for %s was unusable (%s); kept aside as %s.unusable-%s",
                    name, why, keys[0], stamp)

    async def _store_later(self, name: str, c: _Unstored) -> None:
        """Store a certificate that is served from memory since storing it failed."""
        served = self.cache.managed(name)
        if c.issuer_key != self.issuer_key or served is None or served.leaf.serial_number != c.serial:
            del self._unstored[name]   # replaced since (renewed, another instance's, another CA)
            return
        lock = layout.lock_name(name)
        try:
            await self.storage.lock(lock)
        except StorageError:
            return   # the store is still down: the next check tries again
        try:
            try:
                other = await load_stored_certificate(self.storage, c.issuer_key, name)
            except (NotFound, CertificateProblem):
                other = None
            if other is not None and other.leaf.serial_number != c.serial and other.covers(name) \
                    and not other.expired():
                del self._unstored[name]   # another instance stored one meanwhile: it stays
                await self._sync_from_storage(name)
                return
            if await self._store_issued(name, c, first_try=False):
                del self._unstored[name]
                log.info("autocert: certificate for %s stored in %s (it was served from memory until now)",
                         name, self.storage.describe())
                if name in self._states:
                    await self._save_state(name, self._states[name])
        except StorageError:
            return
        finally:
            try:
                await self.storage.unlock(lock)
            except StorageError:
                pass

    async def _in_thread(self, name: str, fn, *args):
        """``fn(*args)`` in a worker thread, tracked until the thread ends (not only until the
        awaiting task is cancelled), so that ``stop`` can wait for its clean-up."""
        fut = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        self._orders[fut] = name
        fut.add_done_callback(self._order_done)
        return await asyncio.shield(fut)

    def _order_done(self, fut: asyncio.Future) -> None:
        self._orders.pop(fut, None)
        if not fut.cancelled():
            fut.exception()   # retrieved here: its task may have been cancelled at shutdown

    async def _failed(self, name: str, state: NameState, error: str, retry_after: Optional[float]) -> None:
        state.failures += 1
        state.last_error = error
        state.last_error_at = time.time()
        try:
            delay = retry_delay(state.failures, base=self.retry_base, retry_after=retry_after)
        except Exception:   # without a next attempt the name would be retried at every check
            log.exception("autocert: computing the retry delay for %s failed; waiting the cap", name)
            delay = DEFAULT_RETRY_CAP
        state.next_attempt = time.time() + delay
        metrics.inc("autocert_proxy_acme_orders_total", result="failed")
        log.error("autocert: obtaining a certificate for %s failed (attempt %d); next attempt in %.0fs: %s",
                  name, state.failures, delay, error)
        await self._save_state(name, state)

    async def _publish(self, cert: Certificate) -> None:
        if self.before_publish is not None:
            try:
                await self.before_publish(cert)
            except Exception as e:
                log.error("autocert: certificate for %s not served: %s", ", ".join(cert.names), e)
                return
        self.cache.put_managed(cert)
        for n in cert.names:
            self._missing.discard(n)

    # ------------------------------------------------------------------ storage
    async def _sync_from_storage(self, name: str) -> Optional[Certificate]:
        """Load the stored certificate for ``name`` and serve it if newer than what we have."""
        try:
            cert = await load_stored_certificate(self.storage, self.issuer_key, name)
        except NotFound:
            return None
        except StorageError as e:
            metrics.inc("autocert_proxy_storage_errors_total", op="load")
            log.warning("autocert: reading the certificate for %s from %s failed: %s", name, self.storage.describe(), e)
            return None
        except CertificateProblem as e:
            log.error("autocert: the stored certificate for %s is unusable (%s); a new one will be obtained", name, e)
            return None
        if not cert.covers(name) or cert.expired():
            return None
        current = self.cache.managed(name)
        if current is None or cert.not_after > current.not_after or (
                current.leaf.serial_number != cert.leaf.serial_number and cert.not_before > current.not_before):
            await self._publish(cert)
            return cert
        return current

    async def _load_state(self, name: str) -> NameState:
        try:
            return NameState.from_json(await self.storage.load(layout.state_key(self.issuer_key, name)))
        except (NotFound, StorageError):
            return NameState()

    async def _save_state(self, name: str, state: NameState) -> None:
        self._states[name] = state
        try:
            await self.storage.store(layout.state_key(self.issuer_key, name), state.to_json())
        except StorageError as e:
            metrics.inc("autocert_proxy_storage_errors_total", op="store")
            log.warning("autocert: saving the retry state for %s failed: %s", name, e)

    async def _get_issuer(self, forget: Optional[AcmeIssuer] = None
                          ) -> tuple[AcmeIssuer, dict[str, AcmeIssuer], IssuerSettings]:
        """The account's issuer, one issuer per challenge type, and the settings they were built with.
        ``forget``: an issuer whose account the CA no longer knows; if still current, the account
        is looked up (and registered again) as at the first order."""
        async with self._issuer_lock:
            settings = self.settings
            if forget is not None and forget in self._by_type.values():
                self._issuer = None
            if self._issuer is not None and self._issuer_settings == settings:
                return self._issuer, self._by_type, settings
            email = settings.email
            ikey = issuer_id(settings.directory_url)
            kkey = layout.account_key_key(ikey, email)
            rkey = layout.account_reg_key(ikey, email)

            async def load(k):
                try:
                    return await self.storage.load(k)
                except NotFound:
                    return None

            async with self.storage.locked(f"account_{ikey}"):
                key_pem, reg = await load(kkey), await load(rkey)
                issuer = AcmeIssuer(settings, key_pem, reg, abort=self._stopping)
                new_key, new_reg = await asyncio.to_thread(issuer.account)
                if new_key != key_pem:
                    await self.storage.store(kkey, new_key, private=True)
                if new_reg != reg:
                    await self.storage.store(rkey, new_reg)
            # One issuer per challenge type, all on the same account.
            by_type = {t: AcmeIssuer(dataclasses.replace(settings, challenge_types=(t,)), new_key, new_reg,
                                    account_confirmed=True, directory=issuer.directory(),
                                    abort=self._stopping)
                       for t in settings.challenge_types}
            if self.settings == settings:   # not reconfigured meanwhile
                self._issuer, self._by_type, self._issuer_settings = issuer, by_type, settings
            return issuer, by_type, settings

    async def _refresh_ari(self, cert: Certificate) -> None:
        """Ask the CA for the certificate's renewal window when the last answer is due again
        (schedule.next_ari_poll: Retry-After honoured, at least twice a day)."""
        serial = cert.leaf.serial_number
        now = dt.datetime.now(dt.timezone.utc)
        known = self._ari.get(serial)
        if known is not None and now < known[1]:
            return
        if self._issuer is None and self._ari_reader is None:
            self._ari_reader = AcmeIssuer(self.settings, abort=self._stopping)
        reader = self._issuer or self._ari_reader
        try:
            info = await asyncio.to_thread(reader.renewal_info, cert.chain_pem)
        except AcmeError as e:
            log.warning("autocert: renewal information for %s: %s", ", ".join(cert.names), e)
            self._ari[serial] = (known[0] if known else None, next_ari_poll(now, e.retry_after, failed=True))
            return
        window = (info[0], info[1]) if info else None
        self._ari[serial] = (window, next_ari_poll(now, info[2] if info else None))
        if known is None or known[0] != window:
            for n in cert.names:
                try:
                    await self.storage.store(layout.ari_key(self.issuer_key, n), ari_record(serial, window))
                except StorageError as e:
                    log.debug("autocert: storing the renewal window of %s failed: %s", n, e)
        if window is not None and (known is None or known[0] != window):
            plan = self.renewal_plan(cert, now)
            log.info("autocert: %s: the CA suggests renewal between %s and %s; renewing at %s (%s)",
                     ", ".join(cert.names), window[0].isoformat(), window[1].isoformat(),
                     plan.at.isoformat(), plan.source)

    # ------------------------------------------------------------------ challenges (issuer thread)
    def _wait_on_loop(self, coro, doing: str) -> None:
        """Run ``coro`` on the event loop from the issuer thread and wait for it (15 s at most);
        a failure is logged, not raised: this instance still answers its own challenges."""
        if self._closed:
            # the loop is going away; a stale challenge record is harmless (readers check the token)
            coro.close()
            log.debug("autocert: %s skipped at shutdown", doing)
            return
        try:
            asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=15)
        except Exception as e:
            log.warning("autocert: %s failed: %s", doing, e)

    def _present(self, ch: Challenge) -> None:
        self.challenges.present(ch)
        self._wait_on_loop(self.storage.store(storage_key(ch, self.issuer_key), ch.to_json()),
                           f"storing the {ch.type} challenge for {ch.domain}")

    def _cleanup(self, ch: Challenge) -> None:
        self.challenges.remove(ch)

        async def forget():
            try:
                await self.storage.delete(storage_key(ch, self.issuer_key))
            except StorageError:
                pass
        # Waited for: the record is keyed by name, and a delete landing after the next
        # challenge's write (TLS-ALPN-01 failed, HTTP-01 next) would hide that challenge
        # from the other instances.
        self._wait_on_loop(forget(), f"removing the {ch.type} challenge for {ch.domain} from storage")

    # ------------------------------------------------------------------ status
    async def status(self) -> list[dict]:
        out = []
        for n in wanted_names(self.options, self.cache):
            st = self._states.get(n) or await self._load_state(n)
            cert = self.cache.managed(n)
            out.append({"name": n, "state": st, "cert": cert})
        return out
