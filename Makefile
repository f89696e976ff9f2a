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
WORKERS ?= 1
EXTRA ?=
MODEL ?= $(DATA)/model
TOP_K ?= 1
IMAGE ?=
# predict reads new images and writes predictions: its own defaults unless INPUT / OUTPUT are given
PREDICT_INPUT = $(if $(filter file,$(origin INPUT)),$(DATA)/sample/holdout,$(INPUT))
PREDICT_OUTPUT = $(if $(filter file,$(origin OUTPUT)),$(DATA)/predictions,$(OUTPUT))

.PHONY: help install demo test extract validate-k8s predict

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,s3]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv with the project and its test extras

demo: install ## the whole pipeline on a generated sample: extract features (more stages as they land)
	$(PY) -m cnnbatch.demo --root $(DATA)

test: install validate-k8s ## run the whole test suite (the Kubernetes manifests' validation first)
	$(PY) -m pytest

validate-k8s: install ## validate the manifests in k8s/ offline (core kinds strictly; KubeRay CRDs from ../shared)
	$(PY) k8s/validate.py

extract: install ## extract features: make extract INPUT=... OUTPUT=... BACKBONE=vgg16 WEIGHTS=imagenet
	$(CNNBATCH) extract --input $(INPUT) --output $(OUTPUT) --backbone $(BACKBONE) --weights $(WEIGHTS) \
		--workers $(WORKERS) $(if $(IMAGE_SIZE),--image-size $(IMAGE_SIZE)) $(EXTRA)

predict: install ## bulk-predict: make predict INPUT=... MODEL=... OUTPUT=... [TOP_K=3]; one image: IMAGE=x.jpg
	$(CNNBATCH) predict --model $(MODEL) --top-k $(TOP_K) \
		$(if $(IMAGE),--image $(IMAGE),--input $(PREDICT_INPUT) --output $(PREDICT_OUTPUT) --workers $(WORKERS)) $(EXTRA)
