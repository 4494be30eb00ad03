# Two commands set everything up on a fresh machine (see README.md):
#   make run    the main job: export the robust Fashion-MNIST MoE model shipped in checkpoints/ and
#               serve it with BentoML on http://127.0.0.1:3000
#   make test   the whole test suite, Triton's included (what .ci/run runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run serve export test triton data train ship bench models clean

# pip takes torch 2.14.1 / torchvision 0.29.1 from this machine's disk (pinned in pyproject.toml).
# A current pip first: Python 3.11's venv brings pip 23.2, whose resolver took 47 s of the
# install to pip 26's 19 s (the whole install: 146 s against 110 s, upgrade included).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade 'pip>=25'
	$(BIN)/pip install --quiet -e '.[cpu,dev]'
	touch $(STAMP)

install: $(STAMP)

# The model `make run` serves: the robustness study's best MoE run (`python -m studies.frontier
# --ship checkpoints/fmnist-moe`, docs/frontier.md). `make run CHECKPOINT=checkpoints/fmnist-tiny`
# serves the small model `make train ship` makes instead.
CHECKPOINT ?= checkpoints/fmnist-moe
TINY := checkpoints/fmnist-tiny
RUN := runs/fmnist-tiny
# Each checkpoint is a BentoML model of its own name, so the one served is the one asked for.
MODEL = $(notdir $(CHECKPOINT))
EXPORT = runs/export/$(MODEL)
PORT ?= 3000

run: serve

# Export again when the checkpoint changed, or when the BentoML store lacks the model.
serve: $(EXPORT)/export.json
	@$(BIN)/python -c "import bentoml; bentoml.models.get('$(MODEL):latest')" >/dev/null 2>&1 || \
		$(BIN)/advmoe export $(CHECKPOINT) --out $(EXPORT) --format all --force --name $(MODEL)
	$(BIN)/advmoe serve --model-tag $(MODEL):latest --port $(PORT) --probe

export: $(EXPORT)/export.json

# metrics.json too: the card's figures (`advmoe study card`) travel in the export to /model_info.
$(EXPORT)/export.json: $(CHECKPOINT)/model.safetensors $(CHECKPOINT)/metrics.json | install
	$(BIN)/advmoe export $(CHECKPOINT) --out $(EXPORT) --format all --force --name $(MODEL)

# The small checkpoint is `make train`'s best epoch (chosen on validation PGD accuracy), made
# when missing; any other must come from where it was made.
ifeq ($(CHECKPOINT),$(TINY))
$(TINY)/model.safetensors:
	$(MAKE) train ship
else
$(CHECKPOINT)/model.safetensors:
	@echo "make: $(CHECKPOINT)/model.safetensors is missing. Restore the shipped one (git checkout -- $(CHECKPOINT)), \
	ship the study's best run there (python -m studies.frontier --ship $(CHECKPOINT)), or serve the small \
	model: make run CHECKPOINT=$(TINY)" >&2; exit 2
endif

ship: $(RUN)/best/model.safetensors
	rm -rf $(TINY) && mkdir -p $(dir $(TINY)) && cp -r $(RUN)/best $(TINY)

# The Triton client tests run a local Triton server from a venv of its own (nvidia-pytriton pins
# numpy 1.26): made once per machine in ~/.cache/advmoe (about 30 s) and shared by every clone;
# setup checks it in a second when it is there.
triton: install
	$(BIN)/python -m clients.triton_server setup

# Fashion-MNIST from Debian's package (the only data set the machine can have; tests read it).
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

data:
	@test -f $(FASHION_MNIST) || if [ "$$(id -u)" = 0 ]; then \
		apt-get update -q && apt-get install -y -q dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST is missing: sudo apt-get install dataset-fashion-mnist (its test skips without it)"; \
	fi

# The whole suite, Triton tests included.
# One pytest worker per core (at most 4), one compute thread each: the suite waits on servers and
# subprocesses as much as it computes, and two workers overlap those waits (8.7 min against 11 on 2 cores).
test: install triton data
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4

# The fmnist-tiny preset end to end (about 10 minutes on 2 cores); resumes a run that was cut off.
train: $(RUN)/best/model.safetensors

$(RUN)/best/model.safetensors: | install
	$(BIN)/advmoe train --preset fmnist-tiny --out $(RUN) $(if $(wildcard $(RUN)/config.json),--resume)

bench: install
	$(BIN)/advmoe bench sparse --archs resnet18

models: install
	$(BIN)/advmoe models

# The Triton venv in ~/.cache/advmoe is shared with other clones: clean leaves it.
clean:
	rm -rf $(VENV) .venv-triton *.egg-info .pytest_cache
