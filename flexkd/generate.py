"""Batched generation with causal LMs and ROUGE-L scoring (instruction following, summarization).

``generate_texts`` runs ``model.generate`` over left-padded batches and returns only the new text.
``rouge_l`` / ``corpus_rouge_l`` score predictions as MiniLLM and the Flex-KD paper report them: ROUGE-L
F-measure (``rouge_score``, Porter stemming), best over a record's references, averaged and reported in points
(x 100). ``evaluate_generation`` ties both together over records (greedy, or sampled over several seeds with
mean and spread); ``sample_table`` lays out a few predictions side by side for ``mlflow.log_table``.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from functools import lru_cache

import torch

from flexkd.data.tokenize import PadCollator
from flexkd.errors import ConfigError, DataError

__all__ = ["generate_texts", "rouge_l", "corpus_rouge_l", "evaluate_generation", "sample_table"]


# --------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------


def _encode_prompts(tokenizer, prompts: Sequence, max_prompt_tokens: int | None) -> list[list[int]]:
    """Token ids of each prompt (strings are tokenised with the tokenizer's special tokens, e.g. BOS).

    ``max_prompt_tokens`` keeps the *last* tokens of a longer prompt (the end is what the model continues).
    An empty prompt becomes ``[bos]`` (or ``[eos]`` when the tokenizer has no BOS).
    """
    encoded: list[list[int]] = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            ids = list(tokenizer(prompt)["input_ids"])
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        else:
            raise ConfigError(
                f"generate_texts: prompt {i} must be a string or a list of token ids, got {type(prompt).__name__}"
            )
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            ids = ids[-max_prompt_tokens:]
        if not ids:
            start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            if start is None:
                raise ConfigError(f"generate_texts: prompt {i} is empty and the tokenizer has no BOS or EOS token")
            ids = [start]
        encoded.append(ids)
    return encoded


def _eos_ids(model, tokenizer) -> list[int]:
    if tokenizer.eos_token_id is not None:
        return [int(tokenizer.eos_token_id)]
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


def generate_texts(
    model,
    tokenizer,
    prompts: list[str] | list[list[int]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    do_sample: bool = False,
    seed: int | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_prompt_tokens: int | None = None,
    runtime=None,
) -> list[str]:
    """The text each prompt's continuation decodes to (new tokens only, special tokens skipped, stripped).

    Prompts are strings or token-id lists; batches are left padded (pad id: the tokenizer's, else its EOS)
    with an attention mask, so a prompt's output does not depend on its batch. Generation stops at EOS or
    after ``max_new_tokens``. Greedy by default (deterministic); with ``do_sample`` and a ``seed``,
    ``torch.manual_seed(seed)`` is called once at the start of the call, so the same call repeats. The model
    runs in eval mode under ``torch.no_grad`` (and ``runtime``'s autocast, if given) on its own device, and its
    training mode is restored afterwards; the tokenizer is not modified.
    """
    import contextlib
    if max_new_tokens < 1:
        raise ConfigError(f"generate_texts: max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ConfigError(f"generate_texts: batch_size must be >= 1, got {batch_size}")
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise ConfigError(f"generate_texts: max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    if do_sample and not (temperature > 0 and 0 < top_p <= 1):
        raise ConfigError(
            f"generate_texts: sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}"
        )
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids[0] if eos_ids else None)
    if pad_id is None:
        raise ConfigError("generate_texts: the tokenizer has neither a pad token nor an EOS token to pad with")
    encoded = _encode_prompts(tokenizer, prompts, max_prompt_tokens)
    if not encoded:
        return []

    gen_kwargs: dict = {
        "max_new_tokens": int(max_new_tokens),
        "do_sample": bool(do_sample),
        "pad_token_id": int(pad_id),
        "eos_token_id": eos_ids or None,
    }
    if do_sample:
        gen_kwargs.update(temperature=float(temperature), top_p=float(top_p))
    pad = PadCollator(pad_id, left=True)  # left padding: every prompt ends at the last column
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    if do_sample and seed is not None:
        torch.manual_seed(int(seed))
    outputs: list[str] = []
    try:
        with torch.no_grad(), (runtime.autocast() if runtime is not None else contextlib.nullcontext()):
            for start in range(0, len(encoded), batch_size):
                chunk = encoded[start : start + batch_size]
                batch = pad([{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in chunk])
                width = batch["input_ids"].shape[1]
                generated = model.generate(
                    input_ids=batch["input_ids"].to(device, non_blocking=True),
                    attention_mask=batch["attention_mask"].to(device, non_blocking=True), **gen_kwargs
                )
                for row in generated[:, width:].tolist():
                    cut = next((i for i, token in enumerate(row) if token in eos_ids), len(row))
                    outputs.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return outputs


# --------------------------------------------------------------------------------------------------------------
# ROUGE-L
# --------------------------------------------------------------------------------------------------------------


class _LcsRougeL:
    """ROUGE-L F-measure without stemming, for a bare GPU image that lacks rouge-score (the device check):
    rouge-score's tokenisation (lower case, runs of [a-z0-9]) and the longest common subsequence, no Porter stemmer,
    so scores can be a little lower than rouge-score's. flexkd's requirements install rouge-score; the pipeline
    uses it."""

    @staticmethod
    def _tokens(text: str) -> list[str]:
        import re

        return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()

    def score(self, reference: str, prediction: str) -> dict:
        from types import SimpleNamespace

        ref, pred = self._tokens(reference), self._tokens(prediction)
        if not ref or not pred:
            return {"rougeL": SimpleNamespace(fmeasure=0.0)}
        previous = [0] * (len(pred) + 1)
        for token in ref:  # LCS length by dynamic programming, one row at a time
            current = [0]
            for j, other in enumerate(pred):
                current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
            previous = current
        lcs = previous[-1]
        if lcs == 0:
            return {"rougeL": SimpleNamespace(fmeasure=0.0)}
        precision, recall = lcs / len(pred), lcs / len(ref)
        return {"rougeL": SimpleNamespace(fmeasure=2 * precision * recall / (precision + recall))}


@lru_cache(maxsize=1)
def _scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        import warnings

        warnings.warn("rouge-score is not installed: ROUGE-L without Porter stemming (pip install rouge-score for the "
                      "pipeline's scorer)", stacklevel=3)
        return _LcsRougeL()
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: list[str]) -> float:
    """Best ROUGE-L F-measure (0..1) of ``prediction`` over ``references`` (Porter stemming, lower case).

    An empty (or whitespace-only) prediction scores 0.0. ``references`` must be a non-empty list of strings.
    """
    if isinstance(references, str) or not references:
        raise ConfigError(f"rouge_l: references must be a non-empty list of strings, got {references!r}")
    if not prediction or not prediction.strip():
        return 0.0
    scorer = _scorer()
    return max(scorer.score(reference, prediction)["rougeL"].fmeasure for reference in references)


def corpus_rouge_l(predictions: Sequence[str], references_list: Sequence[list[str]]) -> float:
    """Mean of ``rouge_l`` over the corpus, in points (x 100), as the papers report it."""
    if len(predictions) != len(references_list):
        raise ConfigError(
            f"corpus_rouge_l: {len(predictions)} predictions but {len(references_list)} reference lists"
        )
    if not predictions:
        raise ConfigError("corpus_rouge_l: no predictions to score")
    return 100.0 * sum(rouge_l(p, refs) for p, refs in zip(predictions, references_list)) / len(predictions)


def _references(records: Sequence[dict]) -> list[list[str]]:
    references = []
    for i, record in enumerate(records):
        refs = record.get("references") if isinstance(record, dict) else None
        if (
            not isinstance(refs, (list, tuple))
            or not refs
            or not all(isinstance(r, str) for r in refs)
        ):
            raise DataError(
                f"record {i}: column 'references' must be a non-empty list of strings, got {refs!r}"
            )
        references.append(list(refs))
    return references


def evaluate_generation(
    model,
    tokenizer,
    records: Sequence[dict],
    formatter_prompt: Callable[[dict], str],
    *,
    max_new_tokens: int,
    batch_size: int,
    seeds: list[int] | None = None,
    do_sample: bool = False,
    max_prompt_tokens: int | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    runtime=None,
) -> dict:
    """Generate for every record (prompt = ``formatter_prompt(record)``) and score ROUGE-L against its
    ``references``.

    Greedy when ``do_sample`` is False or ``seeds`` is None: ``{"rougeL": points, "predictions": [...]}``.
    Sampling over ``seeds``: ``{"rougeL": mean over seeds, "rougeL_std": sample std over seeds (0.0 for one
    seed), "rougeL_per_seed": {seed: points}, "predictions": the first seed's predictions}``.
    """
    references = _references(records)
    if not references:
        raise DataError("evaluate_generation: no records to evaluate")
    prompts = [formatter_prompt(record) for record in records]
    common = dict(
        max_new_tokens=max_new_tokens, batch_size=batch_size, max_prompt_tokens=max_prompt_tokens, runtime=runtime
    )
    if not do_sample or seeds is None:
        predictions = generate_texts(model, tokenizer, prompts, do_sample=False, **common)
        return {"rougeL": corpus_rouge_l(predictions, references), "predictions": predictions}
    if not seeds:
        raise ConfigError("evaluate_generation: seeds is an empty list; give at least one seed to sample with")
    per_seed: dict[int, float] = {}
    first_predictions: list[str] = []
    for seed in seeds:
        predictions = generate_texts(
            model, tokenizer, prompts, do_sample=True, seed=seed, temperature=temperature, top_p=top_p, **common
        )
        per_seed[int(seed)] = corpus_rouge_l(predictions, references)
        if not first_predictions:
            first_predictions = predictions
    scores = list(per_seed.values())
    return {
        "rougeL": statistics.fmean(scores),
        "rougeL_std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
        "rougeL_per_seed": per_seed,
        "predictions": first_predictions,
    }


def sample_table(
    records: Sequence[dict],
    predictions_by_model: dict[str, list[str]],
    n: int = 10,
    *,
    formatter_prompt: Callable[[dict], str] | None = None,
):
    """A pandas DataFrame of the first ``n`` records: ``prompt``, ``reference``, then one column per model.

    ``prompt`` is ``formatter_prompt(record)`` when given, else the record's ``prompt`` (or ``instruction``)
    field; ``reference`` joins a record's references with `` || ``. For ``mlflow.log_table``.
    """
    import pandas as pd

    rows = list(records[: max(0, n)])
    references = _references(rows)
    reserved = {"prompt", "reference"} & set(predictions_by_model)
    if reserved:
        raise ConfigError(f"sample_table: model names {sorted(reserved)} clash with the table's own columns")
    for name, predictions in predictions_by_model.items():
        if len(predictions) < len(rows):
            raise ConfigError(
                f"sample_table: model {name!r} has {len(predictions)} predictions, fewer than the {len(rows)} rows"
            )
    table = {
        "prompt": [
            formatter_prompt(r) if formatter_prompt is not None else str(r.get("prompt", r.get("instruction", "")))
            for r in rows
        ],
        "reference": [" || ".join(refs) for refs in references],
    }
    for name, predictions in predictions_by_model.items():
        table[name] = list(predictions[: len(rows)])
    return pd.DataFrame(table, columns=["prompt", "reference", *predictions_by_model])
