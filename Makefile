# Two commands set everything up on a fresh machine (see README.md):
#   make run    the main job: build MoE ResNet-18 and its dense twin, print cost and speed
#   make test   the test suite (what .ci/run runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test train bench models clean

# pip takes torch 2.14.1 / torchvision 0.29.1 from this machine's disk (pinned in pyproject.toml).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[cpu,dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/advmoe bench sparse --archs resnet18

test: install
	$(BIN)/python -m pytest -q

# The fmnist-tiny preset end to end (about 10 minutes on 2 cores); resumes a run that was cut off.
RUN := runs/fmnist-tiny
train: $(RUN)/best/model.safetensors

$(RUN)/best/model.safetensors: | install
	$(BIN)/advmoe train --preset fmnist-tiny --out $(RUN) $(if $(wildcard $(RUN)/config.json),--resume)

bench: install
	$(BIN)/advmoe bench sparse

models: install
	$(BIN)/advmoe models

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
