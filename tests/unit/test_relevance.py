"""Tests of flexkd.relevance on tiny random BERT and Llama models. The expected scores come from separate
per-example forward/backward passes (each example alone, unpadded) and a numpy mean, not from score_units."""

import json

import numpy as np
import pytest
import torch
import transformers

from flexkd.errors import ConfigError, ProvenanceError
from flexkd.relevance import RelevanceIndex, plot_scores, score_units, select_units

HIDDEN = 16


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        num_labels=3,
    )
    model = transformers.BertForSequenceClassification(config).eval()
    return model


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


# Examples of different lengths, right-padded in batches.
LENGTHS = [6, 4, 5, 3, 6]
G = torch.Generator().manual_seed(1)
TOKENS = [torch.randint(1, 100, (n,), generator=G) for n in LENGTHS]
CLASS_LABELS = [0, 2, 1, 1, 0]


def _pad(rows, value):
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _bert_batches(groups):
    batches = []
    for group in groups:
        ids = _pad([TOKENS[i] for i in group], 0)
        mask = _pad([torch.ones(LENGTHS[i], dtype=torch.long) for i in group], 0)
        batches.append(
            {
                "input_ids": ids,
                "attention_mask": mask,
                "token_type_ids": torch.zeros_like(ids),
                "labels": torch.tensor([CLASS_LABELS[i] for i in group]),
            }
        )
    return batches


def _g(grad, hidden, method):
    return {"grad": np.abs(grad), "grad_x_act": np.abs(grad * hidden), "fisher": grad**2}[method]


def _reference_classification(model, examples, method):
    """Each example alone, no padding: dL_i/dH by its own backward pass; mean over its tokens; mean over examples."""
    per_example = []
    for i in examples:
        ids = TOKENS[i][None]
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
        hidden = out.hidden_states[-1]
        loss = torch.nn.functional.cross_entropy(out.logits, torch.tensor([CLASS_LABELS[i]]))
        (grad,) = torch.autograd.grad(loss, hidden)
        g = _g(grad[0].double().numpy(), hidden[0].detach().double().numpy(), method)
        per_example.append(g.mean(axis=0))
    return np.mean(per_example, axis=0)


def test_bert_hidden_states_last_feeds_the_head(bert):
    ids = TOKENS[0][None]
    out = bert(input_ids=ids, output_hidden_states=True)
    hidden = out.hidden_states[-1]
    manual = bert.classifier(bert.bert.pooler(hidden))
    assert torch.allclose(manual, out.logits, atol=1e-6)
    (grad,) = torch.autograd.grad(out.logits.sum(), hidden)
    assert grad[0, 0].abs().sum() > 0 and grad[0, 1:].abs().sum() == 0  # only [CLS] feeds the pooler


def test_llama_hidden_states_last_is_the_normed_input_of_lm_head(llama):
    ids = TOKENS[0][None]
    out = llama(input_ids=ids, output_hidden_states=True)
    assert torch.allclose(llama.lm_head(out.hidden_states[-1]), out.logits, atol=1e-6)


@pytest.mark.parametrize("method", ["grad", "grad_x_act", "fisher"])
def test_classification_scores_equal_per_example_gradients(bert, method):
    scores, n = score_units(bert, _bert_batches([[0, 1, 2], [3, 4]]), method=method)
    expected = _reference_classification(bert, range(5), method)
    assert n == 5 and scores.shape == (HIDDEN,) and scores.dtype == torch.float32
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-4, atol=1e-9)


def test_padding_does_not_count(bert):
    alone, _ = score_units(bert, _bert_batches([[1]]))  # length 4, unpadded
    padded, _ = score_units(bert, _bert_batches([[0, 1]]))  # padded to 6
    first, _ = score_units(bert, _bert_batches([[0]]))
    torch.testing.assert_close(padded, (alone + first) / 2, rtol=1e-4, atol=1e-9)


def test_frozen_model_is_scored_without_parameter_grads_and_mode_restored(bert):
    expected, _ = score_units(bert, _bert_batches([[0, 1]]))
    bert.train()
    for p in bert.parameters():
        p.requires_grad_(False)
    try:
        scores, _ = score_units(bert, _bert_batches([[0, 1]]))
        assert bert.training
        assert all(p.grad is None for p in bert.parameters())
    finally:
        bert.eval()
        for p in bert.parameters():
            p.requires_grad_(True)
    torch.testing.assert_close(scores, expected)  # eval mode inside: dropout off


def test_max_examples_truncates_last_batch(bert):
    truncated, n = score_units(bert, _bert_batches([[0, 1], [2, 3], [4]]), max_examples=3)
    first_three, n3 = score_units(bert, _bert_batches([[0, 1, 2]]))
    assert n == n3 == 3
    torch.testing.assert_close(truncated, first_three, rtol=1e-4, atol=1e-9)


def test_unknown_method_and_task_refused(bert):
    with pytest.raises(ConfigError, match="grad, grad_x_act, fisher"):
        score_units(bert, _bert_batches([[0]]), method="taylor")
    with pytest.raises(ConfigError, match="causal_lm"):
        score_units(bert, _bert_batches([[0]]), task="seq2seq")


# ---------------------------------------------------------------- causal LM

PROMPT = [2, 3, 1, 2, 4]  # prompt lengths per example; the rest of each sequence is the response


def _lm_labels(i, prompt_len):
    labels = TOKENS[i].clone()
    labels[:prompt_len] = -100
    return labels


def _lm_batches(groups, prompt=PROMPT):
    batches = []
    for group in groups:
        batches.append(
            {
                "input_ids": _pad([TOKENS[i] for i in group], 0),
                "attention_mask": _pad([torch.ones(LENGTHS[i], dtype=torch.long) for i in group], 0),
                "labels": _pad([_lm_labels(i, prompt[i]) for i in group], -100),
            }
        )
    return batches


def _reference_lm(model, examples, method, prompt=PROMPT):
    per_example = []
    for i in examples:
        ids = TOKENS[i][None]
        labels = _lm_labels(i, prompt[i])
        out = model(input_ids=ids, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        positions = [t for t in range(len(labels) - 1) if labels[t + 1] != -100]
        nll = [-torch.log_softmax(out.logits[0, t], -1)[labels[t + 1]] for t in positions]
        loss = torch.stack(nll).mean()
        (grad,) = torch.autograd.grad(loss, hidden)
        g = _g(grad[0].double().numpy(), hidden[0].detach().double().numpy(), method)
        per_example.append(g[positions].mean(axis=0))
    return np.mean(per_example, axis=0)


@pytest.mark.parametrize("method", ["grad", "fisher"])
def test_causal_lm_scores_response_positions_only(llama, method):
    scores, n = score_units(llama, _lm_batches([[0, 1, 2], [3, 4]]), method=method, task="causal_lm")
    assert n == 5
    np.testing.assert_allclose(scores.numpy(), _reference_lm(llama, range(5), method), rtol=1e-4, atol=1e-9)


def test_causal_lm_prompt_labels_matter(llama):
    with_prompt_masked, _ = score_units(llama, _lm_batches([[0, 1]]), task="causal_lm")
    everything = [0, 0, 0, 0, 0]
    with_all_labels, _ = score_units(llama, _lm_batches([[0, 1]], prompt=everything), task="causal_lm")
    assert not torch.allclose(with_prompt_masked, with_all_labels)
    np.testing.assert_allclose(
        with_all_labels.numpy(), _reference_lm(llama, [0, 1], "grad", prompt=everything), rtol=1e-4, atol=1e-9
    )


def test_causal_lm_example_without_response_is_skipped(llama):
    no_response = [2, 10, 1, 2, 4]  # example 1 (length 4) has no response token
    with pytest.warns(UserWarning, match="skipped 1"):
        scores, n = score_units(llama, _lm_batches([[0, 1, 2]], prompt=no_response), task="causal_lm")
    assert n == 2
    reference, _ = score_units(llama, _lm_batches([[0, 2]]), task="causal_lm")
    torch.testing.assert_close(scores, reference, rtol=1e-4, atol=1e-9)


# ---------------------------------------------------------------- selection


def test_select_units_top_k_sorted_and_ties():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.0, 0.7])
    assert select_units(scores, 3).tolist() == [1, 3, 5]
    assert select_units(scores, 3, order="score").tolist() == [1, 3, 5]
    assert select_units(scores, 4, order="score").tolist() == [1, 3, 5, 2]
    assert select_units(scores, 4).tolist() == [1, 2, 3, 5]
    ties = torch.tensor([1.0, 2.0, 2.0, 2.0])
    assert select_units(ties, 2).tolist() == [1, 2]  # lower index wins a tie
    picked = select_units(torch.rand(50), 20)
    assert picked.dtype == torch.long and len(set(picked.tolist())) == 20 and picked.tolist() == sorted(picked.tolist())


def test_select_units_refuses_bad_k():
    with pytest.raises(ConfigError, match=r"k=7.*d_T=6"):
        select_units(torch.rand(6), 7)
    with pytest.raises(ConfigError, match=r"k=0.*d_T=6"):
        select_units(torch.rand(6), 0)
    with pytest.raises(ConfigError, match="order"):
        select_units(torch.rand(6), 2, order="random")


# ---------------------------------------------------------------- the artifact


def _index(k=4):
    scores = torch.linspace(0.0, 1.0, HIDDEN).flip(0) ** 2
    return RelevanceIndex.from_scores(
        scores, k, method="grad", n_examples=5, teacher="tiny-bert", teacher_weights_hash="abc",
        data_fingerprint="data123",
    )


def test_index_round_trip(tmp_path):
    index = _index()
    path = index.save(tmp_path / "relevance" / "tiny.json")
    loaded = RelevanceIndex.load(path)
    assert loaded == index
    assert loaded.selected.tolist() == [0, 1, 2, 3] and loaded.selected.dtype == torch.long
    assert loaded.layer == "hidden_states[-1]" and loaded.d_teacher == HIDDEN and loaded.k == 4
    assert list(tmp_path.joinpath("relevance").iterdir()) == [path]  # no temporary file left behind
    loaded.verify(teacher_weights_hash="abc", data_fingerprint="data123", method="grad", k=4)


def test_index_tamper_and_corruption_detected(tmp_path):
    path = _index().save(tmp_path / "idx.json")
    record = json.loads(path.read_text())
    record["indices"][0] = 9
    path.write_text(json.dumps(record))
    with pytest.raises(ProvenanceError, match="idx.json.*hash"):
        RelevanceIndex.load(path)
    path.write_text("{not json")
    with pytest.raises(ProvenanceError, match="idx.json.*JSON"):
        RelevanceIndex.load(path)
    del record["method"]
    path.write_text(json.dumps(record))
    with pytest.raises(ProvenanceError, match="idx.json.*method"):
        RelevanceIndex.load(path)


def test_index_created_at_not_hashed(tmp_path):
    path = _index().save(tmp_path / "idx.json")
    record = json.loads(path.read_text())
    record["created_at"] = "2000-01-01T00:00:00+00:00"
    path.write_text(json.dumps(record))
    assert RelevanceIndex.load(path).created_at.startswith("2000")


def test_verify_names_each_mismatch():
    index = _index()
    with pytest.raises(ProvenanceError) as error:
        index.verify(teacher_weights_hash="zzz", data_fingerprint="data123", method="fisher", k=8)
    message = str(error.value)
    assert "teacher_weights_hash: expected 'zzz'" in message and "'abc'" in message
    assert "method: expected 'fisher'" in message and "k: expected 8" in message
    assert "data_fingerprint" not in message and "relevance stage" in message


def test_plot_scores_writes_png(tmp_path):
    path = plot_scores(_index(), tmp_path / "plots" / "scores.png")
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
