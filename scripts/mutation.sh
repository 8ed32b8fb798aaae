#!/bin/sh
# Mutation testing of the pure modules with mutmut: scripts/mutation.py (--report, --diff).
cd "$(dirname "$0")/.." && exec "${PYTHON:-.venv/bin/python}" scripts/mutation.py "$@"
