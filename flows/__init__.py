"""Prefect flows, one per pipeline stage plus the pipeline flow. Thin: read params, call flexkd, log."""

import os

# Set before Prefect reads its settings (any `python -m flows.<stage>` imports this package first).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Prefect's temporary server (no PREFECT_API_URL) gets 20 s to start by default: too short on a busy 2-core box.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
