"""Tests of flexkd.generate: left-padded batched generation on tiny random Llama and GPT-2 models with an offline
WordLevel tokenizer, and ROUGE-L golden values (hand-computed LCS)."""

import statistics

import pytest
import torch
from torch import nn

from flexkd.errors import ConfigError, DataError
from flexkd.generate import corpus_rouge_l, evaluate_generation, generate_texts, rouge_l, sample_table

WORDS = (
    "the a cat dog sat ran on mat big small red blue and is was run running jumped over fox quick brown lazy "
    "house tree sun moon sky"
).split()
SPECIALS = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
PAD, BOS, EOS = 0, 2, 3
PROMPTS = ["the cat sat on", "a dog", "big red fox jumped over the lazy", "sun", "the quick brown"]


def _tokenizer(with_pad=True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(SPECIALS)
    for word in WORDS:
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    kwargs = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if with_pad:
        kwargs["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer()


def _llama(vocab, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )
    return LlamaForCausalLM(config).eval()


def _gpt2(vocab, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_embd=16, n_layer=1, n_head=2, n_positions=64, bos_token_id=BOS, eos_token_id=EOS
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def models(tokenizer):
    return {"llama": _llama(len(tokenizer)), "gpt2": _gpt2(len(tokenizer))}


def _biased_head(model, bias: dict[int, float]):
    """Replace the LM head by a copy with a bias (the tiny models' heads have none)."""
    old = model.get_output_embeddings()
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        for token, value in bias.items():
            head.bias[token] = value
    model.lm_head = head
    model.config.tie_word_embeddings = False
    return model


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_greedy_equals_one_by_one(arch, models, tokenizer):
    model = models[arch]
    batched = generate_texts(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=5)
    single = [generate_texts(model, tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    assert any(batched)  # not trivially empty
    assert generate_texts(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=2) == batched  # greedy repeats
    assert tokenizer.padding_side == "right"  # tokenizer left as it was


def test_token_id_prompts_and_prompt_truncation(models, tokenizer):
    model = models["llama"]
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    assert generate_texts(model, tokenizer, ids, max_new_tokens=4) == generate_texts(
        model, tokenizer, PROMPTS, max_new_tokens=4
    )
    # max_prompt_tokens keeps the last tokens.
    long_prompt = "big red fox jumped over the lazy"
    assert generate_texts(model, tokenizer, [long_prompt], max_new_tokens=4, max_prompt_tokens=2) == generate_texts(
        model, tokenizer, ["the lazy"], max_new_tokens=4
    )


def test_max_new_tokens_respected_and_eos_stops(tokenizer):
    no_specials = _biased_head(_llama(len(tokenizer), seed=1), {PAD: -50.0, 1: -50.0, BOS: -50.0, EOS: -50.0})
    for n in (1, 3, 7):
        outputs = generate_texts(no_specials, tokenizer, PROMPTS[:3], max_new_tokens=n)
        assert [len(o.split()) for o in outputs] == [n] * 3
    eos_first = _biased_head(_llama(len(tokenizer), seed=1), {EOS: 50.0})
    assert generate_texts(eos_first, tokenizer, PROMPTS, max_new_tokens=8, batch_size=2) == [""] * len(PROMPTS)


def test_pad_token_falls_back_to_eos_and_training_mode_restored(models):
    tok = _tokenizer(with_pad=False)
    assert tok.pad_token is None
    model = models["gpt2"]
    model.train()
    try:
        outputs = generate_texts(model, tok, PROMPTS, max_new_tokens=5, batch_size=5)
        assert model.training
    finally:
        model.eval()
    assert tok.pad_token is None
    assert outputs == [generate_texts(model, tok, [p], max_new_tokens=5)[0] for p in PROMPTS]


def test_sampling_repeats_with_seed_and_differs_across_seeds(models, tokenizer):
    model = models["llama"]
    kwargs = dict(max_new_tokens=8, do_sample=True, batch_size=3)
    first = generate_texts(model, tokenizer, PROMPTS, seed=11, **kwargs)
    assert generate_texts(model, tokenizer, PROMPTS, seed=11, **kwargs) == first
    assert generate_texts(model, tokenizer, PROMPTS, seed=12, **kwargs) != first


def test_generate_refusals(models, tokenizer):
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate_texts(models["llama"], tokenizer, PROMPTS, max_new_tokens=0)
    with pytest.raises(ConfigError, match="prompt 1"):
        generate_texts(models["llama"], tokenizer, ["ok", 3.5])


# ---------------------------------------------------------------- ROUGE-L


def test_rouge_l_golden_values():
    assert rouge_l("the cat sat on the mat", ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert rouge_l("blue sky", ["the cat sat"]) == 0.0
    # LCS(the cat sat on the mat, the cat is on the mat) = 5 of 6 tokens each: P = R = F = 5/6.
    assert rouge_l("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(5 / 6)
    # LCS = 3; P = 3/3, R = 3/5 -> F = 2 * 1 * 0.6 / 1.6 = 0.75.
    assert rouge_l("the cat sat", ["the big cat sat down"]) == pytest.approx(0.75)
    assert rouge_l("", ["the cat"]) == 0.0 and rouge_l("   ", ["the cat"]) == 0.0
    with pytest.raises(ConfigError, match="references"):
        rouge_l("the cat", [])


def test_rouge_l_best_reference_and_stemming_and_case():
    assert rouge_l("the cat sat", ["a dog ran", "the big cat sat down", "the cat sat"]) == pytest.approx(1.0)
    assert rouge_l("the cat sat", ["a dog ran", "the big cat sat down"]) == pytest.approx(0.75)
    assert rouge_l("running", ["run"]) == pytest.approx(1.0)
    assert rouge_l("The Cat, sat!", ["the cat sat"]) == pytest.approx(1.0)


def test_corpus_rouge_l_in_points():
    predictions = ["the cat sat", "x y", ""]
    references = [["the cat sat"], ["the big cat sat down", "x y z w"], ["a"]]
    # 1.0; "x y" vs "x y z w": P = 1, R = 1/2 -> F = 2/3; empty -> 0.
    assert corpus_rouge_l(predictions, references) == pytest.approx(100 * (1.0 + 2 / 3 + 0.0) / 3)
    with pytest.raises(ConfigError, match="2 predictions but 1"):
        corpus_rouge_l(["a", "b"], [["a"]])


# ---------------------------------------------------------------- evaluation and sample table


def _records(references):
    return [{"prompt": p, "references": refs} for p, refs in zip(PROMPTS, references)]


def test_evaluate_generation_greedy_and_sampled(models, tokenizer):
    model = models["llama"]
    greedy = generate_texts(model, tokenizer, PROMPTS, max_new_tokens=5)
    records = _records([[g or "sky"] for g in greedy])
    result = evaluate_generation(model, tokenizer, records, lambda r: r["prompt"], max_new_tokens=5, batch_size=2)
    assert set(result) == {"rougeL", "predictions"} and result["predictions"] == greedy
    assert result["rougeL"] == pytest.approx(corpus_rouge_l(greedy, [r["references"] for r in records]))

    sampled = generate_texts(model, tokenizer, PROMPTS, max_new_tokens=5, do_sample=True, seed=1, batch_size=2)
    records = _records([[s or "sky"] for s in sampled])
    result = evaluate_generation(
        model, tokenizer, records, lambda r: r["prompt"], max_new_tokens=5, batch_size=2, seeds=[1, 2], do_sample=True
    )
    assert set(result) == {"rougeL", "rougeL_std", "rougeL_per_seed", "predictions"}
    per_seed = result["rougeL_per_seed"]
    assert set(per_seed) == {1, 2}
    assert per_seed[1] == pytest.approx(corpus_rouge_l(sampled, [r["references"] for r in records]))
    assert per_seed[2] < per_seed[1]
    assert result["rougeL"] == pytest.approx((per_seed[1] + per_seed[2]) / 2)
    assert result["rougeL_std"] == pytest.approx(statistics.stdev([per_seed[1], per_seed[2]]))
    assert result["predictions"] == sampled
    with pytest.raises(DataError, match="record 0.*references"):
        evaluate_generation(model, tokenizer, [{"prompt": "a"}], lambda r: r["prompt"], max_new_tokens=2, batch_size=1)


def test_sample_table():
    records = _records([["r0"], ["r1a", "r1b"], ["r2"], ["r3"], ["r4"]])
    table = sample_table(records, {"teacher": list("abcde"), "student": list("vwxyz")}, n=3)
    assert list(table.columns) == ["prompt", "reference", "teacher", "student"]
    assert table["prompt"].tolist() == PROMPTS[:3]
    assert table["reference"].tolist() == ["r0", "r1a || r1b", "r2"]
    assert table["student"].tolist() == ["v", "w", "x"]
    with pytest.raises(ConfigError, match="'student' has 2 predictions"):
        sample_table(records, {"student": ["a", "b"]}, n=3)


def test_rouge_l_without_rouge_score_is_rouge_scores_unstemmed_lcs(data_dir):
    """A bare GPU image has no rouge-score: the fallback equals rouge-score without stemming on real text."""
    import json

    from rouge_score import rouge_scorer

    from flexkd.generate import _LcsRougeL

    records = json.loads((data_dir / "alpaca_5k" / "alpaca_data_first5k.json").read_text())[:40]
    unstemmed = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    fallback = _LcsRougeL()
    pairs = [(a["output"], b["output"]) for a, b in zip(records, records[1:])] + [(r["output"], r["instruction"]) for r in records]
    for reference, prediction in pairs:
        expected = unstemmed.score(reference, prediction)["rougeL"].fmeasure
        assert fallback.score(reference, prediction)["rougeL"].fmeasure == pytest.approx(expected, abs=1e-12)
    assert fallback.score("the cat", "")["rougeL"].fmeasure == 0.0
    assert fallback.score("the cat sat", "the cat sat")["rougeL"].fmeasure == 1.0
