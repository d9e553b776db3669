# Entry points. Every target runs the idempotent setup first, so each works on a fresh machine.
#   make demo    the main job (see README)
#   make test    formatting, lints and the whole test suite
#   make setup   install OpenMPI, libclang and libtorch 2.11.0 (COSINE_WITH_CUDA=1 adds CUDA + NCCL)
#   make bench   benchmarks against PyTorch, raw MPI and Pillow -> bench/RESULTS.md
SHELL := /bin/bash
ENV := source launch/env.sh
CARGO_FEATURES ?=

.PHONY: setup build demo test lint fmt bench

setup:
	@bash launch/setup.sh

build: setup
	$(ENV) && cargo build --release --workspace $(CARGO_FEATURES)

demo: build
	$(ENV) && bash launch/demo.sh

lint: setup
	$(ENV) && cargo fmt --all -- --check
	$(ENV) && cargo clippy --workspace --all-targets $(CARGO_FEATURES) -- -D warnings

# Tests that cannot run here (the cluster tests need root) say so and are listed at the end.
test: lint
	@rm -f target/skipped-tests.txt
	$(ENV) && cargo test --workspace $(CARGO_FEATURES)
	@if [ -s target/skipped-tests.txt ]; then \
	  echo "skipped tests ($$(wc -l < target/skipped-tests.txt)):"; cat target/skipped-tests.txt; \
	else echo "skipped tests: none"; fi

# Benchmarks that print ratios against PyTorch, raw MPI and Pillow; writes bench/RESULTS.md.
bench: build
	$(ENV) && bash bench/run.sh

fmt:
	cargo fmt --all
