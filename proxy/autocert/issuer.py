"""The ACME conversation (RFC 8555): account, order, challenges, finalize, download; ARI.

Blocking by design (plain ``http.client`` over one kept-alive TLS connection): the async autocert
manager runs ``AcmeIssuer.account`` / ``obtain`` / ``renewal_info`` in a worker thread. Nothing
here touches an event loop. One ``AcmeIssuer`` may be used from several threads at once:
each ``obtain`` has its own connection and nonces; the account is shared behind a lock.

No ``acme`` client library, no ``requests``: importing them cost ~160 ms of start-up, more
than the whole ACME conversation with a local CA. ``josepy`` signs (flattened JSON JWS with
{alg, nonce, url, jwk | kid}; the EAB inner JWS is HS256 over the account JWK), the standard
library talks HTTPS. What we do, and why:

- Connections: kept alive and reused per CA host (a small pool, one per concurrent request);
  a reused connection the CA closed meanwhile is reopened once. ``network_timeout`` bounds
  every socket operation.
- Nonces: taken from every answer's Replay-Nonce and pooled per issuer; a HEAD new-nonce only
  when the pool is empty.

- Polling: the library sleeps 1 s before every poll; Pebble (and real CAs, most of the time)
  validate in milliseconds, so we poll at ``poll_interval`` (0.02 s) growing x1.5 to
  ``poll_max_interval`` (1 s), honouring a CA's Retry-After (capped by the deadline).
- Bad nonces: the library retries a ``badNonce`` once; we retry up to ``nonce_retries`` times
  (a rejected nonce means the CA did not act on the request, so a retry is always safe).
- Trust: ``trusted_ca_pem`` becomes the only roots of the ``ssl.SSLContext`` for the CA's
  HTTPS; an empty value means the system's default roots.
- Errors: every failure - refused request, failed validation, TLS or network error, an answer
  we cannot parse - becomes an ``AcmeError`` naming the CA and the names, with the problem
  document and Retry-After when the CA sent them.
"""
from __future__ import annotations

import base64
import datetime as dt
import email.utils
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import math
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import josepy as jose
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from proxy.autocert.chains import alternate_links, chain_issuers, choose_chain
from proxy.autocert.challenges import CHALLENGE_TYPES, HTTP_01, TLS_ALPN_01, Challenge, safe_key

log = logging.getLogger(__name__)

DEFAULT_CHALLENGE_TYPES: tuple[str, ...] = (TLS_ALPN_01, HTTP_01)
ACME_ERROR_PREFIX = "urn:ietf:params:acme:error:"


# --------------------------------------------------------------------------------------------
# settings, errors, results
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IssuerSettings:
    directory_url: str
    email: str = ""
    eab_key_id: str = ""
    eab_mac_key: str = ""               # unpadded base64url, as the CA hands it out
    trusted_ca_pem: bytes = b""         # CA(s) trusted for the CA's HTTPS; empty: default roots
    must_staple: bool = False
    profile: str = ""                   # ACME profile (autocert_profile); "" = the CA's default
    preferred_chain: str = ""           # issuer common name (autocert_preferred_chain); "" = default chain
    challenge_types: tuple[str, ...] = DEFAULT_CHALLENGE_TYPES  # order of preference
    poll_interval: float = 0.01         # first wait before polling an authorization or order
    poll_max_interval: float = 1.0      # the wait grows x1.5 up to this
    timeout: float = 90.0               # for one whole order, from new-order to download
    network_timeout: float = 30.0       # for one HTTP request
    nonce_retries: int = 10             # attempts per request while the CA says badNonce
    user_agent: str = "autocert-proxy"

    def __post_init__(self) -> None:
        bad = [t for t in self.challenge_types if t not in CHALLENGE_TYPES]
        if bad or not self.challenge_types:
            raise ValueError(f"challenge_types {self.challenge_types!r}: each must be one of {CHALLENGE_TYPES}")
        if bool(self.eab_key_id) != bool(self.eab_mac_key):
            raise ValueError("eab_key_id and eab_mac_key must be given together")


class AcmeError(Exception):
    """An ACME operation failed. ``str()`` says what, for which names, at which CA, and why."""

    def __init__(self, message: str, *, ca: str, domains: Sequence[str] = (),
                 problem: Optional[dict] = None, retry_after: Optional[float] = None,
                 validation_failed: bool = False):
        super().__init__(message)
        self.message = message
        self.ca = ca
        self.domains = tuple(domains)
        self.problem = problem
        self.retry_after = retry_after
        #: the CA tried our challenge and it failed: another challenge type may work
        self.validation_failed = validation_failed

    @property
    def problem_type(self) -> str:
        return (self.problem or {}).get("type", "")

    def __str__(self) -> str:
        names = f" for {', '.join(self.domains)}" if self.domains else ""
        out = f"ACME CA {self.ca}{names}: {self.message}"
        if self.problem:
            out += f" [{describe_problem(self.problem)}]"
        if self.retry_after is not None:
            out += f" (the CA asks to retry after {self.retry_after:.0f} s)"
        return out


def describe_problem(problem: dict) -> str:
    """One line for an RFC 7807 problem document, subproblems included."""
    t = str(problem.get("type", "about:blank"))
    short = t[len(ACME_ERROR_PREFIX):] if t.startswith(ACME_ERROR_PREFIX) else t
    out = f"{short}: {problem.get('detail') or problem.get('title') or ''}".rstrip(": ")
    subs = problem.get("subproblems") or []
    if subs:
        parts = []
        for s in subs:
            ident = (s.get("identifier") or {}).get("value")
            parts.append((f"{ident}: " if ident else "") + describe_problem(s))
        out += "; subproblems: " + "; ".join(parts)
    return out


@dataclass(frozen=True)
class IssuedCertificate:
    chain_pem: bytes            # leaf first, then intermediates, as the CA sent it
    cert_url: str
    order_url: str
    domains: tuple[str, ...]
    issuer_key: str             # issuer_id(directory_url): the storage folder for this CA
    not_before: dt.datetime
    not_after: dt.datetime
    elapsed: float              # seconds from new-order to download
    profile: str = ""           # the ACME profile of the order ("" = the CA's default)

    @property
    def leaf(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.chain_pem)

    @property
    def must_staple(self) -> bool:
        """Does the leaf carry the TLS Feature status_request (OCSP must-staple) extension?"""
        try:
            feature = self.leaf.extensions.get_extension_for_class(x509.TLSFeature).value
        except x509.ExtensionNotFound:
            return False
        return x509.TLSFeatureType.status_request in list(feature)


# --------------------------------------------------------------------------------------------
# pure helpers
# --------------------------------------------------------------------------------------------
def issuer_id(directory_url: str) -> str:
    """certmagic's storage name for a CA: host plus path, made one safe path segment.

    ``https://acme-v02.api.letsencrypt.org/directory`` -> ``acme-v02.api.letsencrypt.org-directory``;
    ``https://127.0.0.1:14000/dir`` -> ``127.0.0.1-14000-dir``.
    """
    key = directory_url
    u = urllib.parse.urlsplit(directory_url)
    if u.netloc:
        key = u.netloc
        path = u.path.replace("/", "-").replace("\\", "-").strip("-")
        if path:
            key += "-" + path
    return safe_key(key)


RETRY_AFTER_MAX = 365 * 86400


def parse_retry_after(value: Optional[str], now: Optional[dt.datetime] = None) -> Optional[float]:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None if absent/bad."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isascii() and value.isdigit():
        # (hundreds of digits would overflow a float: capped at a year, longer than any backoff)
        return float(min(int(value), RETRY_AFTER_MAX))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    now = now or dt.datetime.now(dt.timezone.utc)
    return max(0.0, (when - now).total_seconds())


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def ari_cert_id(cert_pem: bytes) -> str:
    """RFC 9773 CertID: base64url(AKI keyIdentifier) "." base64url(DER serial INTEGER content)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        raise ValueError("certificate has no Authority Key Identifier: no ARI CertID") from None
    if aki.key_identifier is None:
        raise ValueError("certificate's Authority Key Identifier has no keyIdentifier")
    serial = cert.serial_number
    # DER INTEGER content: big-endian two's complement, minimal length (room for the sign bit)
    serial_bytes = serial.to_bytes(max(1, math.ceil((serial.bit_length() + 1) / 8)), "big", signed=True)
    return f"{_b64url(aki.key_identifier)}.{_b64url(serial_bytes)}"


def normalize_domains(domains: Sequence[str]) -> tuple[str, ...]:
    out: list[str] = []
    for d in domains:
        n = d.strip().lower().rstrip(".")
        if not n:
            raise ValueError(f"empty name in {list(domains)!r}")
        if n not in out:
            out.append(n)
    if not out:
        raise ValueError("no names to obtain a certificate for")
    return tuple(out)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def load_private_key(key_pem: bytes):
    return serialization.load_pem_private_key(key_pem, password=None)


def build_csr(key_pem: bytes, domains: Sequence[str], must_staple: bool = False) -> bytes:
    """DER CSR for ``domains`` (SANs; CN = first name when it fits) signed by ``key_pem``.

    With ``must_staple`` it carries the TLS Feature extension (status_request, RFC 7633).
    """
    domains = normalize_domains(domains)
    key = load_private_key(key_pem)
    sans: list[x509.GeneralName] = []
    for d in domains:
        sans.append(x509.IPAddress(ipaddress.ip_address(d)) if _is_ip(d) else x509.DNSName(d))
    subject = []
    if len(domains[0]) <= 64 and not _is_ip(domains[0]):
        subject.append(x509.NameAttribute(NameOID.COMMON_NAME, domains[0]))
    b = (x509.CertificateSigningRequestBuilder()
         .subject_name(x509.Name(subject))
         .add_extension(x509.SubjectAlternativeName(sans), critical=False))
    if must_staple:
        b = b.add_extension(x509.TLSFeature([x509.TLSFeatureType.status_request]), critical=False)
    algo = None if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)) else hashes.SHA256()
    return b.sign(key, algo).public_bytes(serialization.Encoding.DER)


def generate_account_key() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _jwk_and_alg(key_pem: bytes) -> tuple[jose.JWK, jose.JWASignature]:
    key = load_private_key(key_pem)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        alg = {256: jose.ES256, 384: jose.ES384, 521: jose.ES512}.get(key.curve.key_size)
        if alg is None:
            raise ValueError(f"unsupported account key curve {key.curve.name}")
        return jose.JWKEC(key=key), alg
    if isinstance(key, rsa.RSAPrivateKey):
        return jose.JWKRSA(key=key), jose.RS256
    raise ValueError(f"unsupported account key type {type(key).__name__}")


def key_authorization(token: str, account_jwk: jose.JWK) -> str:
    thumb = account_jwk.public_key().thumbprint(hash_function=hashes.SHA256)
    return f"{token}.{_b64url(thumb)}"


def must_staple_refused(problem: Optional[dict]) -> bool:
    """Does this problem say the CA will not issue must-staple (TLS Feature) certificates?"""
    if not problem:
        return False
    texts = [str(problem.get("detail") or ""), str(problem.get("title") or "")]
    for s in problem.get("subproblems") or []:
        texts.append(str(s.get("detail") or ""))
    blob = " ".join(texts).lower()
    return any(w in blob for w in ("staple", "status_request", "tls feature", "tlsfeature",
                                   "1.3.6.1.5.5.7.1.24"))


def unusable_chain(certs: Sequence[x509.Certificate], names: Sequence[str], key_pem: bytes,
                   now: Optional[dt.datetime] = None) -> str:
    """Why a chain the CA sent for ``names`` and our key cannot be served ("" if it can): the
    leaf must carry our key, name every name and not be expired, and the next certificate
    (when there is one) must have issued it."""
    if not certs:
        return "no certificate"
    leaf = certs[0]
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(serialization.Encoding.DER, spki) != \
            load_private_key(key_pem).public_key().public_bytes(serialization.Encoding.DER, spki):
        return "it is not for the key we sent"
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        listed = {str(n).lower() for n in san.get_values_for_type(x509.DNSName)}
        listed |= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    except x509.ExtensionNotFound:
        listed = set()
    missing = [n for n in names if (str(ipaddress.ip_address(n)) if _is_ip(n) else n) not in listed]
    if missing:
        return f"it does not name {', '.join(missing)} (it names {', '.join(sorted(listed)) or 'nothing'})"
    now = now or dt.datetime.now(dt.timezone.utc)
    if leaf.not_valid_after_utc <= now:
        return f"it expired on {leaf.not_valid_after_utc.isoformat()}"
    if len(certs) > 1:
        try:
            leaf.verify_directly_issued_by(certs[1])
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            return (f"the chain's second certificate ({certs[1].subject.rfc4514_string()}) "
                    "did not issue it")
    return ""


MUST_STAPLE_REFUSED_MESSAGE = (
    "the CA refuses must-staple certificates (it will not issue a certificate carrying the "
    "OCSP must-staple / TLS Feature extension); turn off autocert_must_staple")


# --------------------------------------------------------------------------------------------
# the network side
# --------------------------------------------------------------------------------------------
class _Problem(Exception):
    """The CA answered with an RFC 7807 problem document (``application/problem+json``)."""

    def __init__(self, problem: dict, response: Optional["_Response"] = None):
        super().__init__(describe_problem(problem))
        self.problem = problem
        self.response = response

    @property
    def code(self) -> str:
        t = str(self.problem.get("type", ""))
        return t[len(ACME_ERROR_PREFIX):] if t.startswith(ACME_ERROR_PREFIX) else t


class _Unexpected(Exception):
    """The CA answered with an error status but no problem document."""


class _Conflict(Exception):
    """HTTP 409 from the CA."""


class _Aborted(Exception):
    """The issuer was told to stop (``AcmeIssuer.abort``) while waiting for the CA."""


class _NetworkError(Exception):
    """The request did not get an answer: ``kind`` is "tls", "timeout" or "connect"."""

    def __init__(self, kind: str, reason: BaseException):
        super().__init__(str(reason) or type(reason).__name__)
        self.kind = kind
        self.reason = reason


class _Response:
    """One answer from the CA, read in full."""

    __slots__ = ("status_code", "headers", "content", "url")

    def __init__(self, status_code: int, headers: Any, content: bytes, url: str):
        self.status_code = status_code
        self.headers = headers      # http.client.HTTPMessage: case-insensitive .get()
        self.content = content
        self.url = url

    @property
    def ok(self) -> bool:
        return self.status_code < 400

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


# a reused keep-alive connection the CA closed while idle: reopen once and resend (a CA whose
# process ended closes without a TLS close_notify: SSLEOFError)
_STALE_CONNECTION = (http.client.RemoteDisconnected, http.client.BadStatusLine, ConnectionResetError,
                     ConnectionAbortedError, BrokenPipeError, ssl.SSLEOFError, ssl.SSLZeroReturnError)


class _Transport:
    """HTTPS to the CA: kept-alive connections per host (one per concurrent request), the SSL
    context, and the pool of unused nonces. Shared by all operations of one issuer."""

    def __init__(self, trusted_ca_pem: bytes, timeout: float, user_agent: str):
        self.trusted_ca_pem = trusted_ca_pem
        self.timeout = timeout
        self.user_agent = user_agent
        self._lock = threading.Lock()
        self._context: Optional[ssl.SSLContext] = None
        self._idle: dict[tuple[str, str, int], list[http.client.HTTPConnection]] = {}
        self._nonces: list[str] = []

    def context(self) -> ssl.SSLContext:
        with self._lock:
            if self._context is None:
                if self.trusted_ca_pem:
                    self._context = ssl.create_default_context(cadata=self.trusted_ca_pem.decode("ascii"))
                else:
                    self._context = ssl.create_default_context()
            return self._context

    # -- nonces
    def add_nonce(self, nonce: Optional[str]) -> None:
        if nonce:
            with self._lock:
                self._nonces.append(nonce)
                del self._nonces[:-32]

    def pop_nonce(self) -> Optional[str]:
        with self._lock:
            return self._nonces.pop() if self._nonces else None

    # -- connections
    def _checkout(self, key: tuple[str, str, int]) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            idle = self._idle.get(key)
            if idle:
                return idle.pop(), True
        scheme, host, port = key
        if scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, timeout=self.timeout, context=self.context())
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        return conn, False

    def _checkin(self, key: tuple[str, str, int], conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._idle.setdefault(key, []).append(conn)

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for c in conns:
            c.close()

    def request(self, method: str, url: str, body: Optional[bytes] = None,
                headers: Optional[dict] = None) -> _Response:
        u = urllib.parse.urlsplit(url)
        scheme = u.scheme.lower()
        if scheme not in ("https", "http") or not u.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        key = (scheme, u.hostname, u.port or (443 if scheme == "https" else 80))
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        hdrs = {"User-Agent": self.user_agent, "Accept-Encoding": "identity"}
        if headers:
            hdrs.update(headers)
        while True:
            conn, reused = self._checkout(key)
            try:
                conn.request(method, target, body=body, headers=hdrs)
                r = conn.getresponse()
                content = r.read()
            except _STALE_CONNECTION as e:
                conn.close()
                if reused:
                    continue   # the CA closed the idle connection: a fresh one, once per stale one
                raise _NetworkError("tls" if isinstance(e, ssl.SSLError) else "connect", e) from e
            except ssl.SSLError as e:
                conn.close()
                raise _NetworkError("tls", e) from e
            except TimeoutError as e:
                conn.close()
                raise _NetworkError("timeout", e) from e
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise _NetworkError("connect", e) from e
            except BaseException:
                conn.close()
                raise
            if r.will_close:
                conn.close()
            else:
                self._checkin(key, conn)
            self.add_nonce(r.headers.get("Replay-Nonce"))
            return _Response(r.status, r.headers, content, url)


class _Net:
    """Signed requests for one operation: JWS (jwk or kid), nonces with a bounded badNonce
    retry, and the last response kept for Retry-After."""

    JOSE_CONTENT_TYPE = "application/jose+json"

    def __init__(self, key: Optional[jose.JWK], alg: Optional[jose.JWASignature] = None, *,
                 transport: Optional[_Transport] = None, kid: Optional[str] = None,
                 nonce_retries: int = 10) -> None:
        self.key = key
        self.alg = alg
        self.kid = kid
        self.transport = transport or _Transport(b"", 30.0, "autocert-proxy")
        self.nonce_retries = max(1, nonce_retries)
        self.last_response: Optional[_Response] = None
        self.nonce_rejections = 0

    def _send(self, method: str, url: str, body: Optional[bytes] = None,
              headers: Optional[dict] = None) -> _Response:
        resp = self.transport.request(method, url, body, headers)
        self.last_response = resp
        return resp

    @staticmethod
    def _check(resp: _Response) -> _Response:
        if resp.status_code == 409:
            raise _Conflict(resp.headers.get("Location", "UNKNOWN-LOCATION"))
        if resp.ok:
            return resp
        try:
            problem = resp.json()
        except ValueError:
            problem = None
        if isinstance(problem, dict) and ("type" in problem or "detail" in problem):
            raise _Problem(problem, resp)
        raise _Unexpected(f"HTTP {resp.status_code} from {resp.url}: {resp.text[:200].strip()!r}")

    def get(self, url: str) -> _Response:
        return self._check(self._send("GET", url))

    def _nonce(self, new_nonce_url: Optional[str]) -> str:
        nonce = self.transport.pop_nonce()
        if nonce:
            return nonce
        if not new_nonce_url:
            raise _Unexpected("no nonce: the directory has no newNonce URL")
        resp = self._send("HEAD", new_nonce_url)
        if not resp.ok:
            self._check(resp)
        nonce = self.transport.pop_nonce()
        if not nonce:
            raise _Unexpected(f"HTTP {resp.status_code} from {new_nonce_url}: no Replay-Nonce header")
        return nonce

    def sign(self, url: str, payload: Optional[dict], nonce: str) -> bytes:
        assert self.key is not None and self.alg is not None
        header: dict[str, Any] = {"alg": self.alg.name, "nonce": nonce, "url": url}
        if self.kid:
            header["kid"] = self.kid
        else:
            header["jwk"] = self.key.public_key().to_partial_json()
        return json.dumps(_jws(header, b"" if payload is None else json.dumps(payload).encode(),
                               lambda msg: self.alg.sign(self.key.key, msg))).encode()  # type: ignore[union-attr]

    def post(self, url: str, payload: Optional[dict], new_nonce_url: Optional[str] = None) -> _Response:
        """POST a JWS of ``payload`` (None: POST-as-GET, the empty payload) to ``url``."""
        for attempt in range(self.nonce_retries):
            body = self.sign(url, payload, self._nonce(new_nonce_url))
            try:
                return self._check(self._send("POST", url, body,
                                              {"Content-Type": self.JOSE_CONTENT_TYPE}))
            except _Problem as error:
                if error.code != "badNonce" or attempt == self.nonce_retries - 1:
                    raise
                self.nonce_rejections += 1
                log.debug("CA rejected our nonce (attempt %d), retrying", attempt + 1)
        raise AssertionError("unreachable")


def _jws(header: dict, payload: bytes, sign: Callable[[bytes], bytes]) -> dict:
    """A flattened JSON JWS (RFC 7515 7.2.2), as the JSON object."""
    protected = _b64url(json.dumps(header, separators=(",", ":")).encode())
    encoded = _b64url(payload)
    signature = sign(f"{protected}.{encoded}".encode("ascii"))
    return {"protected": protected, "payload": encoded, "signature": _b64url(signature)}


def _eab(account_jwk: jose.JWK, kid: str, mac_key: bytes, url: str) -> dict:
    """RFC 8555 7.3.4 externalAccountBinding: HS256 JWS of the account's public JWK."""
    payload = json.dumps(account_jwk.public_key().to_partial_json()).encode()
    return _jws({"alg": "HS256", "kid": kid, "url": url}, payload,
                lambda msg: hmac.new(mac_key, msg, hashlib.sha256).digest())


class _Poller:
    """Waits between polls: poll_interval growing x1.5 to poll_max_interval; Retry-After wins.
    A set ``abort`` event ends the wait at once (the proxy is shutting down)."""

    def __init__(self, settings: IssuerSettings, deadline: float,
                 abort: Optional[threading.Event] = None):
        self.wait = settings.poll_interval
        self.max = settings.poll_max_interval
        self.deadline = deadline
        self.abort = abort or threading.Event()

    def sleep(self, response: Optional[_Response] = None) -> None:
        wait = self.wait
        if response is not None:
            ra = parse_retry_after(response.headers.get("Retry-After"))
            if ra is not None:
                wait = max(wait, ra)
        wait = min(wait, max(0.0, self.deadline - time.monotonic()))
        if self.abort.wait(wait):
            raise _Aborted()
        self.wait = min(self.max, self.wait * 1.5)

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.deadline


class AcmeIssuer:
    """Speaks ACME to one CA with one account. Blocking; run it in a worker thread.

    ``account_key_pem`` / ``registration_json`` are what ``account()`` returned before (kept in
    storage under ``acme/<issuer>/users/<email>/``); without them a new account is registered
    on first use. ``registration_json`` is certmagic's account record: the ACME account object
    plus ``"location"`` (the account URL).
    """

    def __init__(self, settings: IssuerSettings, account_key_pem: Optional[bytes] = None,
                 registration_json: Optional[bytes] = None, *, account_confirmed: bool = False,
                 directory: Optional[dict] = None, abort: Optional[threading.Event] = None):
        self.settings = settings
        # set by whoever stops us (may be shared by several issuers): waits for the CA end at once
        self._abort = abort if abort is not None else threading.Event()
        self.ca = settings.directory_url
        self.issuer_key = issuer_id(settings.directory_url)
        self._lock = threading.Lock()
        self._directory: Optional[dict] = None
        self._account_key_pem = account_key_pem or generate_account_key()
        try:
            self._jwk, self._alg = _jwk_and_alg(self._account_key_pem)
        except (ValueError, TypeError) as e:
            raise AcmeError(f"the ACME account key cannot be used: {e}", ca=self.ca) from None
        self._registration: dict = {}
        if registration_json:
            try:
                self._registration = json.loads(registration_json)
            except ValueError as e:
                raise AcmeError(f"the stored ACME account record is not JSON: {e}", ca=self.ca) from None
        # True when the caller has just confirmed this registration with the CA (another
        # issuer on the same account did): no second look-up request.
        self._account_checked = account_confirmed and bool(self._registration.get("location"))
        self._directory = directory   # a directory another issuer for this CA just fetched
        if settings.trusted_ca_pem:
            try:
                x509.load_pem_x509_certificates(settings.trusted_ca_pem)
                settings.trusted_ca_pem.decode("ascii")
            except ValueError as e:
                raise AcmeError(f"the trusted CA (autocert_trusted_ca / autocert_trusted_ca_file) "
                                f"is not a PEM certificate: {e}", ca=self.ca) from None
        self._transport = _Transport(settings.trusted_ca_pem, settings.network_timeout,
                                     settings.user_agent)
        self._stats_lock = threading.Lock()
        #: counters for metrics and tests: nonces the CA rejected, polls of authz/order
        self.stats = {"nonce_rejections": 0, "polls": 0}

    def _count_poll(self) -> None:
        with self._stats_lock:
            self.stats["polls"] += 1

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        """Close the idle connections to the CA (a later request opens a new one)."""
        self._transport.close()

    def abort(self) -> None:
        """Make a running ``obtain`` give up at its next wait (it still cleans up its challenges)."""
        self._abort.set()

    def __enter__(self) -> "AcmeIssuer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------------
    def _net(self, with_account: bool = True) -> _Net:
        return _Net(self._jwk, self._alg, transport=self._transport,
                    kid=self._registration["location"] if with_account else None,
                    nonce_retries=self.settings.nonce_retries)

    def _error(self, exc: BaseException, doing: str, domains: Sequence[str] = (),
               net: Optional[_Net] = None) -> AcmeError:
        """Turn anything raised while talking to the CA into an AcmeError."""
        if isinstance(exc, AcmeError):
            return exc
        retry_after = None
        if net is not None and net.last_response is not None and not net.last_response.ok:
            retry_after = parse_retry_after(net.last_response.headers.get("Retry-After"))
        if isinstance(exc, _Problem):
            problem = exc.problem
            return AcmeError(self._explain(problem, doing), ca=self.ca, domains=domains,
                             problem=problem, retry_after=retry_after)
        if isinstance(exc, _NetworkError):
            reason = _root_cause(exc.reason)
            if exc.kind == "tls":
                hint = ("certificate verification failed: the CA's HTTPS certificate is not trusted; "
                        "check autocert_trusted_ca / autocert_trusted_ca_file"
                        if isinstance(exc.reason, ssl.SSLCertVerificationError)
                        or "CERTIFICATE_VERIFY_FAILED" in reason or "certificate verify failed" in reason
                        else "TLS connection failed")
                return AcmeError(f"{doing}: {hint} ({reason})", ca=self.ca, domains=domains)
            if exc.kind == "timeout":
                return AcmeError(f"{doing}: the CA did not answer in time ({reason or 'timed out'})",
                                 ca=self.ca, domains=domains)
            return AcmeError(f"{doing}: cannot reach the CA ({reason})", ca=self.ca, domains=domains)
        if isinstance(exc, _Unexpected):
            return AcmeError(f"{doing}: unexpected answer from the CA ({exc})", ca=self.ca,
                             domains=domains, retry_after=retry_after)
        if isinstance(exc, _Conflict):
            return AcmeError(f"{doing}: conflict ({exc})", ca=self.ca, domains=domains)
        if isinstance(exc, _Aborted):
            return AcmeError(f"{doing}: stopped (shutting down)", ca=self.ca, domains=domains)
        return AcmeError(f"{doing}: {type(exc).__name__}: {exc}", ca=self.ca, domains=domains,
                         retry_after=retry_after)

    def _explain(self, problem: dict, doing: str) -> str:
        t = str(problem.get("type", ""))
        code = t[len(ACME_ERROR_PREFIX):] if t.startswith(ACME_ERROR_PREFIX) else t
        if self.settings.must_staple and must_staple_refused(problem):
            return f"{doing}: {MUST_STAPLE_REFUSED_MESSAGE}"
        if code == "externalAccountRequired":
            return (f"{doing}: the CA requires External Account Binding; set autocert_eab_key_id "
                    "and autocert_eab_mac_key to the values the CA gave you")
        if doing.startswith("registering") and self.settings.eab_key_id and code in (
                "unauthorized", "malformed", "badPublicKey", "badSignatureAlgorithm"):
            return (f"{doing}: the CA rejected the External Account Binding (key id "
                    f"{self.settings.eab_key_id!r}); check autocert_eab_key_id and autocert_eab_mac_key")
        if code == "invalidProfile":
            return (f"{doing}: the CA refused the profile {self.settings.profile!r} that "
                    f"autocert_profile asks for")
        if code == "rateLimited":
            return f"{doing}: rate limited by the CA"
        if code == "badNonce":
            return f"{doing}: the CA kept rejecting our nonces ({self.settings.nonce_retries} attempts)"
        return f"{doing}: the CA refused the request"

    def directory(self) -> dict:
        with self._lock:
            if self._directory is None:
                net = self._net(with_account=False)
                try:
                    d = net.get(self.ca).json()
                    if not isinstance(d, dict) or "newOrder" not in d or "newAccount" not in d:
                        raise ValueError(f"not an ACME directory: {str(d)[:200]!r}")
                except Exception as e:
                    raise self._error(e, "fetching the ACME directory", net=net) from e
                self._directory = d
            return self._directory

    @staticmethod
    def _post(net: _Net, directory: dict, url: str, obj: Optional[dict]) -> _Response:
        return net.post(url, obj, new_nonce_url=directory.get("newNonce"))

    # -- account -------------------------------------------------------------------------------
    def account(self) -> tuple[bytes, bytes]:
        """Register (agreeing to the terms of service, with EAB when set) or confirm the account.

        With a stored record, asks the CA (new-account, onlyReturnExisting) whether the account
        still exists and registers afresh with the same key only if it does not.
        Returns (account_key_pem, registration_json) to store.
        """
        directory = self.directory()
        with self._lock:
            if not (self._account_checked and self._registration.get("location")):
                self._account_locked(directory)
            return self._account_key_pem, json.dumps(self._registration, sort_keys=True).encode()

    def _account_locked(self, directory: dict) -> None:
        net = self._net(with_account=False)
        if self._registration.get("location"):
            try:
                resp = self._post(net, directory, directory["newAccount"],
                                  {"onlyReturnExisting": True})
                self._set_registration(resp)
                self._account_checked = True
                return
            except _Problem as e:
                if e.code != "accountDoesNotExist":
                    raise self._error(e, "checking the stored ACME account", net=net) from e
                log.warning("ACME account %s no longer exists at %s; registering a new one",
                            self._registration.get("location"), self.ca)
            except Exception as e:
                raise self._error(e, "checking the stored ACME account", net=net) from e
        doing = "registering an ACME account"
        try:
            reg: dict[str, Any] = {"termsOfServiceAgreed": True}
            if self.settings.email:
                reg["contact"] = ["mailto:" + m for m in self.settings.email.split(",")]
            if self.settings.eab_key_id:
                try:
                    mac = jose.b64.b64decode(self.settings.eab_mac_key)
                    if not mac:
                        raise ValueError("empty")
                except (ValueError, TypeError) as e:
                    raise AcmeError(f"{doing}: autocert_eab_mac_key is not base64url ({e})",
                                    ca=self.ca) from None
                reg["externalAccountBinding"] = _eab(self._jwk, self.settings.eab_key_id, mac,
                                                     directory["newAccount"])
            resp = self._post(net, directory, directory["newAccount"], reg)
            self._set_registration(resp)
            self._account_checked = True
            log.info("ACME account %s at %s", self._registration["location"], self.ca)
        except Exception as e:
            raise self._error(e, doing, net=net) from e

    def _set_registration(self, resp: _Response) -> None:
        location = resp.headers.get("Location")
        if not location:
            raise AcmeError("the CA's account answer has no Location header", ca=self.ca)
        try:
            body = resp.json()
        except ValueError:
            body = {}
        rec = {k: v for k, v in body.items() if k in ("status", "contact", "termsOfServiceAgreed",
                                                      "orders", "createdAt")}
        rec["location"] = location
        if "status" in rec and rec["status"] != "valid":
            raise AcmeError(f"the ACME account {location} is {rec['status']}", ca=self.ca)
        self._registration = rec

    # -- certificates ---------------------------------------------------------------------------
    def obtain(self, domains: Sequence[str], cert_key_pem: bytes,
               present: Callable[[Challenge], None],
               cleanup: Callable[[Challenge], None]) -> IssuedCertificate:
        """Order, validate and download a certificate for ``domains`` with key ``cert_key_pem``.

        For each authorization that is not yet valid, the first of ``challenge_types`` the CA
        offers is chosen and ``present(challenge)`` is called before the CA is asked to
        validate it; ``cleanup(challenge)`` is called for every presented challenge once the
        authorizations are settled (success or not). Raises ``AcmeError``.
        """
        try:
            names = normalize_domains(domains)
        except ValueError as e:
            raise AcmeError(str(e), ca=self.ca, domains=tuple(domains)) from None
        try:
            csr_der = build_csr(cert_key_pem, names, self.settings.must_staple)
        except (ValueError, TypeError) as e:
            raise AcmeError(f"building the certificate request failed: {e}", ca=self.ca,
                            domains=names) from None
        directory = self.directory()
        self._check_profile(directory, names)
        self.account()
        started = time.monotonic()
        deadline = started + self.settings.timeout
        net = self._net()
        stage = "creating the order"
        try:
            identifiers = [{"type": "ip" if _is_ip(n) else "dns", "value": n} for n in names]
            new_order: dict[str, Any] = {"identifiers": identifiers}
            if self.settings.profile:
                new_order["profile"] = self.settings.profile
            resp = self._post(net, directory, directory["newOrder"], new_order)
            order_url = resp.headers.get("Location") or ""
            order = resp.json()
            if not order_url:
                raise AcmeError("the CA's new-order answer has no Location header", ca=self.ca,
                                domains=names)
            stage = "validating the names"
            self._authorize(net, directory, names, order, present, cleanup, deadline)
            stage = "finalizing the order"
            order = self._finalize(net, directory, names, order_url, order, csr_der, deadline)
            stage = "downloading the certificate"
            cert_url = order.get("certificate")
            if not cert_url:
                raise AcmeError("the valid order has no certificate URL", ca=self.ca, domains=names)
            cresp = self._post(net, directory, cert_url, None)
            chain_pem = cresp.content
            if self.settings.preferred_chain:
                chain_pem = self._preferred_chain(net, directory, cresp, names)
            try:
                certs = x509.load_pem_x509_certificates(chain_pem)
            except ValueError:
                raise AcmeError(f"the CA sent an unusable certificate: not a PEM certificate chain "
                                f"(it begins {chain_pem[:60]!r})", ca=self.ca, domains=names) from None
            problem = unusable_chain(certs, names, cert_key_pem)
            if problem:
                raise AcmeError(f"the CA sent an unusable certificate: {problem}", ca=self.ca,
                                domains=names)
        except Exception as e:
            raise self._error(e, stage, names, net) from e
        finally:
            with self._stats_lock:
                self.stats["nonce_rejections"] += net.nonce_rejections
        leaf = certs[0]
        issued = IssuedCertificate(
            chain_pem=chain_pem, cert_url=cert_url, order_url=order_url, domains=names,
            issuer_key=self.issuer_key, not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc, elapsed=time.monotonic() - started,
            profile=str(order.get("profile") or self.settings.profile))
        if self.settings.must_staple and not issued.must_staple:
            log.warning("ACME CA %s issued a certificate for %s without the OCSP must-staple "
                        "extension that autocert_must_staple asked for", self.ca, ", ".join(names))
        return issued

    def _preferred_chain(self, net: _Net, directory: dict, resp: _Response, names: tuple[str, ...]) -> bytes:
        """The chain ``preferred_chain`` picks among the default one (``resp``) and the CA's
        alternates; the default when none matches (logged, with what was offered)."""
        chains = [resp.content]
        for url in alternate_links(resp.headers.get_all("Link") or [], resp.url):
            try:
                chains.append(self._post(net, directory, url, None).content)
            except (_Problem, _Unexpected, _NetworkError, _Conflict) as e:
                log.warning("ACME CA %s: cannot fetch the alternate chain %s for %s: %s",
                            self.ca, url, ", ".join(names), e)
        picked = choose_chain(chains, self.settings.preferred_chain)
        if picked is None:
            offered = "; ".join(" <- ".join(reversed(chain_issuers(c))) or "(unreadable)" for c in chains)
            log.warning("ACME CA %s: no chain for %s has an issuer named %r (autocert_preferred_chain); "
                        "using the default chain. Offered chains, by issuer: %s",
                        self.ca, ", ".join(names), self.settings.preferred_chain, offered)
            return chains[0]
        return chains[picked]

    def _check_profile(self, directory: dict, names: tuple[str, ...]) -> None:
        """A profile is only asked of a CA that lists it (draft-ietf-acme-profiles: the
        directory's meta.profiles maps each name to a description)."""
        profile = self.settings.profile
        if not profile:
            return
        offered = (directory.get("meta") or {}).get("profiles")
        if not isinstance(offered, dict) or not offered:
            raise AcmeError(f"autocert_profile is {profile!r}, but this CA offers no profiles (its "
                            f"directory has no meta.profiles); remove autocert_profile or use a CA "
                            f"that has profiles", ca=self.ca, domains=names)
        if profile not in offered:
            raise AcmeError(f"autocert_profile is {profile!r}, which this CA does not offer; it offers "
                            f"{', '.join(sorted(map(str, offered)))}", ca=self.ca, domains=names)

    def _authorize(self, net: _Net, directory: dict, names: tuple[str, ...], order: dict,
                   present: Callable[[Challenge], None], cleanup: Callable[[Challenge], None],
                   deadline: float) -> None:
        authz_urls = order.get("authorizations") or []
        if not isinstance(authz_urls, list):
            raise AcmeError(f"malformed order: authorizations {authz_urls!r}", ca=self.ca, domains=names)
        presented: list[Challenge] = []
        pending: dict[str, tuple[Challenge, str]] = {}   # authz URL -> (challenge, its URL)
        try:
            for url in authz_urls:
                authz = self._post(net, directory, url, None).json()
                status = authz.get("status")
                domain = (authz.get("identifier") or {}).get("value", "?")
                if status == "valid":
                    continue
                if status != "pending":
                    raise AcmeError(f"the authorization for {domain} is {status}", ca=self.ca,
                                    domains=names, problem=_authz_problem(authz))
                chosen = None
                offered = {c.get("type"): c for c in authz.get("challenges") or []}
                for t in self.settings.challenge_types:
                    if t in offered:
                        chosen = offered[t]
                        break
                if chosen is None:
                    raise AcmeError(
                        f"the CA offers no usable challenge for {domain}: it offers "
                        f"{sorted(k for k in offered if k)}, we can solve {list(self.settings.challenge_types)}",
                        ca=self.ca, domains=names)
                if authz.get("wildcard"):
                    domain = "*." + domain
                ch = Challenge(type=chosen["type"], domain=domain, token=chosen["token"],
                               key_authorization=key_authorization(chosen["token"], self._jwk))
                try:
                    present(ch)
                except Exception as e:
                    raise AcmeError(f"presenting the {ch.type} challenge for {domain} failed: {e!r}",
                                    ca=self.ca, domains=names) from e
                presented.append(ch)
                answer = self._post(net, directory, chosen["url"], {})
                self._raise_if_failed(_json_or_empty(answer), ch, names, answer)
                pending[url] = (ch, chosen["url"])
            poller = _Poller(self.settings, deadline, self._abort)
            while pending:
                if poller.expired:
                    raise AcmeError(
                        f"timed out after {self.settings.timeout:.0f} s waiting for the CA to "
                        f"validate {', '.join(c.domain for c, _ in pending.values())}",
                        ca=self.ca, domains=names)
                poller.sleep()
                for url in list(pending):
                    self._count_poll()
                    r = self._post(net, directory, url, None)
                    authz = r.json()
                    status = authz.get("status")
                    ch, chall_url = pending[url]
                    if status == "valid":
                        del pending[url]
                    elif status in ("pending", "processing"):
                        ours = [c for c in authz.get("challenges") or [] if c.get("url") == chall_url]
                        if ours:
                            self._raise_if_failed(ours[0], ch, names, r)
                    else:
                        problem = _authz_problem(authz)
                        raise AcmeError(
                            f"the CA could not validate {ch.domain} with {ch.type} (authorization {status})",
                            ca=self.ca, domains=names, problem=problem,
                            retry_after=parse_retry_after(r.headers.get("Retry-After")),
                            validation_failed=True)
        finally:
            for ch in presented:
                try:
                    cleanup(ch)
                except Exception:
                    log.exception("cleaning up the %s challenge for %s failed", ch.type, ch.domain)

    def _raise_if_failed(self, challenge: dict, ch: Challenge, names: tuple[str, ...],
                         resp: _Response) -> None:
        """A challenge that is invalid, or still pending with an ``error`` (RFC 8555 8.2: the CA
        may retry; step-ca waits for the client to ask again), has failed for this order."""
        status = challenge.get("status")
        error = challenge.get("error")
        if status == "invalid" or (status != "valid" and isinstance(error, dict) and error):
            state = "invalid" if status == "invalid" else f"{status} with an error"
            raise AcmeError(f"the CA could not validate {ch.domain} with {ch.type} (challenge {state})",
                            ca=self.ca, domains=names, problem=error if isinstance(error, dict) else None,
                            retry_after=parse_retry_after(resp.headers.get("Retry-After")),
                            validation_failed=True)

    def _finalize(self, net: _Net, directory: dict, names: tuple[str, ...], order_url: str,
                  order: dict, csr_der: bytes, deadline: float) -> dict:
        poller = _Poller(self.settings, deadline, self._abort)
        finalized = False
        resp: Optional[_Response] = None
        while True:
            status = order.get("status")
            if status == "valid":
                return order
            if status == "invalid":
                problem = order.get("error")
                raise AcmeError(self._explain(problem, "the order failed") if problem else
                                "the order failed; the CA gave no reason",
                                ca=self.ca, domains=names, problem=problem)
            if status == "ready" and not finalized:
                resp = self._post(net, directory, order["finalize"], {"csr": _b64url(csr_der)})
                finalized = True
                order = resp.json()
                continue
            if status not in ("pending", "ready", "processing"):
                raise AcmeError(f"the order is in an unexpected state {status!r}", ca=self.ca,
                                domains=names)
            if poller.expired:
                raise AcmeError(f"timed out after {self.settings.timeout:.0f} s waiting for the "
                                f"order to become valid (last state: {status})",
                                ca=self.ca, domains=names)
            poller.sleep(resp)
            self._count_poll()
            resp = self._post(net, directory, order_url, None)
            order = resp.json()

    # -- ACME Renewal Information (RFC 9773) ----------------------------------------------------
    def renewal_info(self, cert_pem: bytes) -> Optional[tuple[dt.datetime, dt.datetime, Optional[float]]]:
        """(window_start, window_end, retry_after_seconds) the CA suggests, or None without ARI."""
        directory = self.directory()
        base = directory.get("renewalInfo")
        if not base:
            return None
        try:
            cert_id = ari_cert_id(cert_pem)
        except ValueError as e:
            raise AcmeError(f"renewal information: {e}", ca=self.ca) from None
        net = self._net(with_account=False)
        try:
            resp = net.get(base.rstrip("/") + "/" + cert_id)
            window = resp.json()["suggestedWindow"]
            start = _parse_rfc3339(window["start"])
            end = _parse_rfc3339(window["end"])
            if end < start:
                raise ValueError(f"window ends before it starts: {window!r}")
        except Exception as e:
            raise self._error(e, "fetching renewal information", net=net) from e
        return start, end, parse_retry_after(resp.headers.get("Retry-After"))


def _json_or_empty(resp: _Response) -> dict:
    try:
        body = resp.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _authz_problem(authz: dict) -> Optional[dict]:
    for c in authz.get("challenges") or []:
        if c.get("error"):
            return c["error"]
    return None


def _parse_rfc3339(s: str) -> dt.datetime:
    v = dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    return v if v.tzinfo else v.replace(tzinfo=dt.timezone.utc)


def _root_cause(exc: BaseException) -> str:
    """The innermost reason (for exceptions that wrap others), for a readable message."""
    seen = exc
    for _ in range(10):
        nxt = seen.__cause__ or seen.__context__
        if nxt is None and seen.args and isinstance(seen.args[0], BaseException):
            nxt = seen.args[0]
        if nxt is None or nxt is seen:
            break
        seen = nxt
    return str(seen) or str(exc)
