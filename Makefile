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
	@# the whole recipe (trainer/recipes/demo.toml) on a crawl it generates; resumable: a rerun skips what is done
	$(BIN)/python -m trainer.recipe demo --out demo-out

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

bench: $(STAMP)
	@# The peers. mosaicml-streaming 0.13 pins numpy<2.2 and img2dataset webdataset<0.3, so pip would downgrade
	@# the stack: those two come without their pins, plus what they import, with the stack held by constraints.
	$(BIN)/pip freeze | grep -iE '^(numpy|torch|torchvision|polars|pyarrow|pillow|webdataset)==' > $(VENV)/bench-pins.txt
	$(BIN)/pip install -q -c $(VENV)/bench-pins.txt 'litdata>=0.2,<0.3' 'imagededup>=0.3' 'transformers>=4.21,<5' \
		brotli 'python-snappy>=0.6,<1' 'zstd>=1.5,<2' 'xxhash>=3,<4' 'catalogue>=2,<3' 'albumentations>=1.3,<2' \
		'opencv-python-headless>=4.5,<5' 'fire>=0.4,<0.8' 'pandas>=1.1,<3' 'exifread-nocycle>=3,<4' 'wandb>=0.17'
	$(BIN)/pip install -q --no-deps 'mosaicml-streaming>=0.13,<0.14' 'img2dataset>=1.45'
	$(BIN)/python -m benchmarks --scale $(or $(SCALE),full)

clean:
	rm -rf $(VENV) demo-out .pytest_cache
