"""OCSP stapling: fetch, verify, refresh and persist OCSP responses for cached certificates.

Pure parts (no I/O, tested without sockets): ``ocsp_url``, ``build_request``,
``verify_response``, ``refresh_at``, ``backoff_delay``, ``storage_key``.
I/O parts: ``fetch`` (HTTP POST, GET on 405) and ``Stapler`` (the background loop).

The handshake path never waits on anything here: the TLS engine's status callback only
reads ``Certificate.ocsp_staple``, which the stapler sets to a verified "good" DER
OCSPResponse or to None. What the stapler does, following certmagic:

- refresh at half of a response's validity window (jittered); on failure keep the last
  good staple until its nextUpdate, then drop it; retry with exponential backoff;
- staple only "good"; "revoked" marks the certificate revoked, drops the staple, logs an
  ERROR and calls ``on_revoked`` (autocert renews with a new key). Revocation is treated
  as final: a revoked certificate is not asked about again;
- persist good responses under ``ocsp/<first-name>-<16 hex of sha256(leaf DER)>`` and
  reuse a persisted one (verified again) instead of asking the responder at start-up;
- a certificate without an OCSP URL is not an error (short-lived certificates, Let's
  Encrypt since 2025): no request, one DEBUG line.

A response without nextUpdate ("newer information is always available") is treated as
valid for ``DEFAULT_VALIDITY`` (1 h) after its thisUpdate, so it is refreshed every ~30 min
and never stapled for longer than that hour.
"""
from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import inspect
import logging
import math
import random
import re
import urllib.parse
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, SignatureAlgorithmOID

from .. import metrics
from .certcache import Certificate, aia_ocsp_url

log = logging.getLogger(__name__)

CLOCK_SKEW = dt.timedelta(minutes=5)          # tolerated for thisUpdate in the future
DEFAULT_VALIDITY = dt.timedelta(hours=1)      # for responses without nextUpdate
MAX_RESPONSE_BYTES = 64 * 1024
GET_MAX_ENCODED = 255                         # RFC 5019: GET only for small requests
DEFAULT_TIMEOUT = 10.0
PRIMED_GRACE = 600.0                          # s a primed, not yet cached cert stays known

GOOD, REVOKED, UNKNOWN = "good", "revoked", "unknown"


class OCSPError(Exception):
    """Base class: something went wrong getting a usable OCSP response."""


class OCSPInvalid(OCSPError):
    """A response that must not be used. ``reason`` says why, in words for a log line."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class OCSPFetchError(OCSPError):
    """The responder could not be reached or answered with an HTTP error / oversized body."""


class StapleRequired(OCSPError):
    """A must-staple certificate for which no valid "good" response could be obtained."""


@dataclass(frozen=True)
class OCSPResult:
    status: str                                  # GOOD | REVOKED | UNKNOWN
    this_update: dt.datetime
    next_update: dt.datetime                     # assumed this_update + 1 h when absent
    revocation_time: Optional[dt.datetime] = None
    next_update_assumed: bool = False


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# ----------------------------------------------------------------------------- pure parts

def ocsp_url(cert: x509.Certificate) -> Optional[str]:
    """The first http(s) OCSP responder URL in the certificate's AIA extension, or None."""
    try:
        aia = cert.extensions.get_extension_for_oid(ExtensionOID.AUTHORITY_INFORMATION_ACCESS)
    except (x509.ExtensionNotFound, ValueError):
        return None
    return aia_ocsp_url(aia.value)


def issuer_of(cert: Certificate) -> Optional[x509.Certificate]:
    """The issuer of the leaf: the chain's second certificate, if it really issued the leaf."""
    if len(cert.chain) < 2:
        return None
    issuer = cert.chain[1]
    if issuer.subject != cert.leaf.issuer:
        return None
    return issuer


def build_request(leaf: x509.Certificate, issuer: x509.Certificate,
                  algorithm: hashes.HashAlgorithm = hashes.SHA1()) -> bytes:
    """DER OCSPRequest for one certificate (SHA-1 cert ID: what responders expect; no nonce,
    so responders may answer from cache)."""
    return (ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, algorithm)
            .build().public_bytes(serialization.Encoding.DER))


def _cert_id(leaf: x509.Certificate, issuer: x509.Certificate,
             algorithm: hashes.HashAlgorithm) -> tuple[int, bytes, bytes]:
    req = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, algorithm).build()
    return req.serial_number, req.issuer_name_hash, req.issuer_key_hash


# DER contents of the hash OIDs RSASSA-PSS parameters name (RFC 4055), and of id-mgf1
_PSS_HASHES = {
    bytes.fromhex("2b0e03021a"): hashes.SHA1,
    bytes.fromhex("608648016503040204"): hashes.SHA224,
    bytes.fromhex("608648016503040201"): hashes.SHA256,
    bytes.fromhex("608648016503040202"): hashes.SHA384,
    bytes.fromhex("608648016503040203"): hashes.SHA512,
}
_MGF1 = bytes.fromhex("2a864886f70d010108")


def _der(data: bytes, i: int, end: int) -> tuple[int, int, int]:
    """(tag, start, end) of the value of the DER element at ``i``, which must end by ``end``."""
    if i + 2 > end:
        raise ValueError("truncated DER")
    tag, n, i = data[i], data[i + 1], i + 2
    if n & 0x80:
        k = n & 0x7F
        if not 0 < k <= 4 or i + k > end:
            raise ValueError("bad DER length")
        n, i = int.from_bytes(data[i:i + k], "big"), i + k
    if i + n > end:
        raise ValueError("truncated DER")
    return tag, i, i + n


def _der_children(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    while start < end:
        out.append(_der(data, start, end))
        start = out[-1][2]
    return out


def _der_hash(data: bytes, start: int, end: int) -> hashes.HashAlgorithm:
    """The hash an AlgorithmIdentifier (the SEQUENCE's contents at start..end) names."""
    kids = _der_children(data, start, end)
    if not kids or kids[0][0] != 0x06 or data[kids[0][1]:kids[0][2]] not in _PSS_HASHES:
        raise ValueError("unknown hash algorithm")
    return _PSS_HASHES[data[kids[0][1]:kids[0][2]]]()


def pss_parameters(der: bytes, tbs: bytes) -> tuple[hashes.HashAlgorithm, hashes.HashAlgorithm, int]:
    """(hash, MGF1 hash, salt length) of an RSASSA-PSS signed OCSP response, read from the
    signatureAlgorithm that follows ``tbs`` (cryptography does not parse them for OCSP).
    Absent fields take RFC 4055's defaults (SHA-1, MGF1 with SHA-1, 20). ValueError if malformed."""
    at = der.find(tbs)
    if at < 0:
        raise ValueError("no tbsResponseData")
    tag, start, end = _der(der, at + len(tbs), len(der))
    kids = _der_children(der, start, end) if tag == 0x30 else []
    if not kids or kids[0][0] != 0x06:
        raise ValueError("no signatureAlgorithm")
    hash_alg, mgf_hash, salt = hashes.SHA1(), hashes.SHA1(), 20
    if len(kids) > 1 and kids[1][0] == 0x30:
        for tag, vs, ve in _der_children(der, kids[1][1], kids[1][2]):
            inner = _der(der, vs, ve)                   # [n] EXPLICIT: one element inside
            if tag == 0xA0 and inner[0] == 0x30:
                hash_alg = _der_hash(der, inner[1], inner[2])
            elif tag == 0xA1 and inner[0] == 0x30:
                mgf = _der_children(der, inner[1], inner[2])
                if len(mgf) != 2 or der[mgf[0][1]:mgf[0][2]] != _MGF1 or mgf[1][0] != 0x30:
                    raise ValueError("mask generation is not MGF1")
                mgf_hash = _der_hash(der, mgf[1][1], mgf[1][2])
            elif tag == 0xA2 and inner[0] == 0x02 and 0 < inner[2] - inner[1] <= 4:
                salt = int.from_bytes(der[inner[1]:inner[2]], "big", signed=True)
    if salt < 0:
        raise ValueError("negative salt length")
    return hash_alg, mgf_hash, salt


def _verify_signature(public_key, signature: bytes, data: bytes,
                      hash_alg: Optional[hashes.HashAlgorithm], sig_oid,
                      pss: Optional[tuple[hashes.HashAlgorithm, hashes.HashAlgorithm, int]] = None) -> None:
    """Raise InvalidSignature (or UnsupportedAlgorithm / TypeError) unless it verifies."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(signature, data, ec.ECDSA(hash_alg))
    elif isinstance(public_key, rsa.RSAPublicKey):
        if sig_oid == SignatureAlgorithmOID.RSASSA_PSS:
            if pss is None:
                raise InvalidSignature("RSASSA-PSS without its parameters")
            pss_hash, mgf_hash, salt = pss
            public_key.verify(signature, data, padding.PSS(padding.MGF1(mgf_hash), salt), pss_hash)
        else:
            public_key.verify(signature, data, padding.PKCS1v15(), hash_alg)
    elif isinstance(public_key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        public_key.verify(signature, data)
    elif isinstance(public_key, dsa.DSAPublicKey):
        public_key.verify(signature, data, hash_alg)
    else:
        raise UnsupportedAlgorithm(f"unsupported key type {type(public_key).__name__}")


def _signed_by(resp: ocsp.OCSPResponse, cert: x509.Certificate, der: bytes) -> bool:
    try:
        hash_alg = resp.signature_hash_algorithm
    except UnsupportedAlgorithm:   # RSASSA-PSS among others: its hash is in its parameters
        hash_alg = None
    try:
        pss = None
        if resp.signature_algorithm_oid == SignatureAlgorithmOID.RSASSA_PSS:
            pss = pss_parameters(der, resp.tbs_response_bytes)
        _verify_signature(cert.public_key(), resp.signature, resp.tbs_response_bytes, hash_alg,
                          resp.signature_algorithm_oid, pss)
        return True
    except (InvalidSignature, UnsupportedAlgorithm, TypeError, ValueError):
        return False


def _subject(cert: x509.Certificate) -> str:
    try:
        return repr(cert.subject.rfc4514_string())
    except Exception:   # a malformed subject in a peer-supplied certificate
        return "<unparseable subject>"


def _delegation_problem(responder: x509.Certificate, issuer: x509.Certificate,
                        now: dt.datetime) -> Optional[str]:
    """Why ``responder`` may not sign responses for ``issuer``'s certificates (None: it may)."""
    try:
        responder.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return f"responder certificate {_subject(responder)} is not issued by the issuer"
    try:
        eku = responder.extensions.get_extension_for_oid(ExtensionOID.EXTENDED_KEY_USAGE).value
    except (x509.ExtensionNotFound, ValueError):
        eku = []
    if ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
        return (f"responder certificate {_subject(responder)} "
                "lacks the id-kp-OCSPSigning extended key usage")
    if not (responder.not_valid_before_utc - CLOCK_SKEW <= now <= responder.not_valid_after_utc):
        return f"responder certificate {_subject(responder)} is not valid now"
    return None


def verify_response(der: bytes, leaf: x509.Certificate, issuer: x509.Certificate,
                    now: Optional[dt.datetime] = None) -> OCSPResult:
    """Check a DER OCSPResponse for ``leaf``; return its status or raise ``OCSPInvalid``.

    Checks: a successful response; a single response whose cert ID (serial, issuer name
    hash, issuer key hash) is the leaf's; signed by the issuer or by a delegated responder
    certificate that the issuer signed and that has id-kp-OCSPSigning; thisUpdate not in
    the future (beyond CLOCK_SKEW); nextUpdate not passed (absent: DEFAULT_VALIDITY).
    """
    now = now or _utcnow()
    try:
        return _verify(der, leaf, issuer, now)
    except OCSPInvalid:
        raise
    except Exception as e:   # cryptography parses lazily: a bad field can surface anywhere
        raise OCSPInvalid(f"malformed OCSP response ({type(e).__name__}: {e})") from None


def _verify(der: bytes, leaf: x509.Certificate, issuer: x509.Certificate,
            now: dt.datetime) -> OCSPResult:
    try:
        resp = ocsp.load_der_ocsp_response(der)
    except Exception as e:   # any parse failure of peer bytes is "invalid", never a crash
        raise OCSPInvalid(f"not a DER OCSP response ({type(e).__name__}: {e})") from None
    if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise OCSPInvalid(f"responder answered {resp.response_status.name}")

    single = _matching_single_response(resp, leaf, issuer)
    responders = list(resp.certificates)

    # Signature: the issuer itself, or a delegated responder certificate it authorised.
    if not _signed_by(resp, issuer, der):
        problems = []
        for rc in responders:
            problem = _delegation_problem(rc, issuer, now)
            if problem is None and _signed_by(resp, rc, der):
                break
            problems.append(problem or
                            f"signature does not verify with {_subject(rc)}")
        else:
            detail = "; ".join(problems) if problems else "no responder certificate included"
            raise OCSPInvalid(f"response not signed by the issuer or an authorised responder ({detail})")

    this_update = single.this_update_utc
    next_update = single.next_update_utc
    assumed = False
    if this_update > now + CLOCK_SKEW:
        raise OCSPInvalid(f"thisUpdate {this_update.isoformat()} is in the future")
    if next_update is None:
        next_update, assumed = this_update + DEFAULT_VALIDITY, True
    if next_update <= this_update:
        raise OCSPInvalid(f"nextUpdate {next_update.isoformat()} is not after thisUpdate")
    if now >= next_update:
        raise OCSPInvalid(f"expired: nextUpdate {next_update.isoformat()}"
                          + (" (assumed: no nextUpdate)" if assumed else "") + " has passed")

    st = single.certificate_status
    status = {ocsp.OCSPCertStatus.GOOD: GOOD, ocsp.OCSPCertStatus.REVOKED: REVOKED}.get(st, UNKNOWN)
    rev = single.revocation_time_utc if status == REVOKED else None
    return OCSPResult(status, this_update, next_update, rev, assumed)


def _matching_single_response(resp: ocsp.OCSPResponse, leaf: x509.Certificate,
                              issuer: x509.Certificate):
    ids: dict[str, tuple[int, bytes, bytes]] = {}
    seen = []
    for single in resp.responses:
        try:
            alg = single.hash_algorithm
        except UnsupportedAlgorithm:
            continue
        if alg.name not in ids:
            try:
                ids[alg.name] = _cert_id(leaf, issuer, alg)
            except (ValueError, UnsupportedAlgorithm):
                continue
        if (single.serial_number, single.issuer_name_hash, single.issuer_key_hash) == ids[alg.name]:
            return single
        seen.append(format(single.serial_number, "x"))
    raise OCSPInvalid(
        f"no response for this certificate (serial {leaf.serial_number:x}) and issuer; "
        f"response is about serial(s) {', '.join(seen) or 'none'}")


def refresh_at(result: OCSPResult, now: Optional[dt.datetime] = None,
               rng: Optional[random.Random] = None) -> dt.datetime:
    """When to fetch again: half-way through the validity window, +-5 % of it as jitter
    (so many certificates from one CA don't all ask at once); never before ``now``."""
    now = now or _utcnow()
    window = result.next_update - result.this_update
    r = (rng or random).uniform(-0.05, 0.05)
    at = result.this_update + window / 2 + window * r
    return max(at, now)


def backoff_delay(failures: int, base: float = 30.0, cap: float = 3600.0,
                  rng: Optional[random.Random] = None) -> float:
    """Seconds before retry number ``failures`` (1-based): base * 2^(n-1), capped, with
    +-20 % jitter."""
    d = min(cap, base * (2 ** max(0, min(failures - 1, 40))))
    return d * (rng or random).uniform(0.8, 1.2)


_UNSAFE = re.compile(r"[^a-z0-9._-]")


def storage_key(cert: Certificate) -> str:
    """``ocsp/<first-name>-<first 16 hex of sha256(leaf DER)>`` (certmagic-like layout)."""
    name = cert.names[0] if cert.names else "unnamed"
    name = _UNSAFE.sub("_", name.lower().replace("*", "wildcard_"))
    digest = hashlib.sha256(cert.leaf.public_bytes(serialization.Encoding.DER)).hexdigest()[:16]
    return f"ocsp/{name}-{digest}"


# ----------------------------------------------------------------------------- I/O

async def fetch(url: str, request_der: bytes, timeout: float = DEFAULT_TIMEOUT, *,
                session=None, max_bytes: int = MAX_RESPONSE_BYTES) -> bytes:
    """POST the request to the responder; on 405 retry as GET (RFC 6960 A.1) if small.

    Returns the body bytes (unverified). Raises ``OCSPFetchError`` on connection errors,
    timeouts, non-200 answers and bodies larger than ``max_bytes``.
    """
    import aiohttp

    own = session is None
    if own:
        session = aiohttp.ClientSession()
    ctimeout = aiohttp.ClientTimeout(total=timeout)
    try:
        try:
            status, body = await _http(session, "POST", url, request_der, ctimeout, max_bytes)
            if status == 405:
                encoded = urllib.parse.quote(base64.b64encode(request_der).decode(), safe="")
                if len(encoded) < GET_MAX_ENCODED:
                    get_url = url.rstrip("/") + "/" + encoded
                    status, body = await _http(session, "GET", get_url, None, ctimeout, max_bytes)
        except asyncio.TimeoutError:
            raise OCSPFetchError(f"OCSP responder {url} did not answer within {timeout:g} s") from None
        except aiohttp.ClientError as e:
            raise OCSPFetchError(f"OCSP responder {url} unreachable: {type(e).__name__}: {e}") from None
        except OSError as e:
            raise OCSPFetchError(f"OCSP responder {url} unreachable: {e}") from None
        if status != 200:
            raise OCSPFetchError(f"OCSP responder {url} answered HTTP {status}")
        return body
    finally:
        if own:
            await session.close()


async def _http(session, method: str, url: str, data: Optional[bytes], timeout,
                max_bytes: int) -> tuple[int, bytes]:
    headers = {"Accept": "application/ocsp-response"}
    if data is not None:
        headers["Content-Type"] = "application/ocsp-request"
    async with session.request(method, url, data=data, headers=headers, timeout=timeout,
                               max_redirects=3) as r:
        if r.status != 200:
            return r.status, b""
        # Read to the end, bounded: one read() returns what has arrived so far, which could
        # cut a large body short (a truncated response, or an oversized one let through).
        body = bytearray()
        async for chunk in r.content.iter_any():
            body += chunk
            if len(body) > max_bytes:
                raise OCSPFetchError(f"OCSP responder {url} sent more than {max_bytes} bytes")
        return r.status, bytes(body)


# ----------------------------------------------------------------------------- stapler

@dataclass(eq=False)
class _State:
    url: Optional[str]
    issuer: Optional[x509.Certificate]
    key: str
    result: Optional[OCSPResult] = None        # of the staple currently held (good only)
    last_status: Optional[str] = None          # last verified status seen (good/revoked/unknown)
    next_attempt: Optional[dt.datetime] = None  # None: at once
    failures: int = 0
    last_error: Optional[str] = None
    last_error_at: Optional[dt.datetime] = None
    last_fetch_at: Optional[dt.datetime] = None
    storage_checked: bool = False
    seen_in_cache: bool = False                # primed certs are kept until they appear
    created: float = 0.0                       # loop time, to forget primed-but-never-cached
    lock: Optional[asyncio.Lock] = None
    task: Optional[asyncio.Task] = None


Fetcher = Callable[[str, bytes, float], Awaitable[bytes]]


class Stapler:
    """Keeps ``ocsp_staple`` of every certificate in ``cache`` fresh. See the module doc.

    ``clock`` returns an aware UTC datetime (tests move it forward); the loop itself sleeps
    ``poll_interval`` real seconds between looks at ``cache.all()``. ``fetcher`` is
    ``fetch``-compatible (tests wrap the real one to count requests).
    """

    def __init__(self, cache, storage=None, *,
                 on_revoked: Optional[Callable[[Certificate], object]] = None,
                 clock: Callable[[], dt.datetime] = _utcnow,
                 poll_interval: float = 5.0,
                 timeout: float = DEFAULT_TIMEOUT,
                 backoff_base: float = 30.0,
                 backoff_max: float = 3600.0,
                 concurrency: int = 8,
                 fetcher: Optional[Fetcher] = None,
                 rng: Optional[random.Random] = None):
        self.cache = cache
        self.storage = storage
        self.on_revoked = on_revoked
        self.clock = clock
        self.poll_interval = poll_interval
        self.timeout = timeout
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._sem = asyncio.Semaphore(concurrency)
        self._fetcher = fetcher
        self._rng = rng or random.Random()
        self._states: dict[Certificate, _State] = {}
        # what the last full look at the cache found: the cache's version then, and the
        # certificates that can be stapled (a tick between changes looks at these alone: with
        # 10,000 certificates and no OCSP URL, at none); the next full look is due when the
        # version changes, or when a primed certificate's grace ends (``_rescan_at``)
        self._seen_version: Optional[int] = None
        self._rescan_at = math.inf
        self._stapleable: list[tuple[Certificate, _State]] = []
        self._session = None
        self._stopping = False

    # --- public API ---
    async def run(self) -> None:
        """Loop until cancelled or ``close()``: look at the cache every ``poll_interval``."""
        try:
            while not self._stopping:
                try:
                    self._tick()
                except Exception:   # a bug here must not end stapling for everyone
                    log.exception("OCSP stapler: unexpected error while scheduling")
                await asyncio.sleep(self.poll_interval)
        finally:
            await self._cancel_tasks()

    async def prime(self, cert: Certificate) -> None:
        """Get a valid staple for ``cert`` now (persisted one first, else the responder).

        Raises ``StapleRequired`` for a must-staple certificate that ends up without a
        valid "good" staple; for other certificates this is best effort and never raises.
        """
        st = self._state(cert)
        if st.url is not None and st.issuer is not None and not cert.revoked:
            await self._update(cert, st, force=cert.ocsp_staple is None)
        if cert.must_staple and cert.ocsp_staple is None:
            raise StapleRequired(self._staple_required_message(cert, st))

    async def refresh(self, cert: Certificate) -> None:
        """Ask the responder now, whatever the schedule (for an operator command)."""
        st = self._state(cert)
        if st.url is not None and st.issuer is not None and not cert.revoked:
            await self._update(cert, st, force=True)

    def status(self, cert: Certificate) -> dict:
        """For the ``certs`` command: staple status, next update, next refresh, last error."""
        st = self._states.get(cert) or self._new_state(cert)
        iso = lambda d: d.isoformat() if d else None   # noqa: E731
        if st.url is None:
            staple = "no OCSP URL"
        elif st.issuer is None:
            staple = "no issuer in chain"
        elif cert.revoked:
            staple = "revoked"
        elif cert.ocsp_staple is not None:
            staple = "good"
        elif st.last_status == UNKNOWN:
            staple = "unknown to responder"
        else:
            staple = "none"
        return {
            "ocsp_url": st.url,
            "staple": staple,
            "must_staple": cert.must_staple,
            "this_update": iso(st.result.this_update) if st.result and cert.ocsp_staple else None,
            "next_update": iso(st.result.next_update) if st.result and cert.ocsp_staple else None,
            "next_refresh": iso(st.next_attempt) if st.url and st.issuer and not cert.revoked else None,
            "last_fetch": iso(st.last_fetch_at),
            "failures": st.failures,
            "last_error": st.last_error,
            "last_error_at": iso(st.last_error_at),
        }

    async def close(self) -> None:
        self._stopping = True
        await self._cancel_tasks()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- internals ---
    def _new_state(self, cert: Certificate) -> _State:
        url, issuer = cert.ocsp_url, issuer_of(cert)   # computed once with the certificate
        # the storage key (a hash of the leaf) only for certificates that can be stapled:
        # the first tick makes a state for every certificate, thousands at start
        key = storage_key(cert) if url is not None and issuer is not None else ""
        return _State(url=url, issuer=issuer, key=key)

    def _state(self, cert: Certificate) -> _State:
        st = self._states.get(cert)
        if st is None:
            st = self._states[cert] = self._new_state(cert)
            st.lock = asyncio.Lock()
            st.created = asyncio.get_running_loop().time()
            # (one made outside a full look, by prime: forgotten then if the cache never has it)
            self._rescan_at = min(self._rescan_at, st.created + PRIMED_GRACE)
            names = ",".join(cert.names)
            if st.url is None:
                log.debug("OCSP: %s has no OCSP responder URL; not stapling", names)
            elif st.issuer is None:
                log.warning("OCSP: %s has an OCSP URL (%s) but its chain has no issuer "
                            "certificate; cannot staple (add the intermediate to the chain)",
                            names, st.url)
        return st

    def _staple_required_message(self, cert: Certificate, st: _State) -> str:
        names = ", ".join(cert.names)
        if st.url is None:
            why = "it has no OCSP responder URL"
        elif st.issuer is None:
            why = "its chain has no issuer certificate to build an OCSP request"
        elif cert.revoked:
            why = f"responder {st.url} says it is REVOKED"
        else:
            why = f"no valid 'good' OCSP response from {st.url}: {st.last_error or 'no answer'}"
        return (f"certificate for {names} (serial {cert.leaf.serial_number:x}) is must-staple "
                f"but cannot be stapled: {why}; not serving it")

    def _rescan(self) -> None:
        """A full look at the cache: states for new certificates, none for those gone."""
        version = self.cache.version   # (before the look: a change during it brings another)
        current = self.cache.all()
        alive = set(current)
        loop_now = asyncio.get_running_loop().time()
        for gone, st in list(self._states.items()):
            if gone in alive:
                continue
            # a certificate primed before it is put into the cache keeps its state (and
            # fresh staple schedule) for a while; one that left the cache is forgotten
            if st.seen_in_cache or loop_now - st.created > PRIMED_GRACE:
                del self._states[gone]
                if st.task is not None and not st.task.done():
                    st.task.cancel()
        stapleable = []
        for cert in current:
            st = self._state(cert)
            st.seen_in_cache = True
            if st.url is not None and st.issuer is not None:
                stapleable.append((cert, st))
        self._stapleable = stapleable
        self._seen_version = version
        primed = [st.created for st in self._states.values() if not st.seen_in_cache]
        self._rescan_at = min(primed) + PRIMED_GRACE if primed else math.inf

    def _tick(self) -> None:
        now = self.clock()
        if self._seen_version != self.cache.version \
                or asyncio.get_running_loop().time() > self._rescan_at:
            self._rescan()
        for cert, st in self._stapleable:
            if cert.revoked:
                continue
            self._drop_if_expired(cert, st, now)
            if st.task is not None and not st.task.done():
                continue
            if st.next_attempt is None or now >= st.next_attempt:
                st.task = asyncio.get_running_loop().create_task(
                    self._update(cert, st, force=False))

    def _drop_if_expired(self, cert: Certificate, st: _State, now: dt.datetime) -> None:
        if cert.ocsp_staple is not None and st.result is not None and now >= st.result.next_update:
            log.warning("OCSP: staple for %s expired at %s and could not be refreshed "
                        "(last error: %s); no longer stapling", ",".join(cert.names),
                        st.result.next_update.isoformat(), st.last_error)
            cert.ocsp_staple = None
            st.result = None

    async def _update(self, cert: Certificate, st: _State, force: bool) -> None:
        async with st.lock:
            if cert.revoked:
                return
            now = self.clock()
            if not force and st.next_attempt is not None and now < st.next_attempt:
                return   # someone else (prime) refreshed while we waited for the lock
            if not st.storage_checked and cert.ocsp_staple is None:
                st.storage_checked = True
                if await self._load_persisted(cert, st):
                    return
            try:
                async with self._sem:
                    der = await self._fetch(st.url, build_request(cert.leaf, st.issuer))
                st.last_fetch_at = self.clock()
                result = verify_response(der, cert.leaf, st.issuer, self.clock())
            except OCSPError as e:
                self._failed(cert, st, str(e))
                return
            except Exception as e:   # never let one certificate's surprise end the loop
                log.exception("OCSP: unexpected error for %s", ",".join(cert.names))
                self._failed(cert, st, f"{type(e).__name__}: {e}")
                return
            await self._accept(cert, st, der, result, persist=True)

    async def _fetch(self, url: str, req: bytes) -> bytes:
        if self._fetcher is not None:
            return await self._fetcher(url, req, self.timeout)
        if self._session is None:
            import aiohttp
            self._session = aiohttp.ClientSession()
        return await fetch(url, req, self.timeout, session=self._session)

    async def _load_persisted(self, cert: Certificate, st: _State) -> bool:
        if self.storage is None:
            return False
        from ..storage.base import NotFound   # local: keep tls importable without storage

        try:
            der = await self.storage.load(st.key)
        except NotFound:
            return False
        except Exception as e:
            log.warning("OCSP: cannot read persisted staple %s: %s", st.key, e)
            return False
        try:
            result = verify_response(der, cert.leaf, st.issuer, self.clock())
        except OCSPInvalid as e:
            log.info("OCSP: persisted staple %s not usable (%s); asking the responder",
                     st.key, e.reason)
            return False
        if result.status != GOOD:
            return False
        log.info("OCSP: using persisted staple %s for %s (next update %s)", st.key,
                 ",".join(cert.names), result.next_update.isoformat())
        await self._accept(cert, st, der, result, persist=False)
        return True

    async def _accept(self, cert: Certificate, st: _State, der: bytes, result: OCSPResult,
                      persist: bool) -> None:
        now = self.clock()
        names = ",".join(cert.names)
        st.last_status = result.status
        if result.status == GOOD:
            cert.ocsp_staple = der
            st.result = result
            st.failures = 0
            st.last_error = None
            st.next_attempt = refresh_at(result, now, self._rng)
            log.debug("OCSP: stapled good response for %s, next update %s, refresh at %s",
                      names, result.next_update.isoformat(), st.next_attempt.isoformat())
            if persist and self.storage is not None:
                try:
                    await self.storage.store(st.key, der)
                except Exception as e:
                    log.warning("OCSP: cannot persist staple for %s to %s: %s", names, st.key, e)
        elif result.status == REVOKED:
            cert.revoked = True
            cert.ocsp_staple = None
            st.result = None
            st.next_attempt = None
            when = result.revocation_time.isoformat() if result.revocation_time else "unknown time"
            metrics.inc("autocert_proxy_ocsp_revoked_total")
            log.error("OCSP: certificate for %s (serial %x) is REVOKED (since %s) according to %s",
                      names, cert.leaf.serial_number, when, st.url)
            if self.on_revoked is not None:
                try:
                    r = self.on_revoked(cert)
                    if inspect.isawaitable(r):
                        await r
                except Exception:
                    log.exception("OCSP: on_revoked handler failed for %s", names)
        else:
            # "unknown": not stapleable; keep a still-valid good staple, retry like a failure
            self._failed(cert, st, f"responder {st.url} does not know this certificate (status unknown)")

    def _failed(self, cert: Certificate, st: _State, reason: str) -> None:
        metrics.inc("autocert_proxy_ocsp_fetch_errors_total")
        now = self.clock()
        st.failures += 1
        st.last_error = reason
        st.last_error_at = now
        delay = backoff_delay(st.failures, self.backoff_base, self.backoff_max, self._rng)
        st.next_attempt = now + dt.timedelta(seconds=delay)
        kept = " (keeping the previous staple)" if cert.ocsp_staple is not None else ""
        log.warning("OCSP: %s: %s%s; retry %d in %.0f s", ",".join(cert.names), reason, kept,
                    st.failures, delay)
        self._drop_if_expired(cert, st, now)

    async def _cancel_tasks(self) -> None:
        tasks = [s.task for s in self._states.values() if s.task is not None and not s.task.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
