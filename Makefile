# Two commands from a fresh clone: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint bench install clean

$(STAMP): pyproject.toml
	@echo "installing into $(VENV): about 7.5 GB (CUDA builds of torch and DALI, which also run on CPU), 5-10 minutes"
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --progress-bar on -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m wvdata.demo --out demo-out
	$(BIN)/python -m trainer.train --data demo-out/dataset --view clean --model test_resnet \
		--image-size 64 --epochs 3 --batch-size 32 --lr 2.0 --workers 2 --eval-crops 5 \
		--crop-scale 0.35,1 --aum --no-progress --out demo-out/run
	@echo "demo done: dataset demo-out/dataset, dedup report demo-out/dedup.html, run demo-out/run"
	@echo "(the training step is a 3-epoch smoke run of the trainer on 300 images: too few to learn;"
	@echo " tests/test_trainer.py trains to >= 60% val top-1 on scikit-learn's digits)"

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

bench: $(STAMP)
	$(BIN)/python -m benchmarks.build_bench
	$(BIN)/python -m benchmarks.stream_bench
	$(BIN)/python -m benchmarks.dedup_bench
	$(BIN)/python -m benchmarks.train_bench
	$(BIN)/python -m benchmarks.verify_bench
	$(BIN)/python -m benchmarks.curriculum_bench
	$(BIN)/python -m benchmarks.aum_bench
	$(BIN)/python -m benchmarks.ensemble_bench

clean:
	rm -rf $(VENV) demo-out .pytest_cache
