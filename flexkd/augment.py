"""Teacher-labelled data augmentation for the students (stage augment; classification only).

The students may see more than the training split: copies of its longer texts with words swapped for their
nearest neighbours in the teacher's input-embedding space, each labelled by the tuned teacher, so that the
student learns the teacher's function on more of the input space (TinyBERT's augmentation, Jiao et al. 2020,
with embedding neighbours in place of a masked-LM head, which a fine-tuned encoder does not keep). The teacher
itself trains on the training split only; relevance scoring reads the training split only.

- Words: whitespace-separated; a word can be replaced when the teacher's tokenizer makes it one token and it is
  alphabetic. Its candidates are the ``neighbours`` nearest other such words (cosine similarity of the token's
  input embedding) among the words of the training split itself whose token its tokenised rows hold, so an
  augmented text holds only tokens that the training split has (a student cut to the training split's vocabulary,
  ``students.<s>.vocabulary: train``, keeps its size).
- Each copy replaces each replaceable word with probability ``replace_prob`` by one of its candidates, drawn
  uniformly; copies equal to the original or to another copy are dropped. Seeded: the same inputs give the same
  rows.
- Labels: the teacher's prediction (argmax); every method reads them as it reads the gold labels, and the
  teacher's logits on them (cache or online) teach the KD terms. Each row keeps the ``source_row`` of the text it
  came from and ``teacher_confidence`` (the teacher's probability of its label).

Output: ``data/augmented/<task>/train.jsonl`` and ``meta.json`` (the settings, counts, teacher hash); with
``augment.enabled`` false only a meta.json that says so, and the students train on the training split alone.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

TRAIN_FILE = "train.jsonl"
META_FILE = "meta.json"


class AugmentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(False, description="Train the students on the training split plus teacher-labelled "
                          "copies of its texts with words replaced by embedding neighbours (stage augment).")
    copies: int = Field(4, gt=0, description="Augmented copies made of each augmented text (fewer when copies repeat).")
    replace_prob: float = Field(0.4, gt=0, le=1, description="Chance that each replaceable word of a copy is replaced.")
    neighbours: int = Field(15, gt=0, description="Candidate replacements per word: its nearest training-split words "
                            "in the teacher's input-embedding space.")
    min_words: int = Field(5, gt=0, description="Only texts of at least this many words are augmented (short phrases "
                           "have little to vary).")
    max_texts: int | None = Field(None, gt=0, description="Augment at most this many texts, drawn with project.seed "
                                  "(null: every text of at least min_words words).")
    batch_size: int = Field(128, gt=0, description="Rows per teacher forward while labelling.")


def check_task(cfg) -> None:
    """Refuse ``augment.enabled`` on a generation task (preflight, before any compute; and the stage itself)."""
    from flexkd.errors import ConfigError

    if cfg.augment.enabled and cfg.data.is_generation:
        raise ConfigError("augment.enabled: augmentation is for classification tasks (data.format: classification); "
                          f"this task is {cfg.data.format}: set augment.enabled: false")


def replaceable_words(texts, tokenizer, allowed: set[int] | None = None) -> dict[str, int]:
    """Each distinct alphabetic word of ``texts`` that ``tokenizer`` makes one token (one of ``allowed``, if given),
    with that token's id."""
    words = sorted({w for text in texts for w in text.split() if w.isalpha()})
    if not words:
        return {}
    encoded = tokenizer(words, add_special_tokens=False)["input_ids"]
    return {w: ids[0] for w, ids in zip(words, encoded) if len(ids) == 1 and (allowed is None or ids[0] in allowed)}


def neighbour_table(words: dict[str, int], embeddings, k: int, chunk: int = 2048) -> dict[str, list[str]]:
    """For each word, its ``k`` nearest other words by cosine similarity of their token embeddings (rows of
    ``embeddings``, the teacher's input-embedding matrix); words sharing a token are not each other's neighbour."""
    import torch

    names = list(words)
    if len(names) < 2:
        return {}
    ids = torch.tensor([words[w] for w in names])
    vectors = torch.nn.functional.normalize(embeddings.detach().float()[ids], dim=-1)
    k = min(k, len(names) - 1)
    table: dict[str, list[str]] = {}
    for start in range(0, len(names), chunk):
        sims = vectors[start : start + chunk] @ vectors.T
        sims[ids[start : start + chunk, None] == ids[None, :]] = -2.0  # itself (and words of the same token)
        top = sims.topk(k, dim=-1).indices.tolist()
        for row, picked in enumerate(top):
            table[names[start + row]] = [names[j] for j in picked]
    return table


def augment_text(text: str, table: dict[str, list[str]], rng: random.Random, replace_prob: float) -> str:
    """One copy of ``text`` with each word of ``table`` replaced with probability ``replace_prob``."""
    return " ".join(rng.choice(table[w]) if w in table and rng.random() < replace_prob else w for w in text.split())


def augment_records(records: list[dict], table: dict[str, list[str]], settings: AugmentConfig, seed: int) -> list[dict]:
    """Unlabelled copies of the records with at least ``min_words`` words (``max_texts`` of them, drawn with
    ``seed``): text (and text_pair) varied, source_row kept; copies equal to their original or a sibling dropped."""
    rng = random.Random(seed)
    chosen = [r for r in records if len(r["text"].split()) + len(r.get("text_pair", "").split()) >= settings.min_words]
    if settings.max_texts is not None and len(chosen) > settings.max_texts:
        chosen = [chosen[i] for i in sorted(rng.sample(range(len(chosen)), settings.max_texts))]
    fields = ["text"] + (["text_pair"] if records and "text_pair" in records[0] else [])
    out = []
    for record in chosen:
        seen = {tuple(record[f] for f in fields)}
        for _ in range(settings.copies):
            copy = {f: augment_text(record[f], table, rng, settings.replace_prob) for f in fields}
            key = tuple(copy[f] for f in fields)
            if key not in seen:
                seen.add(key)
                out.append({**copy, "source_row": record.get("source_row")})
    return out


def label_with_teacher(rows: list[dict], teacher, tokenizer, task, batch_size: int) -> list[dict]:
    """``rows`` with the teacher's predicted label and its probability (``teacher_confidence``)."""
    from flexkd.data.tokenize import tokenize_classification
    from flexkd.evaluate import predict_logits

    if not rows:
        return []
    features = tokenize_classification([{**r, "label": 0} for r in rows], tokenizer, task.cfg.teacher.max_length)
    probs = predict_logits(teacher, features, task.collate(tokenizer), batch_size, runtime=task.runtime).softmax(-1)
    confidence, labels = probs.max(-1)
    return [{**r, "label": int(y), "teacher_confidence": round(float(c), 4)}
            for r, y, c in zip(rows, labels.tolist(), confidence.tolist())]


def run_stage(cfg, paths, task, *, log=None) -> dict:
    """Stage augment: write the teacher-labelled copies (``paths.augmented``); disabled: only a meta.json."""
    from flexkd.data.prepare import load_split
    from flexkd.data.tokenize import tokenize_classification
    from flexkd.models import load_tokenizer
    from flexkd.project import write_json
    from flexkd.provenance import atomic_write_text, weights_hash

    settings, out_dir = cfg.augment, Path(paths.augmented)
    if not settings.enabled:
        (out_dir / TRAIN_FILE).unlink(missing_ok=True)
        write_json(out_dir / META_FILE, {"enabled": False})
        print("augment.enabled is false: the students train on the training split alone")
        return {"enabled": False, "rows": 0}
    check_task(cfg)
    records = load_split(paths.prepared / TRAIN_FILE)
    tokenizer = load_tokenizer(str(paths.teacher))
    teacher = task.runtime.frozen(task.load_model(str(paths.teacher)))
    texts = [r["text"] for r in records] + [r["text_pair"] for r in records if "text_pair" in r]
    # only tokens the tokenised training split holds (after truncation): what a vocabulary cut keeps
    allowed = {t for f in tokenize_classification(records, tokenizer, cfg.teacher.max_length) for t in f["input_ids"]}
    words = replaceable_words(texts, tokenizer, allowed)
    table = neighbour_table(words, teacher.get_input_embeddings().weight, settings.neighbours)
    rows = label_with_teacher(augment_records(records, table, settings, cfg.project.seed), teacher, tokenizer, task,
                              settings.batch_size)
    atomic_write_text(out_dir / TRAIN_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    counts = Counter(r["label"] for r in rows)
    meta = {"enabled": True, "settings": settings.model_dump(), "seed": cfg.project.seed, "rows": len(rows),
            "source_rows": len({r["source_row"] for r in rows}), "replaceable_words": len(table),
            "labels": {str(k): v for k, v in sorted(counts.items())}, "teacher_weights_hash": weights_hash(paths.teacher)}
    write_json(out_dir / META_FILE, meta)
    if log is not None:
        log({"augment/rows": len(rows), "augment/replaceable_words": len(table)})
    print(f"augment: {len(rows)} teacher-labelled rows from {meta['source_rows']} of {len(records)} training texts "
          f"({len(table)} replaceable words)")
    return meta


def student_train_features(cfg, paths, task, tokenizer) -> list[dict]:
    """What the students train on: the tokenised training split, then the augmented rows when ``augment`` is
    enabled (refused if the augment stage wrote them with other settings or another teacher)."""
    from flexkd.data.prepare import load_split
    from flexkd.data.tokenize import tokenize_classification
    from flexkd.errors import ProvenanceError
    from flexkd.provenance import weights_hash

    train = task.features(paths.prepared, "train", tokenizer)
    if not cfg.augment.enabled:
        return train
    out_dir = Path(paths.augmented)
    meta_path = out_dir / META_FILE
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    if (not meta.get("enabled") or meta.get("settings") != cfg.augment.model_dump() or meta.get("seed") != cfg.project.seed
            or meta.get("teacher_weights_hash") != weights_hash(paths.teacher)):
        raise ProvenanceError(f"{out_dir}: the augmented rows are missing or were made with other augment settings, "
                              "seed or teacher; run the augment stage (dvc repro does it)")
    return train + tokenize_classification(load_split(out_dir / TRAIN_FILE), tokenizer, cfg.teacher.max_length)
