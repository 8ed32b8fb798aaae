"""Configuration: a YAML file plus environment variables -> one validated, immutable Options.

Pomerium's keys and rules: every key has an environment variable of the same name in upper
case (``autocert`` / ``AUTOCERT``), the environment wins over the file, booleans parse
loosely. Every problem found is collected; ``ConfigError.problems`` lists them all, each
naming the key, the value and what would be accepted. Pure: reads the files it is pointed
at (config, certificates, trusted CA) and nothing else; the environment comes in as a
mapping so tests (and reloads) can pass their own.
"""
from __future__ import annotations

import base64
import binascii
import datetime as dt
import difflib
import functools
import ipaddress
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional
from urllib.parse import urlsplit

import yaml
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from .pomerium_names import environment_refusals, refusal, route_refusal
from .storage import ACCEPTED as STORAGE_ACCEPTED, LocationError, parse_location
from .tls.keymatch import key_matches

LETS_ENCRYPT_PRODUCTION = "https://acme-v02.api.letsencrypt.org/directory"
LETS_ENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"

APP_NAME = "autocert-proxy"


class ConfigError(Exception):
    """The configuration cannot be used. ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


@dataclass(frozen=True)
class Address:
    host: str  # "" means every interface; an IPv6 literal is kept without brackets
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Upstream:
    scheme: str  # "http" (only plain HTTP upstreams for now)
    host: str    # lower case; an IPv6 literal is kept without brackets
    port: int

    @property
    def authority(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"

    @functools.cached_property
    def authority_bytes(self) -> bytes:
        """``authority`` as sent in a Host header, computed once (it is read per request)."""
        return self.authority.encode()

    @functools.cached_property
    def address(self) -> str:
        """host:port as logs name the upstream, computed once (it is read per request)."""
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class DirectResponse:
    status: int
    body: str


@dataclass(frozen=True)
class Route:
    from_url: str            # as written, e.g. "https://app.example.com/api"
    scheme: str              # "https" or "http"
    host: str                # lower case, no port; "*" anywhere = wildcard
    path_prefix: str         # "/" when the route has no path
    to: tuple[Upstream, ...]  # empty when ``response`` is set
    preserve_host_header: bool = False
    response: Optional[DirectResponse] = None
    port: Optional[int] = None       # from's port: the route matches only requests to it
    prefix: Optional[str] = None     # Pomerium's path rules: at most one of these three
    path: Optional[str] = None
    regex: Optional[str] = None      # compiled once by the route table
    regex_priority_order: int = 0
    upgrades: frozenset = frozenset()   # Upgrade values forwarded; "*" = any


@dataclass(frozen=True)
class CertificatePair:
    """One manual certificate chain and its key, checked to belong together.

    ``cert_data`` / ``key_data`` are the bytes as read (file or inline PEM): they are what the
    proxy serves from. ``certs`` holds the parsed chain (leaf first) so nothing parses it
    twice. ``cert_pem`` / ``key_pem`` are the normalized forms (PEM blocks only; PKCS#8),
    computed on demand."""

    cert_data: bytes
    key_data: bytes
    origin: str              # file path, or "certificates[0] (inline)"
    certs: tuple = field(default=(), compare=False, repr=False)   # x509.Certificate, leaf first

    @functools.cached_property
    def cert_pem(self) -> bytes:
        """Leaf first, then intermediates, re-encoded: text around the PEM blocks dropped."""
        certs = self.certs or x509.load_pem_x509_certificates(self.cert_data)
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)

    @functools.cached_property
    def key_pem(self) -> bytes:
        """The key as unencrypted PKCS#8 PEM."""
        return serialization.load_pem_private_key(self.key_data, password=None).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@dataclass(frozen=True)
class Options:
    address: Address = Address("", 443)
    http_redirect_addr: Optional[Address] = None
    metrics_address: Optional[Address] = None   # Prometheus /metrics listener (plain HTTP)
    routes: tuple[Route, ...] = ()
    certificates: tuple[CertificatePair, ...] = ()
    log_level: str = "info"                    # debug | info | warning | error
    access_log_format: str = "plain"           # plain | json
    # timeouts, seconds
    timeout_idle: float = 75.0                 # keep-alive client with no request
    timeout_read_header: float = 10.0          # request head must arrive within this
    default_upstream_timeout: float = 30.0     # upstream connect + response head
    shutdown_timeout: float = 30.0             # drain on SIGTERM
    workers: int = 1
    # autocert
    autocert: bool = False
    autocert_ca: str = LETS_ENCRYPT_PRODUCTION  # resolved: autocert_ca > use_staging > production
    autocert_dir: str = ""                     # resolved default when empty in the file
    autocert_eab_key_id: str = ""
    autocert_eab_mac_key: str = ""             # base64url, normalized to no padding
    autocert_email: str = ""
    autocert_must_staple: bool = False
    autocert_profile: str = ""                 # ACME profile sent in newOrder; "" = the CA's default
    autocert_preferred_chain: str = ""         # issuer common name of the chain to serve; "" = default
    autocert_trusted_ca_pem: bytes = b""       # from autocert_trusted_ca or autocert_trusted_ca_file
    autocert_use_staging: bool = False
    source: str = ""                           # path of the config file
    # Things that work but deserve a log line at start (expired manual certificate, ...).
    warnings: tuple[str, ...] = ()


# --------------------------------------------------------------------------- keys

# Every key the file may hold; each is also read from the environment in upper case.
KNOWN_KEYS: tuple[str, ...] = (
    "address",
    "http_redirect_addr",
    "metrics_address",
    "routes",
    "policy",
    "certificates",
    "certificate_file",
    "certificate_key_file",
    "log_level",
    "access_log_format",
    "timeout_idle",
    "timeout_read_header",
    "default_upstream_timeout",
    "shutdown_timeout",
    "workers",
    "autocert",
    "autocert_ca",
    "autocert_dir",
    "autocert_eab_key_id",
    "autocert_eab_mac_key",
    "autocert_email",
    "autocert_must_staple",
    "autocert_preferred_chain",
    "autocert_profile",
    "autocert_trusted_ca",
    "autocert_trusted_ca_file",
    "autocert_use_staging",
)

# Keys whose environment value is YAML (or JSON) text rather than a plain string.
STRUCTURED_KEYS = frozenset({"routes", "policy", "certificates"})

ROUTE_KEYS = ("from", "to", "preserve_host_header", "response", "prefix", "path", "regex",
              "regex_priority_order", "allow_websockets", "allow_spdy", "allow_upgrades",
              "allow_public_unauthenticated_access", "cors_allow_preflight", "name",
              "description", "logo_url")
# Accepted for Pomerium's sake; they change nothing here (every route is public already).
_NO_OP_ROUTE_KEYS = ("allow_public_unauthenticated_access", "cors_allow_preflight", "name",
                     "description", "logo_url")
# Python's re constructs RE2 refuses (lookaround, backreferences): refused so a rule means the same in both.
_NOT_RE2 = re.compile(r"(?:^|[^\\])(?:\\\\)*\\[1-9]|\(\?<?[=!]|\(\?P=")
RESPONSE_KEYS = ("status", "body")
CERTIFICATE_KEYS = ("cert", "key")

_TRUE = ("true", "TRUE", "True", "1", "t", "T")
_FALSE = ("false", "FALSE", "False", "0", "f", "F")
_BOOL_FORMS = ", ".join(_TRUE + _FALSE)

LOG_LEVELS = ("debug", "info", "warning", "error")
ACCESS_LOG_FORMATS = ("plain", "json")


class _Bad(ValueError):
    """One value is wrong; the message says why and what would be accepted."""


def _suggest(name: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------- scalars

def parse_bool(value: Any) -> bool:
    """Go's strconv.ParseBool forms, which is what Pomerium accepts."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
    raise _Bad(f"{value!r} is not a boolean; accepted: {_BOOL_FORMS}")


_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION = re.compile(f"(?:{_DURATION_PART.pattern})+")
_PLAIN_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_MAX_DURATION = (2 ** 63 - 1) / 1e9   # Go's time.Duration (int64 nanoseconds): about 292 years


def parse_duration(value: Any) -> float:
    """Seconds from a number or a Go duration ("30s", "1m30s", "500ms", "2h"); must be > 0."""
    accepted = 'accepted: a number of seconds or a duration like "30s", "1m30s", "500ms", "2h"'
    seconds: Optional[float] = None
    if isinstance(value, bool):
        pass  # bool is an int in Python; "true" seconds is a mistake, not a number
    elif isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        negative = text.startswith("-")
        if text.startswith(("-", "+")):
            text = text[1:]   # Go's sign, so that "-5s" is told it must be positive
        if _PLAIN_NUMBER.fullmatch(text):
            seconds = float(text)
        elif _DURATION.fullmatch(text):
            seconds = sum(float(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(text))
        if negative and seconds is not None:
            seconds = -seconds
    if seconds is None or not math.isfinite(seconds):
        raise _Bad(f"{value!r} is not a duration; {accepted}")
    if seconds <= 0:
        raise _Bad(f"{value!r} must be greater than zero; {accepted}")
    if seconds > _MAX_DURATION:
        raise _Bad(f"{value!r} is longer than the longest duration (about 292 years); {accepted}")
    return seconds


_DIGITS = re.compile(r"[0-9]+")   # ASCII only: str.isdigit() takes "²", which int() refuses


def parse_workers(value: Any, cpu_count: Callable[[], Optional[int]] = os.cpu_count) -> int:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return max(1, cpu_count() or 1)
    count = int(value) if isinstance(value, str) and _DIGITS.fullmatch(value.strip()) else value
    if isinstance(count, int) and not isinstance(count, bool) and count >= 1:
        return count
    raise _Bad(f"{value!r} is not a worker count; accepted: a positive integer or \"auto\"")


def parse_choice(value: Any, choices: tuple[str, ...], aliases: Mapping[str, str] = {}) -> str:
    if isinstance(value, str):
        v = value.strip().lower()
        v = aliases.get(v, v)
        if v in choices:
            return v
    raise _Bad(f"{value!r} is not accepted; accepted: {', '.join(choices)}")


def _require_str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f"{value!r} is not a string; expected {what}")
    return value


# --------------------------------------------------------------------------- names

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


def normalize_hostname(host: str, *, allow_wildcard: bool) -> str:
    """Lower case, IDNA (punycode) for non-ASCII labels; IP literals pass through."""
    if not host:
        raise _Bad("has no host")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    host = host.lower().rstrip(".")  # "example.com." is the same name written fully qualified
    if "*" in host and not allow_wildcard:
        raise _Bad(f"host {host!r} may not be a wildcard here")
    # Pomerium's rule: '*' anywhere in the host stands for one or more characters
    rest = host.replace("*", "x")
    try:
        ascii_host = rest if rest.isascii() else rest.encode("idna").decode("ascii")
    except UnicodeError as e:
        raise _Bad(f"host {host!r} is not a valid international domain name ({e})") from None
    labels = ascii_host.split(".")
    if not ascii_host or len(ascii_host) > 253 or not all(_LABEL.fullmatch(l) for l in labels):
        raise _Bad(f"host {host!r} is not a valid DNS name")
    if "*" not in host:
        return ascii_host
    if not host.isascii():
        raise _Bad(f"host {host!r}: a wildcard host must be written in ASCII (punycode)")
    return host


def parse_address(value: Any) -> Address:
    """"host:port", ":port" or "[v6]:port" -> Address; port 1-65535."""
    accepted = 'accepted: "host:port", ":port" or "[ipv6]:port", e.g. ":443", "127.0.0.1:8080", "[::1]:443"'
    if not isinstance(value, str):
        raise _Bad(f"{value!r} is not an address (quote it in YAML); {accepted}")
    text = value.strip()
    if text.startswith("["):
        m = re.fullmatch(r"\[([^\]]+)\]:([^:]*)", text)
        if not m:
            raise _Bad(f"{value!r} is not an address; {accepted}")
        host, port_text = m.group(1), m.group(2)
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise _Bad(f"{value!r}: {host!r} is not an IPv6 address; {accepted}") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise _Bad(f"{value!r} has no port; {accepted}")
        if ":" in host:
            raise _Bad(f"{value!r}: an IPv6 host needs brackets; {accepted}")
        if host:
            try:
                host = normalize_hostname(host, allow_wildcard=False)
            except _Bad as e:
                raise _Bad(f"{value!r}: {e}; {accepted}") from None
    if not _DIGITS.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise _Bad(f"{value!r}: port {port_text!r} is not a number from 1 to 65535; {accepted}")
    return Address(host, int(port_text))


# --------------------------------------------------------------------------- routes

def _parse_url_common(label: str, text: str):
    try:
        parts = urlsplit(text.strip())
        port = parts.port  # raises ValueError when out of range or not a number
    except ValueError as e:
        raise _Bad(f"{text!r} is not a valid URL ({e})") from None
    if parts.username is not None or parts.password is not None:
        raise _Bad(f"{text!r} has user information; remove the part before '@'")
    if parts.query or parts.fragment or text.rstrip().endswith(("?", "#")):
        raise _Bad(f"{text!r} has a query or fragment; {label} takes no '?' or '#'")
    if not parts.hostname:
        raise _Bad(f"{text!r} has no host; expected e.g. {'https://app.example.com' if label == 'from' else 'http://127.0.0.1:8080'}")
    return parts, port


def parse_from_url(value: Any) -> tuple[str, str, str, Optional[int]]:
    """-> (scheme, host, path_prefix, port)."""
    text = _require_str(value, 'a URL like "https://app.example.com" or "https://*.example.com/api"')
    parts, port = _parse_url_common("from", text)
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        raise _Bad(f"{text!r}: scheme {parts.scheme!r} is not accepted; accepted: https, http")
    host = normalize_hostname(parts.hostname, allow_wildcard=True)
    return scheme, host, parts.path or "/", port


def parse_upstream(value: Any) -> Upstream:
    text = _require_str(value, 'an upstream URL like "http://127.0.0.1:8080"')
    parts, port = _parse_url_common("to", text)
    scheme = parts.scheme.lower()
    if scheme == "https":
        raise _Bad(f"{text!r}: https upstreams are not supported yet; accepted: http://host[:port]")
    if scheme != "http":
        raise _Bad(f"{text!r}: scheme {parts.scheme!r} is not accepted; accepted: http://host[:port]")
    if parts.path not in ("", "/"):
        raise _Bad(f"{text!r} has a path; upstream paths are not supported (requests keep their own path), "
                   f"accepted: http://host[:port]")
    if port == 0:
        raise _Bad(f"{text!r}: port 0 cannot be connected to; accepted: http://host[:port], port 1-65535")
    host = normalize_hostname(parts.hostname, allow_wildcard=False)
    return Upstream("http", host, 80 if port is None else port)


def _unknown_keys(label: str, mapping: Mapping, known: tuple[str, ...], problems: list[str],
                  pomerium: Optional[Callable[[str, tuple[str, ...]], Optional[str]]] = None) -> None:
    for k in mapping:
        if k in known:
            continue
        # a Pomerium key is named as such, never "corrected" to a different setting
        refused = pomerium(str(k), known) if pomerium else None
        problems.append(f"{label}.{k}: {refused}" if refused else
                        f"{label}.{k}: unknown key{_suggest(str(k), known)}; accepted: {', '.join(known)}")


def parse_routes(value: Any, label: str, problems: list[str]) -> tuple[Route, ...]:
    if not isinstance(value, list):
        problems.append(f"{label}: expected a list of routes like [{{from: https://host, to: http://upstream}}], "
                        f"got {value!r}")
        return ()
    routes: list[Route] = []
    seen: dict[tuple[str, str], int] = {}
    for i, item in enumerate(value):
        where = f"{label}[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{where}: expected a mapping with 'from' and 'to' or 'response', got {item!r}")
            continue
        before = len(problems)
        _unknown_keys(where, item, ROUTE_KEYS, problems, route_refusal)

        parsed_from = None
        if item.get("from") is None:
            problems.append(f"{where}.from: missing; expected a URL like \"https://app.example.com\"")
        else:
            try:
                parsed_from = parse_from_url(item["from"])
            except _Bad as e:
                problems.append(f"{where}.from: {e}")

        has_to, has_response = item.get("to") is not None, item.get("response") is not None
        if has_to == has_response:
            problems.append(f"{where}: give exactly one of 'to' (upstream URL or list of URLs) or "
                            f"'response' ({{status, body}}); got {'both' if has_to else 'neither'}")

        upstreams: list[Upstream] = []
        if has_to:
            targets = item["to"] if isinstance(item["to"], list) else [item["to"]]
            if not targets:
                problems.append(f"{where}.to: empty list; expected at least one URL like \"http://127.0.0.1:8080\"")
            for j, t in enumerate(targets):
                tlabel = f"{where}.to" if not isinstance(item["to"], list) else f"{where}.to[{j}]"
                try:
                    upstreams.append(parse_upstream(t))
                except _Bad as e:
                    problems.append(f"{tlabel}: {e}")

        response = None
        if has_response:
            response = _parse_response(item["response"], f"{where}.response", problems)

        preserve = False
        if item.get("preserve_host_header") is not None:
            try:
                preserve = parse_bool(item["preserve_host_header"])
            except _Bad as e:
                problems.append(f"{where}.preserve_host_header: {e}")

        rules = _parse_route_rules(item, where, problems)
        if len(problems) != before or parsed_from is None:
            continue
        scheme, host, path, port = parsed_from
        if path != "/" and any(item.get(k) is not None for k in ("prefix", "path", "regex")):
            problems.append(f"{where}.from: a path in 'from' ({path!r}) is this proxy's own form; with "
                            f"'prefix', 'path' or 'regex' give the path there only")
            continue
        key = (host, path, port)
        if path != "/" and key in seen:
            problems.append(f"{where}.from: {item['from']!r} duplicates {label}[{seen[key]}] "
                            f"(same host {host!r} and path {path!r})")
            continue
        seen[key] = i
        routes.append(Route(from_url=str(item["from"]).strip(), scheme=scheme, host=host, path_prefix=path,
                            to=tuple(upstreams), preserve_host_header=preserve, response=response,
                            port=port, **rules))
    return tuple(routes)


def _parse_route_rules(item: Mapping, where: str, problems: list[str]) -> dict:
    """Pomerium's matching and upgrade keys of one route -> Route fields."""
    out: dict = {}
    given = [k for k in ("prefix", "path", "regex") if item.get(k) is not None]
    if len(given) > 1:
        problems.append(f"{where}: give at most one of 'prefix', 'path', 'regex'; got {', '.join(given)}")
    for k in given:
        v = item[k]
        if not isinstance(v, str) or not v:
            problems.append(f"{where}.{k}: expected a non-empty string like \"/api\", got {v!r}")
        elif k != "regex" and not v.startswith("/"):
            problems.append(f"{where}.{k}: {v!r} must start with '/'")
        elif k == "regex":
            try:
                re.compile(v)
            except re.error as e:
                problems.append(f"{where}.regex: {v!r} is not a valid regular expression ({e})")
                continue
            if _NOT_RE2.search(v):
                problems.append(f"{where}.regex: {v!r} uses a lookaround or backreference, which RE2 "
                                f"(Pomerium's regex syntax) does not accept")
                continue
            out[k] = v
        else:
            out[k] = v
    order = item.get("regex_priority_order")
    if order is not None:
        if isinstance(order, bool) or not isinstance(order, int):
            problems.append(f"{where}.regex_priority_order: expected a whole number, got {order!r}")
        else:
            out["regex_priority_order"] = order
    upgrades = set()
    for k, value in (("allow_websockets", "websocket"), ("allow_spdy", "spdy/3.1"), ("allow_upgrades", "*")):
        if item.get(k) is not None:
            try:
                if parse_bool(item[k]):
                    upgrades.add(value)
            except _Bad as e:
                problems.append(f"{where}.{k}: {e}")
    out["upgrades"] = frozenset(upgrades)
    return out


def _parse_response(value: Any, where: str, problems: list[str]) -> Optional[DirectResponse]:
    if not isinstance(value, dict):
        problems.append(f"{where}: expected a mapping like {{status: 200, body: \"ok\"}}, got {value!r}")
        return None
    _unknown_keys(where, value, RESPONSE_KEYS, problems)
    status = value.get("status")
    ok = True
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        problems.append(f"{where}.status: {status!r} is not accepted; accepted: an integer from 100 to 599")
        ok = False
    body = value.get("body", "")
    if body is None:
        body = ""
    if not isinstance(body, str):
        problems.append(f"{where}.body: {body!r} is not a string; quote it in YAML")
        ok = False
    return DirectResponse(status, body) if ok else None


# --------------------------------------------------------------------------- certificates

def _resolve(path: str, base_dir: str) -> str:
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))


def _read_pem_source(value: Any, base_dir: str) -> tuple[bytes, Optional[str]]:
    """A value holding inline PEM, or a file path -> (bytes, path or None when inline)."""
    text = _require_str(value, "a file path or inline PEM text")
    if "-----BEGIN" in text:
        return text.encode("utf-8"), None
    if not text.strip():
        raise _Bad("is empty; expected a file path or inline PEM text")
    path = _resolve(text, base_dir)
    try:
        with open(path, "rb") as f:
            return f.read(), path
    except OSError as e:
        raise _Bad(f"cannot read {path!r}: {e.strerror or e}") from None


def _spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_pair(cert_where: str, cert_value: Any, key_where: str, key_value: Any, base_dir: str,
              inline_origin: str, problems: list[str], warnings: list[str],
              now=None, full_key_check: bool = False) -> Optional[CertificatePair]:
    """Read, parse and cross-check one certificate + key. Problems go to ``problems``.

    The key is matched to the certificate from the public part written inside it (no key
    parse: see proxy.tls.keymatch); a key that cannot be matched that way, and every key
    with ``full_key_check`` (``--check``), is loaded with cryptography, which also gives the
    precise error."""
    certs = key_data = None
    origin = inline_origin
    try:
        cert_data, path = _read_pem_source(cert_value, base_dir)
        origin = path or inline_origin
        try:
            certs = x509.load_pem_x509_certificates(cert_data)
        except ValueError as e:
            raise _Bad(f"{(path or 'inline PEM')!r} holds no PEM certificate that can be parsed ({e})") from None
    except _Bad as e:
        problems.append(f"{cert_where}: {e}")
    try:
        key_data, key_path = _read_pem_source(key_value, base_dir)
    except _Bad as e:
        problems.append(f"{key_where}: {e}")
    if key_data is None:
        return None
    if certs is None or full_key_check or not key_matches(key_data, certs[0]):
        try:
            try:
                key = serialization.load_pem_private_key(key_data, password=None)
            except TypeError:
                raise _Bad(f"{(key_path or 'inline PEM')!r} is encrypted; a password-protected key is not supported") from None
            except (ValueError, UnsupportedAlgorithm) as e:
                raise _Bad(f"{(key_path or 'inline PEM')!r} holds no PEM private key that can be parsed ({e})") from None
        except _Bad as e:
            problems.append(f"{key_where}: {e}")
            return None
        if certs is None:
            return None
        key_spki = _spki(key.public_key())
        if _spki(certs[0].public_key()) != key_spki:
            hint = ""
            for n, c in enumerate(certs[1:], start=1):
                if _spki(c.public_key()) == key_spki:
                    hint = f"; it matches certificate #{n + 1} in the file: the leaf must come first"
            problems.append(f"{key_where}: the private key does not match the public key of the certificate "
                            f"in {cert_where} ({origin}){hint}")
            return None
    now = now or dt.datetime.now(dt.timezone.utc)
    if certs[0].not_valid_after_utc < now:
        warnings.append(f"{cert_where}: certificate from {origin} expired on "
                        f"{certs[0].not_valid_after_utc:%Y-%m-%d %H:%M} UTC; it is still served "
                        f"until a valid one replaces it")
    elif certs[0].not_valid_before_utc > now:
        warnings.append(f"{cert_where}: certificate from {origin} is not valid before "
                        f"{certs[0].not_valid_before_utc:%Y-%m-%d %H:%M} UTC; clients reject it until then")
    return CertificatePair(cert_data, key_data, origin, tuple(certs))


def parse_certificates(value: Any, label: str, base_dir: str, problems: list[str],
                       warnings: list[str], full_key_check: bool = False) -> list[CertificatePair]:
    if not isinstance(value, list):
        problems.append(f"{label}: expected a list like [{{cert: cert.pem, key: key.pem}}], got {value!r}")
        return []
    pairs = []
    for i, item in enumerate(value):
        where = f"{label}[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{where}: expected a mapping with 'cert' and 'key', got {item!r}")
            continue
        _unknown_keys(where, item, CERTIFICATE_KEYS, problems)
        before = len(problems)
        for k in CERTIFICATE_KEYS:   # every problem of the entry, not only the first
            if item.get(k) is None:
                problems.append(f"{where}.{k}: missing; expected a file path or inline PEM text")
            elif not isinstance(item[k], str):
                problems.append(f"{where}.{k}: {item[k]!r} is not a string; expected a file path or inline PEM text")
        if len(problems) != before:
            continue
        pair = load_pair(f"{where}.cert", item["cert"], f"{where}.key", item["key"], base_dir,
                         f"{where} (inline)", problems, warnings, full_key_check=full_key_check)
        if pair:
            pairs.append(pair)
    return pairs


# --------------------------------------------------------------------------- autocert

_MAC_KEY = re.compile(r"[A-Za-z0-9_-]+={0,2}")
_EMAIL = re.compile(r"[^@\s]+@[^@\s.]+(?:\.[^@\s.]+)+")
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def parse_ca_url(value: Any) -> str:
    accepted = ("accepted: an https:// ACME directory URL, or http:// only for 127.0.0.1, ::1 or localhost")
    text = _require_str(value, "an ACME directory URL").strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise _Bad(f"{text!r} is not a valid URL; {accepted}") from None
    scheme = parts.scheme.lower()
    if not parts.hostname or scheme not in ("https", "http"):
        raise _Bad(f"{text!r} is not accepted; {accepted}")
    if any(c <= " " or c == "\x7f" for c in text):   # urlsplit drops tabs and newlines silently
        raise _Bad(f"{text!r} has white space or control characters; {accepted}")
    if "@" in parts.netloc:
        raise _Bad(f"{text!r} has user information, which is never sent; remove the part before '@'")
    if port == 0:
        raise _Bad(f"{text!r}: port 0 cannot be connected to; {accepted}")
    try:
        normalize_hostname(parts.hostname, allow_wildcard=False)
    except _Bad as e:
        raise _Bad(f"{text!r}: {e}; {accepted}") from None
    if scheme == "http" and parts.hostname.lower() not in _LOCAL_HOSTS:
        raise _Bad(f"{text!r} uses plain http to a remote host; {accepted}")
    return text


_PROFILE = re.compile(r"[\x21-\x7e]{1,255}")


def parse_profile(value: Any) -> str:
    """An ACME profile name (draft-ietf-acme-profiles) as the CA lists it, e.g. "shortlived"."""
    text = _require_str(value, "an ACME profile name").strip()
    if not _PROFILE.fullmatch(text):
        raise _Bad(f"{text!r} is not a profile name; accepted: a name the CA lists in its directory "
                   f"(printable characters, no spaces), e.g. classic, tlsserver, shortlived")
    return text


def parse_preferred_chain(value: Any) -> str:
    """An issuer's common name, e.g. "ISRG Root X1" (spaces allowed, one line)."""
    text = _require_str(value, "an issuer common name like \"ISRG Root X1\"").strip()
    if not text or len(text) > 255 or not text.isprintable():
        raise _Bad(f"{text!r} is not accepted; accepted: the common name of an issuer in the chain "
                   f"you want served, e.g. \"ISRG Root X1\"")
    return text


def normalize_mac_key(value: Any) -> str:
    """base64url (RFC 4648 section 5), padding tolerated -> the unpadded form.

    The MAC key is a secret: errors give its length, never its text, so logs stay clean.
    """
    accepted = "accepted: base64url text (A-Z a-z 0-9 - _), as the CA gave it"
    text = _require_str(value, "base64url text").strip()
    if not _MAC_KEY.fullmatch(text):
        raise _Bad(f"value of length {len(text)} is not base64url (it has characters outside "
                   f"A-Z a-z 0-9 - _ ; '+' and '/' belong to standard base64); {accepted}")
    bare = text.rstrip("=")
    try:
        base64.urlsafe_b64decode(bare + "=" * (-len(bare) % 4))
    except (binascii.Error, ValueError):   # (one character too many, "A" or "AAAAA", lands here)
        raise _Bad(f"value of length {len(text)} does not decode as base64url; {accepted}") from None
    return bare


def _pem_bundle(data: bytes, what: str) -> bytes:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise _Bad(f"{what} holds no PEM certificate that can be parsed ({e})") from None
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def parse_trusted_ca_base64(value: Any) -> bytes:
    text = _require_str(value, "base64 of a PEM bundle")
    if "-----BEGIN" in text:
        raise _Bad("holds PEM text; this key takes the PEM bundle base64-encoded "
                   "(or put the file's path in autocert_trusted_ca_file)")
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise _Bad(f"value of length {len(text)} is not base64; accepted: base64 of a PEM bundle") from None
    return _pem_bundle(data, "the decoded value")


def default_autocert_dir(environ: Mapping[str, str], home_of_user: Callable[[], str]) -> str:
    """Pomerium's rule: $XDG_DATA_HOME/<app>, else $HOME/.local/share/<app>, then /autocert."""
    xdg = environ.get("XDG_DATA_HOME", "")
    if xdg:
        return os.path.join(xdg, APP_NAME, "autocert")
    home = environ.get("HOME", "") or home_of_user()
    return os.path.join(home, ".local", "share", APP_NAME, "autocert")


def _home_from_passwd() -> str:
    # Only when HOME is absent from the environment given (as in tests or bare systemd units).
    try:
        import pwd
        return pwd.getpwuid(os.getuid()).pw_dir
    except (ImportError, KeyError):
        return "/"


def parse_autocert_dir(value: Any, base_dir: str) -> str:
    """A directory (resolved against ``base_dir``) or a bucket URL, checked by the same parser
    start-up opens the storage with (``proxy.storage.parse_location``)."""
    text = _require_str(value, STORAGE_ACCEPTED)
    try:
        location = parse_location(text)   # as written: "s3:/bucket" is a mistyped URL, not a directory
    except LocationError as e:
        raise _Bad(f"{e.value!r}: {e.why}; accepted: {STORAGE_ACCEPTED}") from None
    if location.kind != "file":
        return text
    return _resolve(os.path.expanduser(text.strip()), base_dir)   # "~/x" is the user's, not <config dir>/~/x


# --------------------------------------------------------------------------- loading

# libyaml's C parser when PyYAML has it: the pure-Python one spends ~1 ms per certificate
# entry, which dominates start-up with thousands of certificates.
_BaseSafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _SafeLoaderNoDuplicates(_BaseSafeLoader):
    """PyYAML keeps the last of two equal keys silently; a repeated key is a mistake."""


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, (str, int, float, bool)):
            continue  # unhashable keys are reported later as unknown keys
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return _BaseSafeLoader.construct_mapping(loader, node, deep)


_SafeLoaderNoDuplicates.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_SafeLoaderNoDuplicates)


def read_sources(path: Optional[str], environ: Mapping[str, str],
                 problems: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """File + environment -> (raw values by key, label by key naming where each came from)."""
    raw: dict[str, Any] = {}
    labels: dict[str, str] = {}
    if path is not None:
        try:
            with open(path, "r", encoding="utf-8") as f:
                doc = _yaml(f.read())
        except OSError as e:
            problems.append(f"config file {path!r}: cannot read: {e.strerror or e}")
            doc = None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            problems.append(f"config file {path!r}: not valid YAML: {e}")
            doc = None
        if doc is None:
            doc = {}
        if not isinstance(doc, dict):
            problems.append(f"config file {path!r}: expected a mapping of keys at the top level, "
                            f"got {type(doc).__name__}")
            doc = {}
        for k, v in doc.items():
            if k not in KNOWN_KEYS:
                refused = refusal(str(k), KNOWN_KEYS)
                problems.append(f"{k}: {refused}" if refused else
                                f"{k}: unknown key in {path!r}{_suggest(str(k), KNOWN_KEYS)}")
            elif v is not None:  # "key:" with nothing after it means "use the default"
                raw[k], labels[k] = v, k
    for k in KNOWN_KEYS:
        env_name = k.upper()
        text = environ.get(env_name)
        if text is None or text == "":  # an empty variable is unset, as in Pomerium (viper)
            continue
        label = f"{k} (from environment {env_name})"
        if k in STRUCTURED_KEYS:
            try:
                raw[k] = _yaml(text)
            except yaml.YAMLError as e:
                problems.append(f"{label}: not valid YAML/JSON: {e}")
                raw.pop(k, None)
                continue
            if isinstance(raw[k], str) and _is_base64_yaml(text):
                problems.append(f"{label}: holds base64-encoded YAML or JSON (Pomerium's form); autocert-proxy "
                                f"takes the YAML or JSON text itself: decode it (base64 -d)")
                raw.pop(k)
                continue
        else:
            raw[k] = text
        labels[k] = label
    return raw, labels


def _is_base64_yaml(text: str) -> bool:
    try:
        return isinstance(_yaml(base64.b64decode("".join(text.split()), validate=True).decode()), (list, dict))
    except (binascii.Error, ValueError, yaml.YAMLError):
        return False


def _name_source(found: list[str], key: str, labels: Mapping[str, str]) -> list[str]:
    """'routes[0].from: msg' -> 'routes[0].from (from environment ROUTES): msg' for env values."""
    if labels[key] == key:
        return found
    suffix = labels[key][len(key):]
    out = []
    for p in found:
        where, sep, msg = p.partition(": ")
        out.append(f"{where}{suffix}{sep}{msg}")
    return out


def load_config(path: Optional[str], environ: Mapping[str, str], *, full_key_check: bool = False) -> Options:
    """Read ``path`` (YAML, may be None) and ``environ``; return Options or raise ConfigError.

    Manual certificate keys are matched to their certificates cheaply (their public part);
    ``full_key_check`` (``--check``) also loads every private key."""
    problems: list[str] = []
    warnings: list[str] = []
    raw, labels = read_sources(path, environ, problems)
    refused, noted = environment_refusals(environ, KNOWN_KEYS)
    problems += refused
    warnings += noted
    base_dir = os.path.dirname(os.path.abspath(path)) if path else os.getcwd()
    out: dict[str, Any] = {}

    def scalar(key: str, parse: Callable[[Any], Any]) -> None:
        if key in raw:
            try:
                out[key] = parse(raw[key])
            except _Bad as e:
                problems.append(f"{labels[key]}: {e}")

    scalar("address", parse_address)
    scalar("http_redirect_addr", parse_address)
    scalar("metrics_address", parse_address)
    for key in ("autocert", "autocert_use_staging", "autocert_must_staple"):
        scalar(key, parse_bool)
    scalar("log_level", lambda v: parse_choice(v, LOG_LEVELS, {"warn": "warning"}))
    scalar("access_log_format", lambda v: parse_choice(v, ACCESS_LOG_FORMATS))
    for key in ("timeout_idle", "timeout_read_header", "default_upstream_timeout", "shutdown_timeout"):
        scalar(key, parse_duration)
    scalar("workers", parse_workers)

    # routes
    if "routes" in raw and "policy" in raw:
        problems.append(f"{labels['policy']}: 'policy' is the older name of 'routes'; give one of them, not both")
    for key in ("routes", "policy"):
        if key in raw:
            found: list[str] = []
            out["routes"] = parse_routes(raw[key], key, found)
            problems += _name_source(found, key, labels)

    # certificates: the list first, then certificate_file + certificate_key_file
    pairs: list[CertificatePair] = []
    if "certificates" in raw:
        found = []
        pairs += parse_certificates(raw["certificates"], "certificates", base_dir, found, warnings,
                                    full_key_check)
        problems += _name_source(found, "certificates", labels)
    has_cert, has_key = "certificate_file" in raw, "certificate_key_file" in raw
    if has_cert != has_key:
        given, missing = ("certificate_file", "certificate_key_file") if has_cert else \
            ("certificate_key_file", "certificate_file")
        problems.append(f"{missing}: missing; {given} is set, give both or neither")
    elif has_cert:
        pair = load_pair(labels["certificate_file"], raw["certificate_file"],
                         labels["certificate_key_file"], raw["certificate_key_file"], base_dir,
                         "certificate_file (inline)", problems, warnings, full_key_check=full_key_check)
        if pair:
            pairs.append(pair)
    out["certificates"] = tuple(pairs)

    # autocert
    staging = out.get("autocert_use_staging", False)
    out["autocert_ca"] = LETS_ENCRYPT_STAGING if staging else LETS_ENCRYPT_PRODUCTION
    if "autocert_ca" in raw and str(raw["autocert_ca"]).strip():
        scalar("autocert_ca", parse_ca_url)  # an explicit CA wins over use_staging

    if "autocert_email" in raw:
        email = raw["autocert_email"]
        if not isinstance(email, str) or (email.strip() and not _EMAIL.fullmatch(email.strip())):
            problems.append(f"{labels['autocert_email']}: {email!r} is not an email address; "
                            f"accepted: empty, or an address like admin@example.com")
        else:
            out["autocert_email"] = email.strip()

    has_kid, has_mac = "autocert_eab_key_id" in raw, "autocert_eab_mac_key" in raw
    if has_kid != has_mac:
        given, missing = ("autocert_eab_key_id", "autocert_eab_mac_key") if has_kid else \
            ("autocert_eab_mac_key", "autocert_eab_key_id")
        problems.append(f"{missing}: missing; {given} is set, and External Account Binding needs both "
                        f"autocert_eab_key_id and autocert_eab_mac_key (or neither)")
    if has_kid:
        kid = raw["autocert_eab_key_id"]
        if isinstance(kid, int) and not isinstance(kid, bool):
            kid = str(kid)  # a numeric key id written without quotes
        if not isinstance(kid, str) or not kid.strip():
            problems.append(f"{labels['autocert_eab_key_id']}: {kid!r} is not accepted; "
                            f"accepted: the key identifier string your CA gave")
        else:
            out["autocert_eab_key_id"] = kid.strip()
    scalar("autocert_eab_mac_key", normalize_mac_key)
    if "autocert_profile" in raw and str(raw["autocert_profile"]).strip():
        scalar("autocert_profile", parse_profile)
    if "autocert_preferred_chain" in raw and str(raw["autocert_preferred_chain"]).strip():
        scalar("autocert_preferred_chain", parse_preferred_chain)

    if "autocert_trusted_ca" in raw and "autocert_trusted_ca_file" in raw:
        problems.append("autocert_trusted_ca, autocert_trusted_ca_file: both are set; give only one "
                        "(base64 of a PEM bundle, or the path of a PEM file)")
    else:
        scalar("autocert_trusted_ca", parse_trusted_ca_base64)
        if "autocert_trusted_ca_file" in raw:
            try:
                data, p = _read_pem_source(raw["autocert_trusted_ca_file"], base_dir)
                out["autocert_trusted_ca"] = _pem_bundle(data, repr(p or "inline PEM"))
            except _Bad as e:
                problems.append(f"{labels['autocert_trusted_ca_file']}: {e}")
    if "autocert_trusted_ca" in out:
        out["autocert_trusted_ca_pem"] = out.pop("autocert_trusted_ca")

    if "autocert_dir" in raw and str(raw["autocert_dir"]).strip():
        scalar("autocert_dir", lambda v: parse_autocert_dir(v, base_dir))
    else:
        out["autocert_dir"] = default_autocert_dir(environ, _home_from_passwd)

    # cross-checks
    addr, redirect = out.get("address", Options.address), out.get("http_redirect_addr")
    if redirect is not None and redirect.port == addr.port and (
            redirect.host == addr.host or "" in (redirect.host, addr.host)):
        problems.append(f"{labels['http_redirect_addr']}: {str(redirect)!r} overlaps address {str(addr)!r}; "
                        f"use another port, e.g. \":80\"")
    if out.get("autocert_must_staple") and out.get("autocert") and \
            out["autocert_ca"] in (LETS_ENCRYPT_PRODUCTION, LETS_ENCRYPT_STAGING):
        warnings.append("autocert_must_staple: Let's Encrypt refuses must-staple orders since 2025; "
                        "issuance from it will fail")

    if not out.get("routes"):
        warnings.append("routes: none configured; the proxy starts and answers every request with 404")

    if problems:
        raise ConfigError(problems)
    return Options(**out, source=str(path) if path else "", warnings=tuple(warnings))
