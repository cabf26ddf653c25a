# Carapace developer entry points. Only python3 (>= 3.11) and make are assumed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# A strict editable install: a tree of links under build/ on sys.path, edits
# show at once. The default mode loads setuptools' import finder (pathlib, re,
# urllib) in every Python start, ~10 ms that each shim run paid. New or
# removed modules need a reinstall, so the stamp also follows the package
# folders and their subpackages (a folder's mtime changes when a file is added
# or removed).
PACKAGES := protocol runtime server agent debug
PACKAGE_DIRS := $(shell find $(PACKAGES) -type d -not -name __pycache__)
EDITABLE := --config-settings editable_mode=strict

.PHONY: test demo lint bench clean test-interop

$(STAMP): pyproject.toml Makefile $(PACKAGE_DIRS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(EDITABLE) -e '.[dev]'
	touch $(STAMP)

# The real-tool tests run Debian's gh, and CLI tools run confined by bubblewrap
# (the confinement tests need it): each installed from Debian's packages if missing
# (as root); otherwise those tests skip and say why.
test: $(STAMP)
	@command -v gh >/dev/null 2>&1 \
	  || if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gh >/dev/null) \
	    || echo "installing gh failed: the real-gh tests will be skipped"; \
	  else echo "gh is missing and this is not root: the real-gh tests will be skipped"; fi
	@command -v bwrap >/dev/null 2>&1 \
	  || if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      bubblewrap >/dev/null) \
	    || echo "installing bubblewrap failed: the confinement tests will be skipped"; \
	  else echo "bubblewrap is missing and this is not root: the confinement tests will be skipped"; fi
	$(BIN)/python -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	$(BIN)/python -m carapace.debug.demo $(DEMO_ARGS)

# Benchmarks (never part of `make test`): direct vs ssh -L vs Carapace, one run.
# BENCH_ARGS, e.g. --quick, --only sse-latency, --json out.json, --png out.png.
BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet $(EDITABLE) -e '.[dev,bench]'
	touch $(BENCH_STAMP)

# The ssh -L column needs OpenSSH, the nginx upstream nginx: each installed from
# Debian's packages if missing (as root); otherwise that column or upstream is
# skipped and the run says why. uvicorn + sse-starlette come with the bench extra.
bench: $(BENCH_STAMP)
	@test -x /usr/sbin/sshd && command -v ssh >/dev/null 2>&1 \
	  || if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      openssh-server openssh-client >/dev/null) \
	    || echo "installing OpenSSH failed: the ssh -L column will be skipped"; \
	  else echo "OpenSSH is missing and this is not root: the ssh -L column will be skipped"; fi
	@(test -x /usr/sbin/nginx || command -v nginx >/dev/null 2>&1) \
	  || if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      nginx >/dev/null) \
	    || echo "installing nginx failed: the nginx upstream will be skipped"; \
	  else echo "nginx is missing and this is not root: the nginx upstream will be skipped"; fi
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

# Interop tests with clients nobody on this team wrote: curl, the npm eventsource
# package, headless Chromium, OpenClaw's Signal client, an sse-starlette upstream.
# Installs them first: the pip extra `interop`, the npm packages pinned in
# tests/interop/package-lock.json, and Debian's chromium if missing (as root).
INTEROP_STAMP := $(VENV)/.installed-interop
INTEROP_NODE  := tests/interop/node_modules/.installed

$(INTEROP_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet $(EDITABLE) -e '.[dev,interop]'
	touch $(INTEROP_STAMP)

$(INTEROP_NODE): tests/interop/package.json tests/interop/package-lock.json
	cd tests/interop && npm ci --ignore-scripts --no-audit --no-fund
	touch $(INTEROP_NODE)

test-interop: $(INTEROP_STAMP) $(INTEROP_NODE)
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
	  || if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "chromium is missing and this is not root: its tests will skip"; fi
	$(BIN)/python -m pytest -q -p no:cacheprovider -rs tests/interop

lint: $(STAMP)
	$(BIN)/ruff check protocol runtime server agent debug tests benchmarks
	$(BIN)/mypy --strict protocol
	$(BIN)/mypy runtime server
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
