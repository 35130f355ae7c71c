# One venv, one install step; every target below depends on it.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
GEN_DIR := clients/python/allocator_client/v1

.PHONY: install proto serve demo test lint bench clean

$(STAMP): pyproject.toml clients/python/pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e './clients/python' -e '.[dev,bench]'
	@touch $(STAMP)

install: $(STAMP)

# Regenerate the gRPC stubs from proto/ into the client package.
proto: $(STAMP)
	$(BIN)/python -m allocator_client.codegen

# Stubs are checked in; regenerated only when the .proto is newer (codegen is deterministic).
$(GEN_DIR)/allocator_pb2.py: proto/allocator/v1/allocator.proto | $(STAMP)
	$(BIN)/python -m allocator_client.codegen

serve: $(STAMP) $(GEN_DIR)/allocator_pb2.py
	$(BIN)/allocator serve

demo: $(STAMP) $(GEN_DIR)/allocator_pb2.py
	$(BIN)/python -m allocator.demo

lint: $(STAMP)
	$(BIN)/ruff check allocator clients/python benchmarks tests
	$(BIN)/ruff format --check --exclude '*.md' allocator clients/python benchmarks tests
	$(BIN)/mypy allocator clients/python/allocator_client benchmarks tests

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) build *.egg-info
