# cnnbatch — `make help` lists the targets. Every target installs what is missing first (a .venv here).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CNNBATCH := $(VENV)/bin/cnnbatch
STAMP := $(VENV)/.installed

# Variables for the job targets (override on the command line: make extract INPUT=s3://bucket/images ...)
DATA ?= data
INPUT ?= $(DATA)/sample/train
OUTPUT ?= $(DATA)/features
BACKBONE ?= vgg16
WEIGHTS ?= imagenet
IMAGE_SIZE ?=
WORKERS ?=
EXTRA ?=
MODEL ?= $(DATA)/model
FEATURES ?= $(DATA)/features
# The local Ray head of `make ray-head`, and where `make submit-train` sends jobs (its dashboard's URL)
RAY_PORT ?= 6379
RAY_DASHBOARD_PORT ?= 8265
RAY_AGENT_PORT ?= 52365
RAY_CLIENT_PORT ?= 10001
RAY_ADDRESS ?= http://127.0.0.1:$(RAY_DASHBOARD_PORT)
RAY_AUTH_MODE ?= token
TOP_K ?= 1
IMAGE ?=
# predict reads new images and writes predictions: its own defaults unless INPUT / OUTPUT are given
PREDICT_INPUT = $(if $(filter file,$(origin INPUT)),$(DATA)/sample/holdout,$(INPUT))
FINETUNE_OUTPUT = $(if $(filter file,$(origin OUTPUT)),$(DATA)/model-finetuned,$(OUTPUT))
PREDICT_OUTPUT = $(if $(filter file,$(origin OUTPUT)),$(DATA)/predictions,$(OUTPUT))

.PHONY: help install demo test test-fast lint extract validate-k8s predict train finetune ray-head ray-stop submit-train

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,s3]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv with the project and its test extras

demo: install ## the whole pipeline on a generated sample, offline: extract -> train -> predict -> report
	$(PY) -m cnnbatch.demo --root $(DATA)

test: install lint validate-k8s ## lint, validate the Kubernetes manifests, then run the whole test suite
	$(PY) -m pytest

test-fast: install ## the unit tests (tests/test_<module>.py): no Ray, no CLI subprocesses (under a minute)
	$(PY) -m pytest tests --ignore=tests/integration -q -p no:cacheprovider -n 2

lint: install ## ruff (lint + import order) and mypy on cnnbatch/
	$(VENV)/bin/ruff check cnnbatch jobs tests bench k8s
	$(VENV)/bin/mypy

validate-k8s: install ## validate the manifests in k8s/ offline (core kinds strictly; KubeRay CRDs from ../shared)
	$(PY) -m k8s.validate

extract: install ## extract features: make extract INPUT=... OUTPUT=... BACKBONE=vgg16 WEIGHTS=imagenet
	$(CNNBATCH) extract --input $(INPUT) --output $(OUTPUT) --backbone $(BACKBONE) --weights $(WEIGHTS) \
		$(if $(WORKERS),--workers $(WORKERS)) $(if $(IMAGE_SIZE),--image-size $(IMAGE_SIZE)) $(EXTRA)

predict: install ## bulk-predict: make predict INPUT=... MODEL=... OUTPUT=... [TOP_K=3]; one image: IMAGE=x.jpg
	$(CNNBATCH) predict --model $(MODEL) --top-k $(TOP_K) \
		$(if $(IMAGE),--image $(IMAGE),--input $(PREDICT_INPUT) --output $(PREDICT_OUTPUT) $(if $(WORKERS),--workers $(WORKERS))) $(EXTRA)

train: install ## train a classifier head: make train FEATURES=data/features MODEL=data/model [EXTRA="--head linear"]
	$(CNNBATCH) train --features $(FEATURES) --output $(MODEL) $(EXTRA)

finetune: install ## fine-tune the backbone's top blocks: make finetune INPUT=... MODEL=data/model OUTPUT=data/model-ft [EXTRA=...]
	$(CNNBATCH) finetune --input $(INPUT) --model $(MODEL) --output $(FINETUNE_OUTPUT) $(EXTRA)

# A submitted entrypoint runs with the head's environment: the head starts with .venv/bin first on PATH so that
# `python -m jobs.train` has the project. Token auth: the token is ~/.ray/auth_token (created here if missing).
ray-head: install ## start a local Ray head with token auth and the project's Python (RAY_PORT, RAY_*_PORT)
	@PATH="$(CURDIR)/$(VENV)/bin:$$PATH" RAY_AUTH_MODE=token $(VENV)/bin/ray get-auth-token --generate >/dev/null
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" RAY_AUTH_MODE=token $(VENV)/bin/ray start --head --port $(RAY_PORT) \
		--dashboard-host 127.0.0.1 --dashboard-port $(RAY_DASHBOARD_PORT) --dashboard-agent-listen-port $(RAY_AGENT_PORT) \
		--ray-client-server-port $(RAY_CLIENT_PORT) --disable-usage-stats

ray-stop: install ## stop Ray on this machine (ray stop: every Ray process of this user here)
	$(VENV)/bin/ray stop

.PHONY: bench
bench: install ## measure the performance figures side by side (~16 min on 2 cores) into docs/benchmarks.md
	$(PY) -m bench.run

submit-train: install ## submit train to RAY_ADDRESS (starts nothing): make submit-train FEATURES=... MODEL=...
	RAY_AUTH_MODE=$(RAY_AUTH_MODE) $(VENV)/bin/ray job submit --address $(RAY_ADDRESS) --working-dir . -- \
		python -m jobs.train --features $(FEATURES) --output $(MODEL) $(EXTRA)
