# melsearch: `make run` (whole pipeline on GTZAN, or AUDIO_DIR=~/Music; LIBRARY=~/Music indexes it), `make test`, `make demo`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= data/work
AUDIO_DIR ?=
ARCHIVE ?=
LIBRARY ?=
ARGS ?=
SOURCE := $(if $(AUDIO_DIR),--audio-dir "$(AUDIO_DIR)",$(if $(ARCHIVE),--archive "$(ARCHIVE)",)) \
	$(if $(LIBRARY),--library "$(LIBRARY)",)

.PHONY: run demo test lint bench clean-venv

# The venv is rebuilt when setup.cfg or the constraints change.
$(BIN)/.installed: setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

run: $(BIN)/.installed
	$(BIN)/melsearch run --workdir $(WORKDIR) $(SOURCE) $(ARGS)

DEMO := --workdir $(WORKDIR)/demo --audio-dir $(WORKDIR)/demo-audio --epochs 8 $(ARGS)

demo: $(BIN)/.installed
	$(BIN)/melsearch synth $(WORKDIR)/demo-audio --per-class 16 --seconds 10
	$(BIN)/melsearch run $(DEMO)
	$(BIN)/melsearch status $(DEMO)
	$(BIN)/melsearch synth $(WORKDIR)/demo-new --per-class 1 --seconds 10 --seed 7 --format flac
	$(BIN)/melsearch predict --workdir $(WORKDIR)/demo $(WORKDIR)/demo-new/*/*.flac
	$(BIN)/melsearch query --workdir $(WORKDIR)/demo $(WORKDIR)/demo-new/chime/chime.00000.flac --top-k 5

lint: $(BIN)/.installed
	$(BIN)/ruff check pipeline models tasks tests bench beetsplug

test: lint
	$(BIN)/python -m pytest -q $(ARGS)

bench: $(BIN)/.installed
	$(BIN)/python bench/features.py --audio-dir ../shared/sample-audio

clean-venv:
	rm -rf $(VENV)
