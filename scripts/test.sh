#!/usr/bin/env bash
# Set up a fresh machine for the test suite, then run it: torch's CPU wheel first (a bare torch requirement would
# pull a multi-GB CUDA build), then the project with its test extras, then Debian's chromium for the browser tests
# (Playwright cannot download browsers here). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the browser tests will be skipped" >&2
fi
exec python -m pytest "$@"
