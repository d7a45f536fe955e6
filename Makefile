# make venv   create .venv with requirements.txt and the project (which builds the kernels)
# make demo   write the synthetic shapes data, train on it (about 10 min from a fresh clone on 2 CPU cores), evaluate, draw
# make test   run the tests (sets up .venv first if needed)
# make bench  run the kernel benchmarks against torchvision
# make gpu-check   the one prepared GPU run (bench/gpu_check.py); make gpu-wheels fetches what the
#                  network-less GPU machine lacks into .whl/ (see the README, "On a GPU")
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
KERNEL_SOURCES := $(wildcard nms/csrc/* roialign/csrc/*)

.PHONY: venv demo test bench gpu-check gpu-wheels lint clean

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

gpu-check: venv
	$(PY) bench/gpu_check.py

# Wheels for the GPU machine's Python 3.12 of the packages its image lacks (pycocotools; faster-coco-eval for Boundary AP).
GPU_WHEELS := pycocotools faster-coco-eval==1.8.0
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf build *.egg-info nms/*.so roialign/*.so
