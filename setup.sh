#!/usr/bin/env bash
# Create (or update) the project environment in .venv.
#   ./setup.sh          backend + Slicer-free tools (enough for `spine-ldm demo`)
#   ./setup.sh --test   + training, server and test dependencies, the reader app's NiiVue, headless Chromium
# Environment: PYTHON (default python3), TORCH_SPEC (default torch==2.13.0, the CPU build; for a GPU, install
# the CUDA build of torch into .venv first, see README "GPU"), SPINE_SKIP_APT=1 to never call apt-get.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
mode=${1:-}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
if [ "$mode" = "--test" ]; then
  # the panel's pins (SpineInpaint/Resources/requirements.txt) as constraints: the tests run on the versions a
  # Slicer user gets, and Testing/test_dependencies.py can check that list against their metadata
  .venv/bin/python -m pip install -q -e '.[train,serve,test]' -c SpineInpaint/Resources/requirements.txt
  if command -v npm >/dev/null; then
    (cd SpineInpaint/spine_ldm/study/web && npm ci --no-audit --no-fund --loglevel=error)
  else
    echo "setup: npm not found; the browser reader app tests will be skipped" >&2
  fi
  if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && [ -z "${SPINE_SKIP_APT:-}" ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install chromium; browser tests will be skipped" >&2
  fi
else
  .venv/bin/python -m pip install -q -e '.[serve]'
fi
echo "setup: environment ready in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
