"""The relevance sanity check of docs/METHOD.md: if the scores mean anything, silencing the top-scored teacher units
must hurt the teacher far more than silencing the same number of bottom-scored (or random) units.

Units are silenced by zeroing them in the output of the teacher's last encoder layer (the hidden state the
relevance stage scores) with a forward hook; the teacher is scored on the test split with its primary metric.
"""

from __future__ import annotations

from pathlib import Path

import torch


def _last_layer(model):
    base = model.base_model
    for path in ("encoder.layer", "layers", "h", "transformer.layer"):
        node = base
        try:
            for part in path.split("."):
                node = getattr(node, part)
        except AttributeError:
            continue
        return node[-1]
    raise ValueError(f"{type(model).__name__}: cannot find the last transformer layer to silence units in")


def _silenced(model, units: list[int]):
    index = torch.tensor(units, dtype=torch.long)

    def hook(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[..., index] = 0.0
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return _last_layer(model).register_forward_hook(hook)


def ablation(workspace: Path, ks: list[int] | None = None, random_draws: int = 3) -> dict:
    """The teacher's test score with nothing, the top-k, the bottom-k and random k units of its last layer silenced."""
    from flexkd.config import load_config
    from flexkd.models import load_tokenizer
    from flexkd.relevance import RelevanceIndex
    from flexkd.tasks import task_for
    from flows.common import paths_for

    workspace = Path(workspace)
    cfg = load_config(workspace / "params.yaml")
    paths = paths_for(cfg, workspace)
    task = task_for(cfg)
    if task.is_generation:
        raise ValueError("the sanity ablation is implemented for classification teachers")
    metric = cfg.evaluate.primary_metric
    tokenizer = load_tokenizer(str(paths.teacher))
    teacher = task.load_model(str(paths.teacher)).eval()
    index = RelevanceIndex.load(paths.relevance / "index.json")
    scores = torch.tensor(index.scores)
    ranked = scores.argsort(descending=True).tolist()
    # k = d_S is half the teacher or less: the last layer is redundant there, so larger k show the contrast too
    ks = ks or sorted({max(1, index.k // 4), index.k, index.d_teacher * 3 // 4, index.d_teacher * 7 // 8})

    def score(units: list[int]) -> float:
        handle = _silenced(teacher, units) if units else None
        try:
            with torch.no_grad():
                return task.test_scores(teacher, tokenizer, paths.prepared)[0][metric]
        finally:
            if handle is not None:
                handle.remove()

    result = {"metric": metric, "d_teacher": index.d_teacher, "none": score([]), "by_k": {}}
    generator = torch.Generator().manual_seed(0)
    for k in ks:
        randoms = [score(torch.randperm(index.d_teacher, generator=generator)[:k].tolist()) for _ in range(random_draws)]
        result["by_k"][str(k)] = {"top": score(ranked[:k]), "bottom": score(ranked[-k:]),
                                  "random_mean": sum(randoms) / len(randoms)}
    return result
