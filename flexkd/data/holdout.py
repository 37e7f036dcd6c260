"""Validation held out as whole texts (``data.validation_from: whole_texts``).

Some classification sets label every phrase of each sentence: SST-2's training split holds the nodes of each
sentence's parse tree, the sentence among them. A validation row drawn at random is then mostly a phrase whose
sentence, and that sentence's other phrases, stay in training: validation measures how well a model recalls texts
it trained on, not how it does on unseen sentences, which is what the test split measures (SST-2, seed 42: 763 of
the 872 random validation rows are word spans of a training row, against 2 of the 872 test sentences), and
checkpoints, hyper-parameters and the champion picked on it are picked on the wrong question.

``whole_texts`` draws the validation rows (stratified by label, as ``rows`` does) only among texts that no other
training row contains, and drops from training every row that is a word span of a validation text (its phrases).
Texts are compared as whitespace-separated words, so a span is a run of whole words.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pandas as pd

from flexkd.data.prepare import allocate_per_label, label_groups
from flexkd.errors import ConfigError


def _key(text) -> str:
    return " ".join(str(text).split())


class _Texts:
    """The training texts with an index from each word to the rows that use it."""

    def __init__(self, texts: pd.Series):
        self.keys = [_key(t) for t in texts]
        self.rows_with: dict[str, set[int]] = defaultdict(set)
        for i, key in enumerate(self.keys):
            for word in set(key.split()):
                self.rows_with[word].add(i)

    def inside_another(self, i: int) -> bool:
        """Whether row ``i``'s text is a word span of another row's (rows using all its words, checked in turn)."""
        words = set(self.keys[i].split())
        rows = None
        for word in sorted(words, key=lambda w: len(self.rows_with[w])):
            rows = set(self.rows_with[word]) if rows is None else rows & self.rows_with[word]
            if len(rows) <= 1:
                return False
        needle = f" {self.keys[i]} "
        return any(needle in f" {self.keys[j]} " for j in (rows or ()) if j != i)


def whole_text_holdout(texts: pd.Series, labels: pd.Series, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Positions (sorted) of ``n`` validation rows that no other row contains, spread over the labels in
    proportion to the label counts, and of the training rows dropped as word spans of them. ``texts`` are
    de-duplicated. Raises ConfigError, naming the label and the remedy, when a label has too few whole texts."""
    index = _Texts(texts)
    groups = label_groups(labels)
    wanted = allocate_per_label(groups, n)
    picked = []
    for key, positions in groups.items():
        found = []
        for i in rng.permutation(positions):
            if len(found) == wanted[key]:
                break
            if not index.inside_another(int(i)):
                found.append(int(i))
        if len(found) < wanted[key]:
            raise ConfigError(
                f"data.validation_from: whole_texts: label {key!r} has {len(found)} texts that no other training row "
                f"contains, and data.validation_size asks for {wanted[key]} of them; lower data.validation_size or "
                f"hold out random rows (data.validation_from: rows)")
        picked += found
    validation = np.sort(np.asarray(picked, dtype=int))
    held = "\n".join(f" {index.keys[i]} " for i in validation)
    chosen = set(validation.tolist())
    spans = [j for j, key in enumerate(index.keys) if j not in chosen and f" {key} " in held]
    return validation, np.asarray(spans, dtype=int)
