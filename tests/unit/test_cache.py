"""The teacher-feature cache: the losses read from it equal the losses with the teacher online; bad caches are refused."""

import json

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from flexkd.cache import (CacheSpec, IndexedCollate, TeacherCache, build_cache, cache_columns, cached_distillation_loss,
                          features_hash)
from flexkd.data.tokenize import PadCollator
from flexkd.errors import ProvenanceError
from flexkd.losses import (build_objective, densify_teacher_logits, response_mask, sparse_teacher_parts,
                           sparsify_teacher_logits)
from flexkd.train import distillation_loss

PROVENANCE = {"teacher_weights_hash": "t", "data_fingerprint": "d", "relevance_index_hash": "r", "features_hash": "f"}


def bert(hidden, seed):
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(vocab_size=40, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=hidden * 2, num_labels=3)).eval()


def llama(hidden, seed, vocab=50):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def classification_data(n=24):
    g = torch.Generator().manual_seed(3)
    rows = []
    for _ in range(n):
        ids = [1] + torch.randint(5, 40, (3 + int(torch.randint(0, 9, (1,), generator=g)),), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "token_type_ids": [0] * len(ids), "labels": ids[1] % 3})
    return rows


def generation_data(n=16, vocab=50):
    g = torch.Generator().manual_seed(4)
    rows = []
    for _ in range(n):
        prompt = torch.randint(3, vocab, (2 + int(torch.randint(0, 5, (1,), generator=g)),), generator=g).tolist()
        response = torch.randint(3, vocab, (1 + int(torch.randint(0, 6, (1,), generator=g)),), generator=g).tolist()
        ids = prompt + response
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(prompt) + response})
    return rows


def generation_mask(batch):
    return response_mask(batch["labels"])


def classification_mask(batch):
    return batch["attention_mask"]


UNITS = [11, 2, 7, 0, 14, 5, 9, 3]  # the relevance order (a random-init student pairs in this order)


def _cache(tmp_path, teacher, data, mask, spec, name="cache"):
    build_cache(teacher, data, PadCollator(0), mask, tmp_path / name, spec, provenance=PROVENANCE, batch_size=5, progress=False)
    return TeacherCache.load(tmp_path / name)


def _compare(teacher, student, cache, data, mask, method, units, tol, **kwargs):
    objective_args = dict(alpha=0.5, temperature=2.0, feature_weight=0.7, student_hidden=8, **kwargs)
    online = build_objective(method, teacher_hidden=16, selected_units=units if method == "flexkd" else None, **objective_args)
    cached = build_objective(method, teacher_hidden=cache.width or 16,
                             selected_units=cache.positions(units) if method == "flexkd" else None, **objective_args)
    if method == "projector":
        cached.load_state_dict(online.state_dict())
    online_fn = distillation_loss(student, teacher, online, mask)
    cached_fn = cached_distillation_loss(cache, cached, mask, vocab=kwargs.get("shared_vocab"))
    indexed = IndexedCollate.index(data)
    collate = IndexedCollate(PadCollator(0))
    for order in ([0, 5, 9, 13, 2, 7], [1, 3, 4, 6, 8, 10, 11]):  # other batch compositions than the cache's
        batch = collate([indexed[i] for i in order])
        plain = PadCollator(0)([data[i] for i in order])
        loss_online, terms_online = online_fn(student, plain)
        loss_cached, terms_cached = cached_fn(student, batch)
        assert set(terms_online) == set(terms_cached)
        for name in terms_online:
            assert torch.allclose(terms_online[name], terms_cached[name], rtol=tol, atol=tol), (method, name)
        assert torch.allclose(loss_online, loss_cached, rtol=tol, atol=tol)
        # gradients flow into the student through the cached loss the same way
        student.zero_grad()
        loss_cached.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


@pytest.mark.parametrize("method", ["kd", "flexkd"])
@pytest.mark.parametrize("order", ["relevance", "sorted"])
def test_selected_cache_gives_the_online_losses_classification(tmp_path, method, order):
    teacher, student, data = bert(16, 0), bert(8, 1), classification_data()
    units = UNITS if order == "relevance" else sorted(UNITS)
    cache = _cache(tmp_path, teacher, data, classification_mask, CacheSpec(columns=sorted(UNITS), d_teacher=16, generation=False))
    assert cache.width == 8 and cache.serves(units) and not cache.serves(range(16))
    _compare(teacher, student, cache, data, classification_mask, method, units, tol=1e-5)


@pytest.mark.parametrize("method", ["projector", "cka", "flexkd"])
def test_full_width_cache_serves_the_baselines(tmp_path, method):
    teacher, student, data = bert(16, 0), bert(8, 1), classification_data()
    cache = _cache(tmp_path, teacher, data, classification_mask, CacheSpec(columns=list(range(16)), d_teacher=16, generation=False))
    _compare(teacher, student, cache, data, classification_mask, method, UNITS, tol=1e-5)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl"])
@pytest.mark.parametrize("method", ["kd", "flexkd"])
def test_generation_cache_of_top_k_logits_gives_the_online_losses(tmp_path, kind, method):
    teacher, student, data = llama(16, 0), llama(8, 1), generation_data()
    spec = CacheSpec(columns=sorted(UNITS), d_teacher=16, generation=True, top_k=6, temperature=2.0, vocab=50)
    cache = _cache(tmp_path, teacher, data, generation_mask, spec)
    _compare(teacher, student, cache, data, generation_mask, method, UNITS, tol=1e-5, logit_loss=kind,
             shared_vocab=50, teacher_top_k=6)


def test_sparse_teacher_keeps_the_top_k_probabilities_and_the_tail_mass():
    torch.manual_seed(0)
    logits = torch.randn(4, 7, 30) * 3
    tau = 1.5
    sparse = sparsify_teacher_logits(logits, 5, tau)
    p, q = torch.softmax(logits / tau, -1), torch.softmax(sparse / tau, -1)
    top = logits.topk(5, dim=-1).indices
    assert torch.allclose(p.gather(-1, top), q.gather(-1, top), atol=1e-6)
    assert torch.allclose(q.sum(-1), torch.ones(4, 7), atol=1e-5)
    rest = torch.ones_like(q, dtype=torch.bool).scatter_(-1, top, False)
    tail = q[rest].view(4, 7, 25)
    assert torch.allclose(tail, tail[..., :1].expand_as(tail), atol=1e-7)  # spread evenly
    assert torch.allclose(sparsify_teacher_logits(sparse, 5, tau), sparse, atol=1e-5)  # idempotent
    values, indices, fill = sparse_teacher_parts(logits, 30, tau)  # k = V keeps everything
    assert torch.allclose(densify_teacher_logits(values, indices, fill, 30), logits)


def test_float16_cache_is_half_the_size_and_close(tmp_path):
    teacher, student, data = bert(16, 0), bert(8, 1), classification_data()
    exact = _cache(tmp_path, teacher, data, classification_mask, CacheSpec(columns=sorted(UNITS), d_teacher=16, generation=False), "f32")
    half = _cache(tmp_path, teacher, data, classification_mask,
                  CacheSpec(columns=sorted(UNITS), d_teacher=16, generation=False, dtype="float16"), "f16")
    assert half.arrays["hidden.npy"].nbytes * 2 == exact.arrays["hidden.npy"].nbytes
    _compare(teacher, student, half, data, classification_mask, "flexkd", UNITS, tol=5e-3)
    bf16 = _cache(tmp_path, teacher, data, classification_mask,
                  CacheSpec(columns=sorted(UNITS), d_teacher=16, generation=False, dtype="bfloat16"), "bf16")
    _compare(teacher, student, bf16, data, classification_mask, "flexkd", UNITS, tol=3e-2)


def test_selected_cache_stores_d_s_not_d_t_per_position(tmp_path):
    teacher, data = bert(16, 0), classification_data()
    cache = _cache(tmp_path, teacher, data, classification_mask, CacheSpec(columns=sorted(UNITS), d_teacher=16, generation=False))
    positions = sum(len(row["input_ids"]) for row in data)
    assert cache.meta["n_positions"] == positions
    assert cache.arrays["hidden.npy"].shape == (positions, 8)
    assert cache.meta["full_width_bytes"] - cache.meta["bytes"] == positions * 8 * 4
    assert isinstance(cache.arrays["hidden.npy"], np.memmap)


def test_columns_follow_the_mode():
    assert cache_columns("selected", [5, 1, 3], 8, ["kd", "flexkd"]) == [1, 3, 5]
    assert cache_columns("full", [5, 1, 3], 8, ["flexkd"]) == list(range(8))
    assert cache_columns("auto", [5, 1, 3], 8, ["ft", "flexkd"]) == [1, 3, 5]
    assert cache_columns("auto", [5, 1, 3], 8, ["projector", "flexkd"]) == list(range(8))


def test_corrupted_cache_is_refused(tmp_path):
    teacher, data = bert(16, 0), classification_data()
    cache = _cache(tmp_path, teacher, data, classification_mask, CacheSpec(columns=sorted(UNITS), d_teacher=16, generation=False))
    path = cache.directory / "hidden.npy"
    del cache
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(ProvenanceError, match="hidden.npy.*sha256"):
        TeacherCache.load(tmp_path / "cache")
    path.unlink()
    with pytest.raises(ProvenanceError, match="do not match its metadata"):
        TeacherCache.load(tmp_path / "cache")
    with pytest.raises(ProvenanceError, match="no teacher cache"):
        TeacherCache.load(tmp_path / "nothing")


def test_cache_of_other_inputs_is_refused_naming_the_field(tmp_path):
    teacher, data = bert(16, 0), classification_data()
    cache = _cache(tmp_path, teacher, data, classification_mask, CacheSpec(columns=sorted(UNITS), d_teacher=16, generation=False))
    cache.verify(**PROVENANCE)
    with pytest.raises(ProvenanceError, match="teacher_weights_hash: expected 'other'"):
        cache.verify(**dict(PROVENANCE, teacher_weights_hash="other"))
    with pytest.raises(ProvenanceError, match="relevance_index_hash"):
        cache.verify(relevance_index_hash="new index")
    assert features_hash(data) != features_hash(data[1:] + data[:1])


def test_batch_of_another_tokenisation_is_refused(tmp_path):
    teacher, data = bert(16, 0), classification_data()
    cache = _cache(tmp_path, teacher, data, classification_mask, CacheSpec(columns=sorted(UNITS), d_teacher=16, generation=False))
    longer = [dict(row, input_ids=row["input_ids"] + [7], attention_mask=row["attention_mask"] + [1],
                   token_type_ids=row["token_type_ids"] + [0]) for row in data]
    batch = IndexedCollate(PadCollator(0))(IndexedCollate.index(longer)[:4])
    with pytest.raises(ProvenanceError, match="does not belong to this tokenisation"):
        cache.batch_outputs(batch["cache_index"], batch["attention_mask"], hidden=True)


def test_meta_records_provenance(tmp_path):
    teacher, data = llama(16, 0), generation_data()
    spec = CacheSpec(columns=sorted(UNITS), d_teacher=16, generation=True, top_k=4, temperature=2.0, vocab=50)
    cache = _cache(tmp_path, teacher, data, generation_mask, spec)
    meta = json.loads((cache.directory / "meta.json").read_text())
    assert meta["provenance"] == PROVENANCE and meta["top_k"] == 4 and meta["temperature"] == 2.0
    cache.verify(temperature=2.0, top_k=4)
    with pytest.raises(ProvenanceError, match="temperature"):
        cache.verify(temperature=1.0)


def test_cache_travels_to_training_processes_by_path(tmp_path):
    import pickle

    teacher, data = bert(16, 0), classification_data()
    cache = _cache(tmp_path, teacher, data, classification_mask, CacheSpec(columns=sorted(UNITS), d_teacher=16, generation=False))
    blob = pickle.dumps(cache)
    assert len(blob) < 1000  # the path, not the arrays
    again = pickle.loads(blob)
    assert again.meta == cache.meta and np.array_equal(again.arrays["hidden.npy"], cache.arrays["hidden.npy"])
