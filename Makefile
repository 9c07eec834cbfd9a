# The two commands a new user needs: `make demo` and `make test`. Both install
# what is missing (idempotent: a second run reinstalls nothing) and then run.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.tierfl-installed
# Debian packages: Fashion-MNIST ships as a Debian package (no downloads at run time);
# tests start their own mosquitto and talk to the gateway with libcoap's coap-client.
DEBS := dataset-fashion-mnist mosquitto mosquitto-clients libcoap3-bin
DEMO_OUT ?= runs/demo

.PHONY: demo test bench lint install sysdeps clean

install: $(STAMP) sysdeps

# torch goes in first and pinned: an unpinned resolve pulls a multi-GB CUDA build.
# CrypTen 0.4.1 is dormant: its metadata wants the deprecated `sklearn` package and
# torchvision, so it goes in without dependencies, plus the few it really uses
# (cloud/crypten_shim.py makes it import on torch 2.13).
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "installing torch==2.13.0 (CPU) and tierfl into $(VENV) ..."
	@$(PIP) install torch==2.13.0
	@$(PIP) install -e '.[emulation,dev]' torch==2.13.0
	@$(PIP) install --no-deps crypten==0.4.1 torch==2.13.0
	@$(PIP) install omegaconf pyyaml scipy onnx torch==2.13.0
	@touch $@

# Checked every time (dpkg -s is fast), so a package added here reaches existing checkouts.
sysdeps:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

demo: install
	$(VENV)/bin/tierfl emulate topologies/metro-5g.graphml --dataset har --rounds 30 --epochs 5 \
	    --strategy fedavgm --seed 0 --out $(DEMO_OUT)
	@echo "report and plots in $(DEMO_OUT)/ (report.json, accuracy_vs_time.png, latency_breakdown.png)"

# pytest exit code 5 means "no tests collected": not a failure of the code, but
# also never a pass by itself — we print it and fail only on real failures.
test: install
	@set +e; $(VENV)/bin/pytest -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

bench: install
	$(PY) bench/bench_cohort.py
	$(PY) bench/bench_accuracy.py
	$(PY) bench/bench_scale.py
	$(PY) bench/bench_realtime.py
	$(PY) bench/bench_smpc.py --quick
	$(PY) bench/bench_smpc_rounds.py
	$(PY) bench/bench_device_shares.py
	$(PY) bench/bench_gateway.py
	$(PY) bench/bench_vs_peers.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy devices gateway cloud hierarchy

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
