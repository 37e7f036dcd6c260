"""The teacher-feature cache: run the frozen teacher once over the training split, keep only what distillation reads.

Per training example, at the positions whose outputs the losses compare (classification: every token;
generation: the response positions), the cache keeps

- the teacher's last hidden state restricted to ``columns``: the k = d_S relevance-selected units (Flex-KD) or
  all d_T units (``full``: what the projector and CKA baselines need);
- the logits: all C class logits per example (classification), or per position the top-k logits, their token ids
  and one tail logit that carries the rest of the mass (generation; see ``losses.sparse_teacher_parts``).

Arrays are ``.npy`` files (read memory-mapped: a step touches only its batch's rows), ragged examples are
concatenated with an ``offsets`` array. ``meta.json`` holds the provenance (teacher weights hash, data
fingerprint, relevance index hash, a hash of the tokenised inputs, temperature and top-k) and the sha256 of every
array, so a cache made from other inputs, or a corrupted one, is refused instead of silently reused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from flexkd.errors import ConfigError, ProvenanceError
from flexkd.provenance import atomic_dir, file_manifest, sha256_file

FORMAT_VERSION = 1
META = "meta.json"
_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}  # bfloat16 kept as raw bits


def features_hash(features: Sequence[dict]) -> str:
    """sha256 of the tokenised training inputs (ids, masks, labels) in order: ties the cache to the tokenisation."""
    digest = hashlib.sha256()
    for feature in features:
        digest.update(json.dumps({k: v for k, v in sorted(feature.items())}, separators=(",", ":")).encode())
    return digest.hexdigest()


def cache_columns(mode: str, selected_units: Sequence[int], teacher_hidden: int, methods: Sequence) -> list[int]:
    """Teacher units a cache stores: the selected ones (ascending) or all of them. ``auto`` asks the terms of
    ``methods`` (``flexkd.losses.Method``s, or built-in method names): all units when one compares all of them."""
    if mode == "auto":
        from flexkd.losses.methods import get_method

        methods = [get_method(m) if isinstance(m, str) else m for m in methods]
        mode = "full" if any(m.teacher_units == "all" for m in methods) else "selected"
    if mode == "full":
        return list(range(int(teacher_hidden)))
    if mode == "selected":
        return sorted(int(u) for u in selected_units)
    raise ConfigError(f"teacher_cache.features: unknown mode {mode!r}; valid: auto, selected, full")


def _to_storage(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    tensor = tensor.detach().float().cpu()
    if dtype == "bfloat16":
        return tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy().astype(_NUMPY_DTYPES[dtype])


def _from_storage(array: np.ndarray, dtype: str) -> torch.Tensor:
    array = np.array(array, copy=True)  # out of the memory map: a writable, contiguous copy of the batch's rows
    if dtype == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(array).float()


@dataclass
class CacheSpec:
    """What to store. ``columns``: teacher units kept (None: no hidden states); ``top_k``: generation logits."""

    columns: list[int] | None
    d_teacher: int
    generation: bool
    dtype: str = "float32"
    top_k: int | None = None
    temperature: float = 1.0
    vocab: int | None = None  # generation: logits are cut to the shared vocabulary (len(tokenizer)) first

    def __post_init__(self):
        if self.dtype not in _NUMPY_DTYPES:
            raise ConfigError(f"teacher_cache.dtype: {self.dtype!r} is not one of {sorted(_NUMPY_DTYPES)}")
        if self.generation and not self.top_k:
            raise ConfigError("teacher_cache: a generation cache needs distill.teacher_top_k (e.g. 64)")
        if self.columns is not None:
            if len(set(self.columns)) != len(self.columns) or any(not 0 <= c < self.d_teacher for c in self.columns):
                raise ConfigError(f"teacher_cache: columns must be distinct units in [0, {self.d_teacher})")


def build_cache(
    teacher: torch.nn.Module,
    features: Sequence[dict],
    collate: Callable[[list[dict]], dict],
    feature_mask: Callable[[dict], torch.Tensor],
    out_dir: str | Path,
    spec: CacheSpec,
    *,
    provenance: dict[str, str],
    batch_size: int = 64,
    progress: bool = True,
) -> dict:
    """Run ``teacher`` over ``features`` once and write the cache to ``out_dir`` atomically; returns its meta."""
    if not features:
        raise ConfigError("teacher_cache: the training split is empty")
    n = len(features)
    # Longest first within sorted batches keeps padding small; rows land at their example's offset whatever the order.
    order = sorted(range(n), key=lambda i: -len(features[i]["input_ids"]))
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    offsets = _offsets(features, batches, collate, feature_mask)
    if offsets[-1] == 0:
        raise ConfigError("teacher_cache: no position of the training split is compared by the losses (empty masks)")
    teacher.eval()
    device = next(teacher.parameters()).device  # the caller placed it (flexkd.runtime); batches follow

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        np.save(tmp / "offsets.npy", offsets)
        arrays = _CacheArrays(tmp, spec, offsets)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc="teacher cache", dynamic_ncols=True, mininterval=2.0)
        with torch.no_grad():
            for ids in batches:
                batch = collate([features[i] for i in ids])
                inputs = {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
                          for key, value in batch.items() if key != "labels"}
                out = teacher(**inputs, output_hidden_states=spec.columns is not None)
                arrays.write(ids, out, feature_mask(batch).bool().to(device))
                if bar is not None:
                    bar.update(len(ids))
        if bar is not None:
            bar.close()
        arrays.close()
        (tmp / META).write_text(json.dumps(_meta(tmp, spec, offsets, provenance), indent=1, sort_keys=True) + "\n")

    atomic_dir(out_dir, write)
    return json.loads((Path(out_dir) / META).read_text())


def _offsets(features: Sequence[dict], batches: list[list[int]], collate, feature_mask) -> np.ndarray:
    """Where each example's rows start in the arrays, one row per compared position (last: the number of rows)."""
    counts = np.zeros(len(features), dtype=np.int64)
    for ids in batches:
        mask = feature_mask(collate([features[i] for i in ids])).bool()
        counts[ids] = mask.sum(dim=1).numpy()
    offsets = np.zeros(len(features) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets


class _CacheArrays:
    """The arrays of a cache being written under ``directory`` (memory-mapped ``.npy`` files; classification logits
    in memory), filled one batch at a time, each example's rows at its offset."""

    def __init__(self, directory: Path, spec: CacheSpec, offsets: np.ndarray):
        self.directory, self.spec, self.offsets = directory, spec, offsets
        storage = _NUMPY_DTYPES[spec.dtype]
        total = int(offsets[-1])
        self.columns = torch.tensor(spec.columns or [], dtype=torch.long)
        open_memmap = np.lib.format.open_memmap
        self.hidden = (open_memmap(directory / "hidden.npy", mode="w+", dtype=storage, shape=(total, len(self.columns)))
                       if spec.columns is not None else None)
        self.logits = None  # classification: (examples, classes), made at the first batch, which tells the classes
        if spec.generation:
            k = int(spec.top_k)
            self.top_values = open_memmap(directory / "topk_values.npy", mode="w+", dtype=storage, shape=(total, k))
            self.top_indices = open_memmap(directory / "topk_indices.npy", mode="w+", dtype=np.int32, shape=(total, k))
            self.tail = open_memmap(directory / "tail_logit.npy", mode="w+", dtype=np.float32, shape=(total,))

    def write(self, ids: list[int], out, mask: torch.Tensor) -> None:
        """The teacher's outputs ``out`` for the examples ``ids``, at the positions ``mask`` marks (on their device)."""
        from flexkd.losses import sparse_teacher_parts

        spec = self.spec
        if spec.generation:
            logits = out.logits[..., : spec.vocab] if spec.vocab else out.logits
            values, indices, fill = (t.cpu() for t in sparse_teacher_parts(logits[mask].float(), spec.top_k,
                                                                            spec.temperature))
        elif self.logits is None:
            self.logits = np.zeros((len(self.offsets) - 1, out.logits.shape[-1]), dtype=_NUMPY_DTYPES[spec.dtype])
        rows_hidden = (out.hidden_states[-1][mask][:, self.columns.to(mask.device)].float().cpu()
                       if self.hidden is not None else None)
        position = 0
        for b, i in enumerate(ids):
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            span = slice(position, position + hi - lo)
            if self.hidden is not None:
                self.hidden[lo:hi] = _to_storage(rows_hidden[span], spec.dtype)
            if spec.generation:
                self.top_values[lo:hi] = _to_storage(values[span], spec.dtype)
                self.top_indices[lo:hi] = indices[span].numpy().astype(np.int32)
                self.tail[lo:hi] = fill[span].numpy().astype(np.float32)
            else:
                self.logits[i] = _to_storage(out.logits[b], spec.dtype)
            position += hi - lo

    def close(self) -> None:
        """Flush the memory maps to their files; write the classification logits."""
        for array in (self.hidden,) + ((self.top_values, self.top_indices, self.tail) if self.spec.generation else ()):
            if array is not None:
                array.flush()
        if not self.spec.generation:
            np.save(self.directory / "logits.npy", self.logits)


def _meta(directory: Path, spec: CacheSpec, offsets: np.ndarray, provenance: dict[str, str]) -> dict:
    """meta.json of the cache written under ``directory``: what it holds, what it was made from, its files' hashes."""
    files = file_manifest(directory, "*.npy")
    size = sum((directory / name).stat().st_size for name in files)
    width = len(spec.columns or [])
    return {
        "format_version": FORMAT_VERSION,
        "task": "generation" if spec.generation else "classification",
        "n_examples": len(offsets) - 1,
        "n_positions": int(offsets[-1]),
        "columns": spec.columns,
        "d_teacher": spec.d_teacher,
        "dtype": spec.dtype,
        "top_k": spec.top_k if spec.generation else None,
        "temperature": spec.temperature if spec.generation else None,
        "vocab": spec.vocab if spec.generation else None,
        "provenance": dict(sorted(provenance.items())),
        "files": files,
        "bytes": size,
        # what the same cache would take with every teacher unit (d_T) per position: the saving of `selected`
        "full_width_bytes": size + int(offsets[-1]) * (spec.d_teacher - width) * np.dtype(_NUMPY_DTYPES[spec.dtype]).itemsize,
    }


def write_disabled(out_dir: str | Path) -> None:
    """The stage's output when the cache is off: a meta.json that says so (distillation runs the teacher online)."""

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        (tmp / META).write_text(json.dumps({"enabled": False, "format_version": FORMAT_VERSION}, indent=1) + "\n")

    atomic_dir(out_dir, write)


def cache_enabled(directory: str | Path) -> bool:
    meta = Path(directory) / META
    if not meta.exists():
        return False
    try:
        return json.loads(meta.read_text()).get("enabled", True) is not False
    except json.JSONDecodeError:
        return True  # let TeacherCache.load report the corruption


class TeacherCache:
    """A cache directory opened for reading: arrays memory-mapped, every file checked against ``meta.json``."""

    def __init__(self, directory: Path, meta: dict, arrays: dict[str, np.ndarray]):
        self.directory = directory
        self.meta = meta
        self.arrays = arrays
        self.offsets = arrays["offsets.npy"]
        self.columns: list[int] | None = meta["columns"]
        self.generation = meta["task"] == "generation"

    def __reduce__(self):
        # Sent to training processes (accelerate launch) by path: each reopens the memory map instead of
        # receiving a pickled copy of the arrays; the files were checked when the flow opened the cache.
        return (_reopen, (str(self.directory),))

    @classmethod
    def load(cls, directory: str | Path, *, check_files: bool = True) -> "TeacherCache":
        directory = Path(directory)
        meta_path = directory / META
        if not meta_path.exists():
            raise ProvenanceError(f"{directory}: no teacher cache ({META} missing); run the teacher_cache stage")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ProvenanceError(f"{meta_path}: unreadable teacher-cache metadata ({err}); rerun the teacher_cache stage") from None
        if meta.get("enabled") is False:
            raise ProvenanceError(f"{directory}: the teacher cache was built disabled (teacher_cache.enabled: false)")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ProvenanceError(f"{directory}: teacher cache format {meta.get('format_version')} (expected {FORMAT_VERSION}); rerun the stage")
        files = meta.get("files") or {}
        found = {p.name for p in directory.glob("*.npy")}
        if found != set(files):
            raise ProvenanceError(f"{directory}: teacher cache files {sorted(found)} do not match its metadata {sorted(files)}")
        if check_files:
            bad = [name for name, digest in files.items() if sha256_file(directory / name) != digest]
            if bad:
                raise ProvenanceError(f"{directory}: teacher cache file(s) {', '.join(bad)} do not match their sha256: corrupted; rerun the stage")
        arrays = {name: np.load(directory / name, mmap_mode="r", allow_pickle=False) for name in files}
        cache = cls(directory, meta, arrays)
        if len(cache.offsets) != meta["n_examples"] + 1 or int(cache.offsets[-1]) != meta["n_positions"]:
            raise ProvenanceError(f"{directory}: teacher cache offsets do not match n_examples / n_positions")
        return cache

    @property
    def width(self) -> int:
        return len(self.columns) if self.columns is not None else 0

    def verify(self, **expected) -> None:
        """ProvenanceError naming each given provenance field (teacher_weights_hash, data_fingerprint,
        relevance_index_hash, features_hash, temperature, top_k) that differs from what the cache was built from."""
        recorded = dict(self.meta["provenance"], temperature=self.meta["temperature"], top_k=self.meta["top_k"])
        mismatches = [
            f"{name}: expected {value!r}, cache has {recorded.get(name)!r}"
            for name, value in expected.items()
            if value is not None and recorded.get(name) != value
        ]
        if mismatches:
            raise ProvenanceError(
                f"{self.directory}: the teacher cache was built from other inputs ({'; '.join(mismatches)}); "
                "it was not used. Rerun the teacher_cache stage (dvc repro does it)."
            )

    def serves(self, units: Sequence[int] | None) -> bool:
        """True when every unit the method compares (None: only logits) is among the cached columns."""
        if units is None:
            return True
        return self.columns is not None and set(int(u) for u in units) <= set(self.columns)

    def positions(self, units: Sequence[int]) -> list[int]:
        """Where teacher units ``units`` sit among the cached columns (the Flex-KD pairing inside the cache)."""
        where = {unit: i for i, unit in enumerate(self.columns or [])}
        missing = [u for u in units if u not in where]
        if missing:
            raise ProvenanceError(f"{self.directory}: teacher units {missing[:8]} are not in the cache")
        return [where[int(u)] for u in units]

    def batch_outputs(
        self, cache_index: torch.Tensor, mask: torch.Tensor, *, hidden: bool, vocab: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher's (logits, last hidden state restricted to the cached columns) for a padded batch.

        ``mask`` (B, T) marks the positions the cache holds for each example (the losses' positions); elsewhere
        the hidden state is 0 and the logits are uninformative, and the losses never read them.
        """
        from flexkd.losses import densify_teacher_logits

        mask = mask.bool()
        rows = []
        for b, i in enumerate(cache_index.tolist()):
            if not 0 <= i < self.meta["n_examples"]:
                raise ProvenanceError(f"{self.directory}: example {i} is not in the teacher cache ({self.meta['n_examples']} examples)")
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            if hi - lo != int(mask[b].sum()):
                raise ProvenanceError(
                    f"{self.directory}: example {i} has {int(mask[b].sum())} positions in this batch but {hi - lo} "
                    "in the teacher cache: the cache does not belong to this tokenisation"
                )
            rows.append((lo, hi))
        dtype = self.meta["dtype"]
        teacher_hidden = None
        if hidden:
            if self.columns is None:
                raise ProvenanceError(f"{self.directory}: the teacher cache holds no hidden states")
            cached = self.arrays["hidden.npy"]
            teacher_hidden = torch.zeros(*mask.shape, self.width)
            for b, (lo, hi) in enumerate(rows):
                teacher_hidden[b][mask[b]] = _from_storage(cached[lo:hi], dtype)
        if not self.generation:
            index = np.asarray(cache_index.tolist())
            return _from_storage(self.arrays["logits.npy"][index], dtype), teacher_hidden
        width = int(vocab or self.meta["vocab"])
        k = int(self.meta["top_k"])
        values = torch.zeros(*mask.shape, k)
        indices = torch.zeros(*mask.shape, k, dtype=torch.long)
        fill = torch.zeros(*mask.shape)
        for b, (lo, hi) in enumerate(rows):
            values[b][mask[b]] = _from_storage(self.arrays["topk_values.npy"][lo:hi], dtype)
            indices[b][mask[b]] = torch.from_numpy(np.asarray(self.arrays["topk_indices.npy"][lo:hi], dtype=np.int64))
            fill[b][mask[b]] = torch.from_numpy(np.array(self.arrays["tail_logit.npy"][lo:hi]))
        return densify_teacher_logits(values, indices, fill, width), teacher_hidden


def _reopen(directory: str) -> TeacherCache:
    return TeacherCache.load(directory, check_files=False)


class IndexedCollate:
    """Wrap a collate so that each batch also carries ``cache_index``: the examples' rows in the teacher cache."""

    KEY = "cache_index"

    def __init__(self, collate: Callable[[list[dict]], dict]):
        self.collate = collate

    @staticmethod
    def index(features: Sequence[dict]) -> list[dict]:
        return [dict(feature, **{IndexedCollate.KEY: i}) for i, feature in enumerate(features)]

    def __call__(self, features: list[dict]) -> dict:
        batch = self.collate([{k: v for k, v in f.items() if k != self.KEY} for f in features])
        batch[self.KEY] = torch.tensor([f[self.KEY] for f in features], dtype=torch.long)
        return batch


def cached_distillation_loss(cache: TeacherCache, objective: torch.nn.Module, feature_mask: Callable[[dict], torch.Tensor],
                             vocab: int | None = None, compare_mask: Callable[[dict], torch.Tensor] | None = None):
    """Like ``train.distillation_loss`` but the teacher's outputs come from ``cache`` (no teacher forward).

    Called as ``loss_fn(model, batch)``; batches come from an ``IndexedCollate``. ``objective`` must be built with
    ``teacher_hidden = cache.width`` and, for Flex-KD, ``selected_units = cache.positions(units)``.
    ``feature_mask``: the positions the cache holds; ``compare_mask`` (default: the same): the positions, among
    those, whose hidden states the feature terms compare (``distill.feature_positions``).
    """
    compare_mask = compare_mask or feature_mask
    needs_hidden = bool(getattr(objective, "needs_teacher_hidden", False))

    def step(model, batch: dict):
        inputs = {k: v for k, v in batch.items() if k not in ("labels", IndexedCollate.KEY)}
        out = model(**inputs, output_hidden_states=needs_hidden)
        mask = feature_mask(batch)
        teacher_logits, teacher_hidden = cache.batch_outputs(batch[IndexedCollate.KEY].cpu(), mask.cpu(), hidden=needs_hidden,
                                                            vocab=vocab)
        device = out.logits.device  # the cache's rows are read on the host; copied to the student's device
        teacher_logits = teacher_logits.to(device, non_blocking=True)
        teacher_hidden = teacher_hidden.to(device, non_blocking=True) if teacher_hidden is not None else None
        return objective(
            student_logits=out.logits,
            student_hidden=out.hidden_states[-1] if needs_hidden else None,
            labels=batch["labels"],
            feature_mask=mask if compare_mask == feature_mask else compare_mask(batch) & mask.bool(),
            teacher_logits=teacher_logits,
            teacher_hidden=teacher_hidden,
        )

    return step
