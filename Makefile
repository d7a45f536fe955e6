# make venv   create .venv with requirements.txt and the project (which builds the kernels)
# make demo   write the synthetic shapes data, train on it (about 10 min on 2 CPU cores), evaluate, draw
# make test   run the tests (sets up .venv first if needed)
# make bench  run the kernel benchmarks against torchvision
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
KERNEL_SOURCES := $(wildcard nms/csrc/* roialign/csrc/*)

.PHONY: venv demo test bench lint clean

venv: $(VENV)/.requirements $(VENV)/.kernels

$(VENV)/.requirements: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.kernels: $(VENV)/.requirements setup.py extensions.py $(KERNEL_SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

demo: venv
	rm -rf runs/demo
	$(PY) train.py --config shapes --out runs/demo
	$(PY) visualize.py --weights runs/demo/last.pth --out runs/demo/pictures

test: venv
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

bench: venv
	$(PY) bench/bench_kernels.py

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf build *.egg-info nms/*.so roialign/*.so
