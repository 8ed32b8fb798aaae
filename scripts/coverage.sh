#!/bin/sh
# Branch coverage of the whole suite (coverage.py, configured in pyproject.toml), the proxy
# processes the tests start included, on the request path's Python source. Not part of test.sh.
# Extra arguments go to pytest instead of the whole suite. Then: the total, and the modules with
# the most branches never taken.
set -u
cd "$(dirname "$0")/.."
.venv/bin/python -m pip install -q 'coverage==7.18.0'
rm -f .coverage .coverage.*
export AUTOCERT_PROXY_PURE_PYTHON=1 COVERAGE_FILE="$PWD/.coverage"
status=0
.venv/bin/python -m coverage run -m pytest -q -p no:cacheprovider "$@" || status=$?
if [ $# -eq 0 ]; then
    # as scripts/test.sh: the proxy tests again with h11, the reference HTTP parser
    AUTOCERT_PROXY_HTTP_PARSER=h11 .venv/bin/python -m coverage run -m pytest -q -p no:cacheprovider \
        tests/test_proxy.py tests/test_lifecycle.py tests/test_tls.py tests/test_metrics.py || status=$?
fi
.venv/bin/python -m coverage combine -q
.venv/bin/python -m coverage json -q -o .coverage.json
.venv/bin/python - <<'PY'
import json
files = json.load(open(".coverage.json"))["files"]
t = {k: sum(f["summary"][k] for f in files.values())
     for k in ("num_statements", "covered_lines", "num_branches", "covered_branches")}
print(f"lines {t['covered_lines']}/{t['num_statements']} = {100 * t['covered_lines'] / t['num_statements']:.1f} %, "
      f"branches {t['covered_branches']}/{t['num_branches']} = {100 * t['covered_branches'] / t['num_branches']:.1f} %")
print("most branches never taken:")
worst = sorted(files.items(), key=lambda kv: -kv[1]["summary"]["missing_branches"])[:12]
for name, f in worst:
    s = f["summary"]
    print(f"  {name:40} {s['missing_branches']:4} of {s['num_branches']:4} branches missed")
PY
exit $status
