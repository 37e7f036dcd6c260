"""Vocabulary pruning of a trained student: keep only the tokens the task's training split uses.

An encoder student's word embedding has a row for each of its tokenizer's tokens: a 4 x 192 MiniLM student spends
5.9M of its 7.5M parameters on 30,522 rows, while SST-2's training split uses 11.6k of them. With
``students.<name>.vocabulary: train`` the distill stage, once the student is trained, keeps the rows of the tokens
that occur in the training features plus the special tokens, renumbered in their original order, and saves the
matching WordPiece tokenizer with it (the method TextPruner calls vocabulary pruning).

What it keeps exact: every text of the training split tokenizes, under the pruned tokenizer, to the same tokens as
before (WordPiece takes the longest piece of a word that its vocabulary holds, and every piece it took on a training
word is kept; no longer one was in the vocabulary before), so the pruned student gives the same outputs on them.
What changes: a word of other text whose pieces were never seen in training is spelled with the kept pieces or
becomes [UNK]. Training is unchanged; the test split is scored with the pruned student and its own tokenizer,
as it is deployed.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from flexkd.errors import ConfigError

CONFIG_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id", "unk_token_id")


def kept_token_ids(features: Iterable[dict], tokenizer) -> list[int]:
    """The token ids that occur in ``features`` (their ``input_ids``) plus the tokenizer's special tokens, ascending."""
    kept = set(tokenizer.all_special_ids)
    for feature in features:
        kept.update(int(i) for i in feature["input_ids"])
    return sorted(kept)


def wordpiece_spec(tokenizer, *, key: str = "vocabulary") -> dict:
    """The fast tokenizer's serialised form, if it is a WordPiece one; else a ConfigError naming ``key``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    kind = spec.get("model", {}).get("type")
    if kind != "WordPiece":
        raise ConfigError(
            f"{key}: train needs a WordPiece tokenizer (the BERT family's), whose vocabulary can be cut without "
            f"changing how the kept words are split; this student's tokenizer is {kind or type(tokenizer).__name__}: "
            "set it to full"
        )
    return spec


def prune_tokenizer(tokenizer, kept: list[int], *, key: str = "vocabulary"):
    """A tokenizer holding the tokens ``kept`` only, token ``kept[i]`` renumbered ``i`` (a WordPiece fast tokenizer;
    any other is refused with a ConfigError naming ``key``)."""
    from transformers import AutoTokenizer

    spec = wordpiece_spec(tokenizer, key=key)
    new_id = {old: new for new, old in enumerate(kept)}
    by_id = {i: token for token, i in spec["model"]["vocab"].items()}
    missing = [i for i in kept if i not in by_id]
    if missing:
        raise ValueError(f"token ids {missing[:5]} are not in the tokenizer's vocabulary of {len(by_id)}")
    spec["model"]["vocab"] = {by_id[old]: new for old, new in new_id.items()}
    for token in spec.get("added_tokens") or []:
        if token["id"] not in new_id:
            raise ValueError(f"added token {token['content']!r} (id {token['id']}) is not kept")
        token["id"] = new_id[token["id"]]
    _renumber_post_processor(spec.get("post_processor"), new_id)
    if spec.get("padding") and "pad_id" in spec["padding"]:
        spec["padding"]["pad_id"] = new_id[spec["padding"]["pad_id"]]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        Path(tmp, "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        Path(tmp, "vocab.txt").unlink(missing_ok=True)  # a slow tokenizer's file would hold the old vocabulary
        return AutoTokenizer.from_pretrained(tmp)


def _renumber_post_processor(processor: dict | None, new_id: dict[int, int]) -> None:
    if not processor:
        return
    kind = processor.get("type")
    if kind == "TemplateProcessing":
        for special in processor["special_tokens"].values():
            special["ids"] = [new_id[i] for i in special["ids"]]
    elif kind in ("BertProcessing", "RobertaProcessing"):
        for name in ("sep", "cls"):
            token, old = processor[name]
            processor[name] = [token, new_id[old]]
    elif kind == "Sequence":
        for inner in processor.get("processors", []):
            _renumber_post_processor(inner, new_id)
    elif kind != "ByteLevel":
        raise ConfigError(f"vocabulary: train cannot renumber the tokenizer's {kind} post-processor: set it to full")


def prune_embedding(model: nn.Module, kept: list[int], *, key: str = "vocabulary") -> None:
    """Keep the input-embedding rows ``kept`` (row ``kept[i]`` becomes row ``i``), in place; config ids follow."""
    if model.get_output_embeddings() is not None:
        raise ConfigError(f"{key}: train is for classifiers; this model also predicts tokens (a language-model head): "
                          "set it to full")
    old = model.get_input_embeddings()
    new_id = {o: n for n, o in enumerate(kept)}
    pad = getattr(model.config, "pad_token_id", None)
    new = nn.Embedding(len(kept), old.embedding_dim, padding_idx=new_id.get(pad) if pad is not None else None)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(old.weight[torch.tensor(kept, device=old.weight.device)])
    model.set_input_embeddings(new)
    model.config.vocab_size = len(kept)
    for name in CONFIG_TOKEN_IDS:
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value in new_id:
            setattr(model.config, name, new_id[value])


def prune_vocabulary(model: nn.Module, tokenizer, features: Iterable[dict], *, key: str = "vocabulary"):
    """The student cut to the tokens of ``features`` (the training split) and its tokenizer, and what was kept:
    ``(model, tokenizer, summary)``. ``model`` is changed in place."""
    from flexkd.models import count_parameters

    before = int(model.get_input_embeddings().weight.shape[0])
    parameters_before = count_parameters(model)
    kept = kept_token_ids(features, tokenizer)
    pruned_tokenizer = prune_tokenizer(tokenizer, kept, key=key)  # refuses a tokenizer it cannot cut, model untouched
    prune_embedding(model, kept, key=key)
    summary = {"tokens_before": before, "tokens_kept": len(kept),
               "parameters_before": parameters_before, "parameters_after": count_parameters(model)}
    return model, pruned_tokenizer, summary
