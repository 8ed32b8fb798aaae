"""`autocert-proxy certs` and `autocert-proxy renew`: the state of every certificate, read from
the configuration and the storage a running proxy uses.

The OCSP column is asked live: for each certificate with an OCSP URL its responder is asked
(all at once, ``OCSP_TIMEOUT`` each) and the answer verified: good / revoked / unknown /
error ("-": no OCSP URL). Revocation and errors are spelled out in LAST_ERROR."""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import socket
import sys
import time
import uuid
from typing import Mapping, Optional, Sequence

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


def _fmt_span(span: dt.timedelta) -> str:
    """A lifetime, the two largest units: 90d, 6d16h, 12h, 45m (to the nearest minute: many
    CAs end a certificate a second before a round lifetime)."""
    minutes = int((span.total_seconds() + 30) // 60)
    parts = [(minutes // 1440, "d"), (minutes % 1440 // 60, "h"), (minutes % 60, "m")]
    shown = [f"{n}{u}" for n, u in parts if n]
    return "".join(shown[:2]) or "0m"


def _profile(meta: bytes) -> str:
    try:
        return str(json.loads(meta)["issuer_data"].get("profile") or "-")
    except (ValueError, TypeError, KeyError, AttributeError):
        return "-"


OCSP_TIMEOUT = 3.0   # s per responder asked by `certs` (it must not hang on a dead one)


async def ocsp_check(cert: Certificate, timeout: float = OCSP_TIMEOUT, session=None) -> tuple[str, str]:
    """Ask the certificate's OCSP responder now and verify the answer.

    Returns (column, detail): column is "-" (no OCSP URL), "good", "revoked", "unknown" or
    "error"; detail is a sentence for LAST_ERROR ("" when there is nothing to say).
    """
    from .tls.ocsp import GOOD, REVOKED, OCSPError, build_request, fetch, issuer_of, verify_response

    url = cert.ocsp_url   # read from the leaf once, when the Certificate was made
    if url is None:
        return "-", ""
    issuer = issuer_of(cert)
    if issuer is None:
        return "error", f"OCSP: chain has no issuer certificate, cannot ask {url}"
    try:
        der = await fetch(url, build_request(cert.leaf, issuer), timeout, session=session)
        result = verify_response(der, cert.leaf, issuer)
    except OCSPError as e:
        msg = str(e)
        return "error", msg if msg.startswith("OCSP") else f"OCSP: {msg}"
    except Exception as e:   # a status command reports, it does not crash
        return "error", f"OCSP: {url}: {type(e).__name__}: {e}"
    if result.status == GOOD:
        return GOOD, ""
    if result.status == REVOKED:
        since = _fmt(result.revocation_time) if result.revocation_time else "unknown time"
        return REVOKED, f"REVOKED since {since} according to {url}"
    return "unknown", f"OCSP: responder {url} does not know this certificate"


async def _ocsp_columns(rows: list[dict], certs: list[Optional[Certificate]]) -> None:
    """Fill the OCSP column (and LAST_ERROR) of each row, all responders asked concurrently."""
    targets = [(r, c) for r, c in zip(rows, certs) if c is not None]
    for r in rows:
        r.setdefault("ocsp", "-")
    if not targets:
        return
    import aiohttp

    session = aiohttp.ClientSession()
    try:
        results = await asyncio.gather(*(ocsp_check(c, session=session) for _, c in targets))
    finally:
        await session.close()
    for (row, _), (col, detail) in zip(targets, results):
        row["ocsp"] = col
        if detail:
            row["last_error"] = detail if row["last_error"] == "-" else f"{row['last_error']}; {detail}"


async def collect(options: Options) -> list[dict]:
    from .app import manual_certificates
    from .autocert import layout
    from .autocert.issuer import issuer_id
    from .autocert.manager import NameState, load_stored_certificate, wanted_names
    from .autocert.schedule import parse_ari_record, plan_renewal, window_point

    cache = CertificateCache()
    cache.replace_manual(manual_certificates(options))
    now = dt.datetime.now(dt.timezone.utc)
    rows: list[dict] = []
    certs: list[Optional[Certificate]] = []
    for c in cache.all():
        certs.append(c)
        rows.append({"name": ",".join(c.names), "source": MANUAL, "issuer": _issuer_cn(c),
                     "profile": "-", "lifetime": _fmt_span(c.not_after - c.not_before),
                     "not_after": _fmt(c.not_after), "ari_window": "-", "next_renewal": "-",
                     "renewal_by": "-", "last_error": "EXPIRED" if c.expired(now) else "-",
                     "next_attempt": "-"})
    if not options.autocert:
        await _ocsp_columns(rows, certs)
        return rows
    storage = open_storage(options.autocert_dir)
    issuer = issuer_id(options.autocert_ca)
    try:
        for n in wanted_names(options, cache, now):
            row = {"name": n, "source": "acme", "issuer": "-", "profile": "-", "lifetime": "-",
                   "not_after": "-", "ari_window": "-", "next_renewal": "-", "renewal_by": "-",
                   "last_error": "-", "next_attempt": "-"}
            obtained = None
            try:
                cert = await load_stored_certificate(storage, issuer, n)
                serial = cert.leaf.serial_number
                known, window = False, None
                try:
                    known, window = parse_ari_record(await storage.load(layout.ari_key(issuer, n)), serial)
                except NotFound:
                    pass
                try:
                    row["profile"] = _profile(await storage.load(layout.meta_key(issuer, n)))
                except NotFound:
                    pass
                # the manager's own rule (schedule.plan_renewal), with the window it was given
                plan = plan_renewal(cert.not_before, cert.not_after, window, now=now, point=window_point(serial))
                row.update(issuer=_issuer_cn(cert), not_after=_fmt(cert.not_after),
                           lifetime=_fmt_span(cert.not_after - cert.not_before),
                           ari_window=(f"{_fmt(window[0])} .. {_fmt(window[1])}" if window else
                                       "none (CA has no ARI)" if known else "-"),
                           next_renewal=_fmt(plan.at), renewal_by=plan.source)
                obtained = cert
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
            certs.append(obtained)
    finally:
        await storage.close()
    await _ocsp_columns(rows, certs)
    return rows


async def print_certificates(options: Options, environ: Mapping[str, str]) -> int:
    try:
        rows = await collect(options)
    except StorageError as e:
        print(f"autocert-proxy: {e}", file=sys.stderr)
        return 1
    cols = ["name", "source", "issuer", "profile", "lifetime", "not_after", "ari_window", "next_renewal",
            "renewal_by", "ocsp", "next_attempt", "last_error"]
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
            # unique: each request brings one attempt at once, even one made before
            request = f"requested at {time.time():.3f} by {socket.gethostname()}:{os.getpid()} {uuid.uuid4().hex}"
            await storage.store(layout.renew_request_key(issuer, n), request.encode())
            print(f"renewal requested: {n}")
    except StorageError as e:
        print(f"autocert-proxy: {e}", file=sys.stderr)
        return 1
    finally:
        await storage.close()
    return 0
