"""Generation features and batches: templated prompt + response tokens, labels only on the response.

Token conventions:
- the prompt is the *templated* text (``flexkd.data.generation.prompts``: chat template when the tokenizer has one,
  else an Alpaca-style template); it is tokenised with ``add_special_tokens=False`` (chat templates carry their own
  BOS). With the plain template the tokenizer's BOS is prepended only when the tokenizer itself puts BOS first when
  adding special tokens (LLaMA-style); GPT-2-style and BERT-style tokenizers get nothing in front.
- the response ends with the end token: ``eos_token_id``, else ``sep_token_id`` (BERT-style), else an error.
- prompts are truncated from the left (the end holds the question and the generation prompt); a leading BOS is
  kept. Responses are truncated from the right; ``max_response_tokens`` counts the end token, and a response that
  had to be cut gets no end token (the model is not taught to stop mid-sentence).

Batches are padded by ``flexkd.data.tokenize.PadCollator`` (why not transformers' collators: see there): on the
right for training, on the left for generation, with the end token where the tokenizer has no pad token.
"""

from __future__ import annotations

from typing import Sequence

from flexkd.data.generation.prompts import PromptFormatter
from flexkd.data.tokenize import PadCollator
from flexkd.errors import ConfigError, DataError


def end_token_id(tokenizer) -> int:
    """The id that ends a response: ``eos_token_id``, else ``sep_token_id`` (BERT-style tokenizers)."""
    for name in ("eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ConfigError(
        f"tokenizer {type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '?')}) has neither an eos nor "
        "a sep token, so responses cannot be terminated; set tokenizer.eos_token"
    )


def pad_token_id(tokenizer) -> int:
    """``pad_token_id``, else the end token (causal LMs often have no pad token)."""
    value = getattr(tokenizer, "pad_token_id", None)
    return int(value) if value is not None else end_token_id(tokenizer)


def _plain_bos(tokenizer) -> list[int]:
    """``[bos]`` when the tokenizer itself starts sequences with BOS (LLaMA-style), else ``[]``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [int(bos)] if ids and ids[0] == bos else []


def prompt_ids(records: Sequence[dict], tokenizer, formatter: PromptFormatter) -> list[list[int]]:
    """Token ids of each record's templated prompt, before truncation (the validation suite counts these)."""
    texts = [formatter.prompt(record) for record in records]
    if not texts:
        return []
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    prefix = [] if formatter.use_chat_template else _plain_bos(tokenizer)
    return [prefix + list(ids) for ids in encoded]


def _response_ids(records: Sequence[dict], tokenizer) -> list[list[int]]:
    texts = []
    for record in records:
        if record.get("response") is None:
            raise DataError(f"record (source_row {record.get('source_row', '?')}) has no response")
        texts.append(record["response"])
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _check_budget(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _truncate_left(ids: list[int], limit: int, bos: int | None) -> list[int]:
    if len(ids) <= limit:
        return ids
    if bos is not None and ids and ids[0] == bos and limit > 1:
        return [ids[0]] + ids[len(ids) - (limit - 1):]
    return ids[len(ids) - limit:]


def tokenize_generation(
    records: Sequence[dict], tokenizer, formatter: PromptFormatter, *, max_prompt_tokens: int, max_response_tokens: int
) -> list[dict]:
    """Training features: ``input_ids = prompt_ids + response_ids + [end]``, ``attention_mask``, ``labels`` (-100 on
    the prompt, the response ids and end token elsewhere) and ``prompt_len``.

    The prompt keeps its last ``max_prompt_tokens`` tokens (a leading BOS is kept). ``max_response_tokens`` counts
    the end token; a longer response keeps its first ``max_response_tokens`` tokens and gets no end token.
    """
    _check_budget("max_prompt_tokens", max_prompt_tokens)
    _check_budget("max_response_tokens", max_response_tokens)
    end = end_token_id(tokenizer)
    bos = getattr(tokenizer, "bos_token_id", None)
    features = []
    for prompt, response in zip(prompt_ids(records, tokenizer, formatter), _response_ids(records, tokenizer)):
        prompt = _truncate_left(prompt, max_prompt_tokens, bos)
        response = response + [end] if len(response) + 1 <= max_response_tokens else response[:max_response_tokens]
        features.append(
            {
                "input_ids": prompt + response,
                "attention_mask": [1] * (len(prompt) + len(response)),
                "labels": [-100] * len(prompt) + response,
                "prompt_len": len(prompt),
            }
        )
    return features


def tokenize_prompts(
    records: Sequence[dict], tokenizer, formatter: PromptFormatter, *, max_prompt_tokens: int
) -> list[dict]:
    """Generation features (prompt only, left-truncated like ``tokenize_generation``): input_ids, attention_mask,
    prompt_len."""
    _check_budget("max_prompt_tokens", max_prompt_tokens)
    bos = getattr(tokenizer, "bos_token_id", None)
    features = []
    for ids in prompt_ids(records, tokenizer, formatter):
        ids = _truncate_left(ids, max_prompt_tokens, bos)
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "prompt_len": len(ids)})
    return features


def _resolve_pad(pad_token_id_: int | None, tokenizer) -> int:
    if pad_token_id_ is not None:
        return int(pad_token_id_)
    if tokenizer is not None:
        return pad_token_id(tokenizer)
    raise ConfigError("a collator needs pad_token_id or a tokenizer")


class CausalCollator(PadCollator):
    """Training batches: right padding (input_ids with the pad id, attention_mask 0, labels -100); ints (e.g.
    ``prompt_len``) become a tensor. The pad id falls back to the end token when the tokenizer has no pad token."""

    def __init__(self, pad_token_id: int | None = None, *, tokenizer=None):
        super().__init__(_resolve_pad(pad_token_id, tokenizer))


class LeftPadCollator(PadCollator):
    """Generation batches: left padding, so every prompt ends at the last position (``generate`` appends there)."""

    def __init__(self, pad_token_id: int | None = None, *, tokenizer=None):
        super().__init__(_resolve_pad(pad_token_id, tokenizer), left=True)
