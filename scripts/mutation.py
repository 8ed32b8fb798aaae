"""Mutation testing of the pure modules with mutmut (configured in pyproject.toml, [tool.mutmut]).

    .venv/bin/python scripts/mutation.py            # fresh run, then the report
    .venv/bin/python scripts/mutation.py --report   # the report of the last run (mutants/)
    .venv/bin/python scripts/mutation.py --diff     # ... with the diff of every survivor

mutmut copies proxy/ and tests/ into mutants/, writes every mutant of a function beside the
original behind a trampoline, learns which tests call which function, and runs those tests once
per mutant (forked, two at a time on two cores). The run is restricted to SCOPE below; the
report gives per module the mutants killed (a test failed, or they timed out) among those made,
and lists the survivors, marking the known equivalent ones (EQUIVALENT) with the reason no test
can tell them from the original. The request path's compiled modules are bypassed
(AUTOCERT_PROXY_PURE_PYTHON=1) so that the mutated sources are what runs.
"""
from __future__ import annotations

import argparse
import difflib
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MUTMUT = Path(sys.executable).parent / "mutmut"
VERSION = "3.8.1"

# module -> the mutant names (fnmatch patterns) measured in it
SCOPE = {
    "proxy/autocert/schedule.py": ["proxy.autocert.schedule.*"],
    "proxy/autocert/layout.py": ["proxy.autocert.layout.*"],
    "proxy/http/routes.py": ["proxy.http.routes.*"],
    "proxy/storage/__init__.py (locations)": [
        "proxy.storage.x_parse_location__*", "proxy.storage.x__s3_host__*",
        "proxy.storage.x__check_bucket__*", "proxy.storage.x_check_key__*", "proxy.storage.x__bad__*"],
    "proxy/tls/keymatch.py": ["proxy.tls.keymatch.*"],
    "proxy/config.py (parsers)": [
        "proxy.config.x_parse_*", "proxy.config.x__parse_*", "proxy.config.x_normalize_*"],
}

# (mutant name pattern, text of the mutated line, why no test can tell it from the original)
EQUIVALENT: list[tuple[str, str, str]] = [
    ("proxy.autocert.schedule.x_renewal_time__*", "if end >= start:",
     "a window of no length gives start + 0 * random(), which is start"),
    ("proxy.autocert.layout.x__user__*", 'email.split("@", )[0]',
     "the part before the first '@' does not depend on how many splits follow"),
    ("proxy.autocert.layout.x__user__*", 'email.split("@", 2)[0]',
     "the part before the first '@' does not depend on how many splits follow"),
    ("proxy.autocert.layout.x__user__*", 'or "DEFAULT"', "safe_key() lower-cases it"),
    ("proxy.http.routes.*_Rule*__init__*", "self.plain = None",
     "plain is a shortcut: a route without rules matches through matches() as well"),
    ("proxy.http.routes.*_Rule*__init__*", 'route.path_prefix == "XX/XX"',
     "plain is a shortcut: a route without rules matches through matches() as well"),
    ("proxy.http.routes.*RouteTable*match__*", "if (self._ported) or True",
     "the port is read only by routes that have one, and without them there are none"),
    ("proxy.http.routes.x_request_port__*", 'authority.find(b"]")',
     "digits after the last ':' hold no ']', whichever ']' is found"),
    ("proxy.http.routes.x_request_port__*", 'authority.rfind(b"XX]XX")',
     "an IPv6 literal ends in ']', so digits after its last ':' are never all digits anyway"),
    ("proxy.http.routes.x_upgrade_allowed__*", 'decode("LATIN-1")', "codec names are case-insensitive"),
    ("proxy.tls.keymatch.x__der__*", "// 8, )", "int.to_bytes is big-endian by default (Python >= 3.11)"),
    ("proxy.tls.keymatch.x__tlv__*", "b[i:i + k], )", "int.from_bytes is big-endian by default (Python >= 3.11)"),
    ("proxy.tls.keymatch.x__ec_parts__*", "if len(kids) < 3 or",
     "two elements hold no public key, which is refused a few lines below"),
    ("proxy.tls.keymatch.x__ec_parts__*", "if len(kids) <= 2 or",
     "two elements hold no public key, which is refused a few lines below"),
    ("proxy.config.x__parse_response__*", "ok = None", "None is false, as False is"),
    ("proxy.config.x__parse_response__*", 'value.get("body", None)', "None becomes \"\" on the next line"),
    ("proxy.config.x__parse_response__*", 'value.get("body", )', "None becomes \"\" on the next line"),
    ("proxy.config.x__parse_route_rules__*", "break",
     "'regex', whose branch this is, is the last of the keys looped over"),
    ("proxy.config.x_parse_routes__*", 'parsed_from = ""',
     "it stays unset only when a problem was recorded, and then the route is skipped anyway"),
    ("proxy.config.*", "allow_wildcard=None", "None is false, as False is"),
    ("proxy.config.x_normalize_hostname__*", 'encode("IDNA")', "codec names are case-insensitive"),
    ("proxy.config.x_normalize_hostname__*", 'decode("ASCII")', "codec names are case-insensitive"),
    ("proxy.config.x_normalize_hostname__*", 'rstrip("XX.XX")', "the name is lower-cased first: no 'X' is left"),
    ("proxy.config.x_normalize_mac_key__*", "(+len(bare) % 4)",
     "the decoder takes more padding than needed; where it differs (length 1 mod 4) both fail"),
]

KILLED = {1: "killed", 3: "killed"}
TIMEOUT = {36, -24, 24, 152, 255}


def patterns(only: str = "") -> list[str]:
    return [p for module, ps in SCOPE.items() if only in module for p in ps]


def run(fresh: bool, only: str = "") -> int:
    if not MUTMUT.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"mutmut=={VERSION}"], check=True)
    if fresh:
        shutil.rmtree(REPO / "mutants", ignore_errors=True)
    env = dict(os.environ, AUTOCERT_PROXY_PURE_PYTHON="1")
    return subprocess.run([str(MUTMUT), "run", *patterns(only)], cwd=REPO, env=env).returncode


def results() -> tuple[dict[str, int | None], dict[str, list[str]]]:
    """(exit code by mutant name, the mutated lines by mutant name as a unified diff)."""
    codes: dict[str, int | None] = {}
    diffs: dict[str, list[str]] = {}
    for meta in (REPO / "mutants").rglob("*.py.meta"):
        found = json.loads(meta.read_text())["exit_code_by_key"]
        codes.update(found)
        source = meta.with_suffix("")
        spans = json.loads(meta.with_suffix(".spans").read_text())["spans"]
        lines = source.read_text().splitlines()
        for name in found:
            local = name.rpartition(".")[2]
            orig = re.sub(r"__mutmut_\d+$", "__mutmut_orig", local)
            if local not in spans or orig not in spans:
                continue
            a, b = (lines[spans[k][0] - 1:spans[k][1]] for k in (orig, local))
            a = [l.replace(orig, local) for l in a]
            diffs[name] = list(difflib.unified_diff(a, b, lineterm="", n=1))[2:]
    return codes, diffs


def equivalent(name: str, lines: list[str]) -> str | None:
    for pattern, text, why in EQUIVALENT:
        if fnmatch.fnmatch(name, pattern) and any(text in line for line in lines):
            return why
    return None


def report(show_diff: bool, only: str = "") -> bool:
    codes, diffs = results()
    if not codes:
        print("no results in mutants/: run without --report first")
        return False
    total_made = total_killed = 0
    survivors: list[tuple[str, str]] = []
    print(f"{'module':42} {'mutants':>7} {'killed':>6} {'timeout':>7} {'survived':>8} {'score':>6}")
    for module, pats in SCOPE.items():
        if only not in module:
            continue
        names = sorted(n for n in codes if any(fnmatch.fnmatch(n, p) for p in pats))
        killed = sum(1 for n in names if codes[n] in KILLED)
        timeout = sum(1 for n in names if codes[n] in TIMEOUT)
        alive = [n for n in names if codes[n] not in KILLED and codes[n] not in TIMEOUT]
        survivors += [(n, module) for n in alive]
        total_made += len(names)
        total_killed += killed + timeout
        score = 100.0 * (killed + timeout) / len(names) if names else 0.0
        print(f"{module:42} {len(names):7} {killed:6} {timeout:7} {len(alive):8} {score:5.1f}%")
    score = 100.0 * total_killed / total_made if total_made else 0.0
    print(f"{'all':42} {total_made:7} {total_killed:6} {'':7} {total_made - total_killed:8} {score:5.1f}%")
    if survivors:
        print("\nsurvivors (exit code: 0 survived, 33 no test calls the function, None not run):")
    n_equivalent = 0
    for name, _ in survivors:
        diff = diffs.get(name, [])
        lines = [l[1:].strip() for l in diff if l.startswith("+")]
        why = equivalent(name, lines)
        n_equivalent += why is not None
        print(f"  {name} [{codes[name]}]" + (f"  equivalent: {why}" if why else ""))
        if show_diff:
            print("    " + "\n    ".join(diff))
        elif lines:
            print(f"      + {lines[0][:110]}")
    print(f"\n{total_killed} of {total_made} killed ({score:.1f} %); "
          f"{n_equivalent} of {len(survivors)} survivors known equivalent")
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", action="store_true", help="only report the last run")
    ap.add_argument("--diff", action="store_true", help="show each survivor's diff")
    ap.add_argument("--keep", action="store_true", help="reuse mutants/ (mutmut's cached results)")
    ap.add_argument("--only", default="", metavar="TEXT", help="the modules of SCOPE whose name has TEXT")
    args = ap.parse_args()
    if not args.report:
        run(fresh=not args.keep, only=args.only)
    return 0 if report(args.diff, args.only) else 1


if __name__ == "__main__":
    sys.exit(main())
