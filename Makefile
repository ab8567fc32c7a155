# freeze-proxy — every entry point a person or CI uses. `make demo` and `make test` set up
# everything they need themselves (apt packages, the Python package, Go-built test binaries).
PYTHON ?= python3
APT_PACKAGES := containerd runc busybox-static wrk containernetworking-plugins debootstrap \
	apache2-utils curl docker.io nftables iproute2 prometheus
PIP_EXTRAS := fast,daemon,webhook,test
STAMP := .setup.stamp

.PHONY: setup demo test lint check-protos protos k8s-bins rootfs bench reliability images clean

# Idempotent: installs only what is missing, so a warm run costs about a second.
setup: $(STAMP)
$(STAMP): pyproject.toml
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	$(PYTHON) -m pip install -q -e ".[$(PIP_EXTRAS)]"
	@touch $(STAMP)

# The README's first command: the local demo on a real containerd. ARGS=--keep leaves it running;
# ARGS=--cluster runs it on a real single-node Kubernetes with Knative Serving.
demo: setup
	@case " $(ARGS) " in *" --cluster "*) $(MAKE) --no-print-directory k8s-bins rootfs ;; esac
	$(PYTHON) -m testbed.demo $(ARGS)

# The README's test command (CI runs exactly this): lint, types, stubs, then every test.
test: setup lint check-protos k8s-bins rootfs
	$(PYTHON) -m pytest -q --durations=30 $(PYTEST_ARGS)

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check freeze_proxy daemon webhook bounded testbed bench reliability tests examples
	$(PYTHON) -m mypy

# Regenerate the committed gRPC stubs from our own .proto files.
protos:
	scripts/gen_protos.sh

# Fails when the committed stubs differ from what the .proto files generate.
check-protos:
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	scripts/gen_protos.sh "$$tmp" 2>/dev/null; \
	for f in "$$tmp"/daemon/_proto/*; do \
	  cmp -s "$$f" "daemon/_proto/$$(basename "$$f")" || \
	    { echo "daemon/_proto/$$(basename "$$f") is stale: run 'make protos' and commit it"; exit 1; }; \
	done; echo "protos: committed stubs match"

# etcd, the Kubernetes binaries (a real node's too), CoreDNS and Knative Serving, built from Go
# modules and cached outside the repo (/var/cache/freeze-proxy), keyed by version: only a cold
# machine pays.
k8s-bins:
	scripts/build_k8s.sh

# The Debian root filesystems (sleeptalker's: python3 + aiohttp; the images' Python base), cached by key outside
# the repo: built before the tests so no test's time limit has to cover debootstrap.
rootfs: setup
	$(PYTHON) -m testbed.rootfs
	$(PYTHON) -m testbed.rootfs --images-base

bench: setup
	$(PYTHON) -m bench.run $(ARGS)

# Soak (ARGS=--minutes=N, default 10; --seed to replay), 1,000 connections, 100 pods, then the
# fault and fuzz tests' figures: one table, bench/out/reliability.json (README: Reliability).
reliability: setup k8s-bins rootfs
	$(PYTHON) -m reliability.run $(ARGS)

images:
	scripts/build_images.sh

clean:
	rm -rf $(STAMP) build *.egg-info .mypy_cache .ruff_cache .pytest_cache bench/out
