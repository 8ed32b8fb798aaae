"""`autocert-proxy certs` and `autocert-proxy renew`: the state of every certificate, read from
the configuration and the storage a running proxy uses."""
from __future__ import annotations

import datetime as dt
import sys
from typing import Mapping, Sequence

from cryptography.x509.oid import NameOID

from .config import Options
from .storage import NotFound, StorageError, open_storage
from .tls.certcache import MANUAL, Certificate, CertificateCache, CertificateProblem


def _fmt(t) -> str:
    if not t:
        return "-"
    if isinstance(t, (int, float)):
        t = dt.datetime.fromtimestamp(t, dt.timezone.utc)
    return t.strftime("%Y-%m-%d %H:%M:%SZ")


def _issuer_cn(cert: Certificate) -> str:
    attrs = cert.leaf.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else cert.leaf.issuer.rfc4514_string()


async def collect(options: Options) -> list[dict]:
    from .app import manual_certificates
    from .autocert import layout
    from .autocert.issuer import issuer_id
    from .autocert.manager import NameState, wanted_names
    from .autocert.schedule import renewal_time

    cache = CertificateCache()
    cache.replace_manual(manual_certificates(options))
    now = dt.datetime.now(dt.timezone.utc)
    rows = []
    for c in cache.all():
        rows.append({"name": ",".join(c.names), "source": MANUAL, "issuer": _issuer_cn(c),
                     "not_after": _fmt(c.not_after), "next_renewal": "-",
                     "last_error": "EXPIRED" if c.expired(now) else "-", "next_attempt": "-"})
    if not options.autocert:
        return rows
    storage = open_storage(options.autocert_dir)
    issuer = issuer_id(options.autocert_ca)
    try:
        for n in wanted_names(options, cache, now):
            row = {"name": n, "source": "acme", "issuer": "-", "not_after": "-", "next_renewal": "-",
                   "last_error": "-", "next_attempt": "-"}
            try:
                cert = Certificate(chain_pem=await storage.load(layout.cert_key(issuer, n)),
                                   key_pem=await storage.load(layout.private_key_key(issuer, n)), source="acme")
                row.update(issuer=_issuer_cn(cert), not_after=_fmt(cert.not_after),
                           next_renewal=_fmt(renewal_time(cert.not_before, cert.not_after)))
            except NotFound:
                row["issuer"] = "(not obtained yet)"
            except (CertificateProblem, StorageError) as e:
                row["issuer"] = f"(unreadable: {e})"
            try:
                st = NameState.from_json(await storage.load(layout.state_key(issuer, n)))
                if st.last_error:
                    row["last_error"] = st.last_error
                if st.next_attempt:
                    row["next_attempt"] = _fmt(st.next_attempt)
            except (NotFound, StorageError):
                pass
            rows.append(row)
    finally:
        await storage.close()
    return rows


async def print_certificates(options: Options, environ: Mapping[str, str]) -> int:
    try:
        rows = await collect(options)
    except StorageError as e:
        print(f"autocert-proxy: {e}", file=sys.stderr)
        return 1
    cols = ["name", "source", "issuer", "not_after", "next_renewal", "next_attempt", "last_error"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) if rows else len(c) for c in cols[:-1]}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols[:-1]) + "  LAST_ERROR")
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols[:-1]) + "  " + str(r["last_error"]))
    return 0


async def request_renewal(options: Options, names: Sequence[str]) -> int:
    from .autocert import layout
    from .autocert.issuer import issuer_id
    from .autocert.manager import wanted_names

    if not options.autocert:
        print("autocert-proxy: autocert is off in this configuration", file=sys.stderr)
        return 2
    cache = CertificateCache()
    wanted = wanted_names(options, cache)
    targets = list(names) or wanted
    unknown = [n for n in targets if n not in wanted]
    if unknown:
        print(f"autocert-proxy: not managed by autocert: {', '.join(unknown)}", file=sys.stderr)
        return 2
    storage = open_storage(options.autocert_dir)
    issuer = issuer_id(options.autocert_ca)
    try:
        for n in targets:
            await storage.store(layout.renew_request_key(issuer, n), b"requested")
            print(f"renewal requested: {n}")
    except StorageError as e:
        print(f"autocert-proxy: {e}", file=sys.stderr)
        return 1
    finally:
        await storage.close()
    return 0
