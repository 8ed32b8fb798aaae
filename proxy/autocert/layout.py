"""Where autocert keeps things in storage: certmagic's layout, so a directory written by Caddy
or Pomerium is read without re-issuing. Pure.

    certificates/<issuer>/<name>/<name>.crt|.key|.json
    acme/<issuer>/users/<email or "default">/<local part or "default">.json|.key
    acme/<issuer>/challenge_tokens/<name>.json          (see challenges.storage_key)
    ocsp/<name>-<hash>                                   (the stapler's)
    autocert-proxy/<issuer>/<name>.state.json            (ours: failures, backoff)
    autocert-proxy/<issuer>/<name>.ari.json              (ours: the CA's renewal window, for `certs`)
    autocert-proxy/<issuer>/renew/<name>                 (ours: `autocert-proxy renew` requests)
    locks/issue_cert_<name>.lock                         (the storage backend's lock records)
"""
from __future__ import annotations

from .challenges import safe_key


def cert_prefix(issuer: str, name: str) -> str:
    n = safe_key(name)
    return f"certificates/{safe_key(issuer)}/{n}/{n}"


def cert_key(issuer: str, name: str) -> str:
    return cert_prefix(issuer, name) + ".crt"


def private_key_key(issuer: str, name: str) -> str:
    return cert_prefix(issuer, name) + ".key"


def meta_key(issuer: str, name: str) -> str:
    return cert_prefix(issuer, name) + ".json"


def _user(email: str) -> tuple[str, str]:
    email = email.strip().lower()
    if not email:
        return "default", "default"
    local = email.split("@", 1)[0] or "default"
    return safe_key(email), safe_key(local)


def account_key_key(issuer: str, email: str) -> str:
    folder, user = _user(email)
    return f"acme/{safe_key(issuer)}/users/{folder}/{user}.key"


def account_reg_key(issuer: str, email: str) -> str:
    folder, user = _user(email)
    return f"acme/{safe_key(issuer)}/users/{folder}/{user}.json"


def state_key(issuer: str, name: str) -> str:
    return f"autocert-proxy/{safe_key(issuer)}/{safe_key(name)}.state.json"


def ari_key(issuer: str, name: str) -> str:
    return f"autocert-proxy/{safe_key(issuer)}/{safe_key(name)}.ari.json"


def renew_request_prefix(issuer: str) -> str:
    return f"autocert-proxy/{safe_key(issuer)}/renew"


def renew_request_key(issuer: str, name: str) -> str:
    return f"{renew_request_prefix(issuer)}/{safe_key(name)}"


def lock_name(name: str) -> str:
    return f"issue_cert_{safe_key(name)}"
