"""Configuration: a YAML file plus environment variables -> one validated, immutable Options.

Pomerium's keys and rules: every key has an environment variable of the same name in upper
case (``autocert`` / ``AUTOCERT``), the environment wins over the file, booleans parse
loosely. Every problem found is collected; ``ConfigError.problems`` lists them all, each
naming the key, the value and what would be accepted. Pure: reads the files it is pointed
at (config, certificates) and nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

LETS_ENCRYPT_PRODUCTION = "https://acme-v02.api.letsencrypt.org/directory"
LETS_ENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"


class ConfigError(Exception):
    """The configuration cannot be used. ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


@dataclass(frozen=True)
class Address:
    host: str  # "" means every interface
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Upstream:
    scheme: str  # "http" (only plain HTTP upstreams for now)
    host: str
    port: int

    @property
    def authority(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class DirectResponse:
    status: int
    body: str


@dataclass(frozen=True)
class Route:
    from_url: str            # as written, e.g. "https://app.example.com/api"
    scheme: str              # "https" or "http"
    host: str                # lower case, no port; may start with "*." (wildcard)
    path_prefix: str         # "/" when the route has no path
    to: tuple[Upstream, ...]  # empty when ``response`` is set
    preserve_host_header: bool = False
    response: Optional[DirectResponse] = None


@dataclass(frozen=True)
class CertificatePair:
    cert_pem: bytes          # leaf first, then intermediates
    key_pem: bytes
    origin: str              # file path, or "certificates[0] (inline)"


@dataclass(frozen=True)
class Options:
    address: Address = Address("", 443)
    http_redirect_addr: Optional[Address] = None
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
    autocert_eab_mac_key: str = ""
    autocert_email: str = ""
    autocert_must_staple: bool = False
    autocert_trusted_ca_pem: bytes = b""       # from autocert_trusted_ca or autocert_trusted_ca_file
    autocert_use_staging: bool = False
    source: str = ""                           # path of the config file


def load_config(path: Optional[str], environ: Mapping[str, str]) -> Options:
    """Read ``path`` (YAML, may be None) and ``environ``; return Options or raise ConfigError."""
    raise NotImplementedError
