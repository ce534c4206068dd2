#!/usr/bin/env bash
# Set up a fresh machine for the test suite, then run it: torch's CPU wheel first (a bare torch requirement would
# pull a multi-GB CUDA build), then the project with its test extras. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --disable-pip-version-check -q torch==2.13.0
python -m pip install --disable-pip-version-check -q -e ".[test]"
exec python -m pytest "$@"
