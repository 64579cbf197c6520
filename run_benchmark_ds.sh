#!/usr/bin/env bash
# One-click ds-benchmark sweep driven by env vars; see docs/sweeps.md.
PYTHONPATH="$(cd "$(dirname "$0")" && pwd)${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python}" -m llmbench.sweep --kind ds-benchmark "$@"
