"""Relevance-guided pruning (flexkd/prune.py) on tiny random Llama / Qwen2 / Mistral / BERT / GPT-2 models."""

from __future__ import annotations

import types

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from flexkd.errors import ConfigError
from flexkd.prune import (
    PrunePlan,
    activation_importance,
    channel_importance_from_weights,
    describe,
    head_importance_from_weights,
    prune_model,
)

VOCAB = 64
S_HALF = [0, 3, 4, 7, 9, 10, 13, 15, 16, 18, 21, 22, 25, 27, 28, 31]  # 16 of 32 units, ascending


def _llama(tied=False, kv=2, layers=3, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=kv, head_dim=8, tie_word_embeddings=tied, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def _bert(seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                        num_labels=3, max_position_embeddings=32, pad_token_id=0)
    return BertForSequenceClassification(config).eval()


def _gpt2(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=32, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


def _qwen2(seed=0):
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    return Qwen2ForCausalLM(config).eval()


def _ids(seed=1, shape=(2, 7)):
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _rows(heads, size=8):
    return torch.tensor([h * size + j for h in heads for j in range(size)])


# ------------------------------------------------------------------------------------------------------------ identity


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: _llama(tied=False), id="llama-gqa-untied"),
        pytest.param(lambda: _llama(tied=True), id="llama-gqa-tied"),
        pytest.param(lambda: _llama(kv=4), id="llama-mha"),
        pytest.param(_qwen2, id="qwen2-bias"),
        pytest.param(lambda: MistralForCausalLM(MistralConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, bos_token_id=1, eos_token_id=2)).eval(), id="mistral"),
        pytest.param(_gpt2, id="gpt2"),
    ],
)
def test_keeping_everything_reproduces_the_teacher_causal_lm(make):
    teacher = make()
    student = prune_model(teacher, PrunePlan(list(range(32))))
    assert type(student) is type(teacher) and student is not teacher
    ids = _ids()
    with torch.no_grad():
        assert torch.allclose(student(ids).logits, teacher(ids).logits, atol=1e-5)


def test_keeping_everything_reproduces_the_teacher_bert_classifier():
    teacher = _bert()
    student = prune_model(teacher, PrunePlan(list(range(32))))
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    types_ = torch.zeros_like(ids)
    types_[:, 4:] = 1
    with torch.no_grad():
        a = student(input_ids=ids, attention_mask=mask, token_type_ids=types_).logits
        b = teacher(input_ids=ids, attention_mask=mask, token_type_ids=types_).logits
    assert a.shape == (2, 3) and torch.allclose(a, b, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------ slicing


def test_llama_subset_equals_slicing_by_hand():
    teacher = _llama(tied=False)
    S = torch.tensor(S_HALF)
    heads = {i: torch.tensor([0.1, 0.9, 0.8, 0.2]) for i in range(3)}  # group 0 -> head 1, group 1 -> head 2
    channels = {i: torch.arange(48, dtype=torch.float).flip(0) + 100 * (i == 1) for i in range(3)}  # top-20 = 0..19
    student = prune_model(teacher, PrunePlan(S_HALF, num_heads=2, intermediate_size=20),
                          head_importance=heads, channel_importance=channels)
    c = student.config
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size) == (16, 2, 2, 8, 20)
    q_rows, ch = _rows([1, 2]), torch.arange(20)
    tm, sm = teacher.model, student.model
    for i in range(3):
        ta, sa = tm.layers[i].self_attn, sm.layers[i].self_attn
        assert torch.equal(sa.q_proj.weight, ta.q_proj.weight[q_rows][:, S])
        assert torch.equal(sa.k_proj.weight, ta.k_proj.weight[:, S])
        assert torch.equal(sa.v_proj.weight, ta.v_proj.weight[:, S])
        assert torch.equal(sa.o_proj.weight, ta.o_proj.weight[S][:, q_rows])
        tmlp, smlp = tm.layers[i].mlp, sm.layers[i].mlp
        assert torch.equal(smlp.gate_proj.weight, tmlp.gate_proj.weight[ch][:, S])
        assert torch.equal(smlp.up_proj.weight, tmlp.up_proj.weight[ch][:, S])
        assert torch.equal(smlp.down_proj.weight, tmlp.down_proj.weight[S][:, ch])
        assert torch.equal(sm.layers[i].input_layernorm.weight, tm.layers[i].input_layernorm.weight[S])
        assert torch.equal(sm.layers[i].post_attention_layernorm.weight, tm.layers[i].post_attention_layernorm.weight[S])
    assert torch.equal(sm.norm.weight, tm.norm.weight[S])
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight[:, S])
    # student unit i is teacher unit S[i]
    for i, j in enumerate(S_HALF):
        assert torch.equal(sm.embed_tokens.weight[:, i], tm.embed_tokens.weight[:, j])
    with torch.no_grad():
        assert student(_ids()).logits.shape == (2, 7, VOCAB)


def test_qwen2_biases_follow_the_kept_heads():
    teacher = _qwen2()
    heads = {i: torch.tensor([0.9, 0.1, 0.2, 0.8]) for i in range(2)}  # group 0 -> head 0, group 1 -> head 3
    student = prune_model(teacher, PrunePlan(S_HALF, num_heads=2), head_importance=heads)
    ta, sa = teacher.model.layers[1].self_attn, student.model.layers[1].self_attn
    rows = _rows([0, 3])
    assert torch.equal(sa.q_proj.bias, ta.q_proj.bias[rows])
    assert torch.equal(sa.k_proj.bias, ta.k_proj.bias) and torch.equal(sa.v_proj.bias, ta.v_proj.bias)
    assert torch.equal(sa.q_proj.weight, ta.q_proj.weight[rows][:, S_HALF])


def test_tied_embeddings_stay_tied():
    teacher = _llama(tied=True)
    student = prune_model(teacher, PrunePlan(S_HALF))
    assert student.config.tie_word_embeddings
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    assert torch.equal(student.lm_head.weight, teacher.model.embed_tokens.weight[:, S_HALF])


def test_bert_subset_equals_slicing_by_hand():
    teacher = _bert()
    S = torch.tensor(S_HALF)  # d_S = 16, head size 8 -> 2 heads
    heads = {0: torch.tensor([1.0, 5.0, 3.0, 2.0]), 1: torch.tensor([4.0, 1.0, 1.0, 3.0])}
    channels = {i: torch.arange(48, dtype=torch.float) for i in range(2)}  # top-24 = 24..47
    student = prune_model(teacher, PrunePlan(S_HALF, intermediate_size=24), head_importance=heads, channel_importance=channels)
    assert (student.config.hidden_size, student.config.num_attention_heads, student.config.intermediate_size) == (16, 2, 24)
    ch = torch.arange(24, 48)
    for i, kept in ((0, [1, 2]), (1, [0, 3])):
        rows = _rows(kept)
        tl, sl = teacher.bert.encoder.layer[i], student.bert.encoder.layer[i]
        for name in ("query", "key", "value"):
            assert torch.equal(getattr(sl.attention.self, name).weight, getattr(tl.attention.self, name).weight[rows][:, S])
            assert torch.equal(getattr(sl.attention.self, name).bias, getattr(tl.attention.self, name).bias[rows])
        assert torch.equal(sl.attention.output.dense.weight, tl.attention.output.dense.weight[S][:, rows])
        assert torch.equal(sl.attention.output.dense.bias, tl.attention.output.dense.bias[S])
        assert torch.equal(sl.attention.output.LayerNorm.bias, tl.attention.output.LayerNorm.bias[S])
        assert torch.equal(sl.intermediate.dense.weight, tl.intermediate.dense.weight[ch][:, S])
        assert torch.equal(sl.intermediate.dense.bias, tl.intermediate.dense.bias[ch])
        assert torch.equal(sl.output.dense.weight, tl.output.dense.weight[S][:, ch])
        assert torch.equal(sl.output.LayerNorm.weight, tl.output.LayerNorm.weight[S])
    te, se = teacher.bert.embeddings, student.bert.embeddings
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        assert torch.equal(getattr(se, name).weight, getattr(te, name).weight[:, S])
    assert torch.equal(se.LayerNorm.weight, te.LayerNorm.weight[S])
    assert torch.equal(student.bert.pooler.dense.weight, teacher.bert.pooler.dense.weight[S][:, S])
    assert torch.equal(student.classifier.weight, teacher.classifier.weight[:, S])
    assert torch.equal(student.classifier.bias, teacher.classifier.bias)
    with torch.no_grad():
        assert student(_ids()).logits.shape == (2, 3)


def test_gpt2_subset_equals_slicing_by_hand():
    teacher = _gpt2()
    S = torch.tensor(S_HALF)
    heads = {i: torch.tensor([0.0, 2.0, 1.0, 3.0]) for i in range(3)}  # top 2 -> heads 1, 3
    student = prune_model(teacher, PrunePlan(S_HALF, layers=[1, 2], intermediate_size=64), head_importance=heads)
    assert (student.config.n_embd, student.config.n_head, student.config.n_layer, student.config.n_inner) == (16, 2, 2, 64)
    rows = _rows([1, 3])
    qkv = torch.cat([rows, rows + 32, rows + 64])
    ch = torch.tensor(sorted(torch.sort(channel_importance_from_weights(teacher)[2], descending=True).indices[:64].tolist()))
    tb, sb = teacher.transformer.h[2], student.transformer.h[1]
    assert torch.equal(sb.attn.c_attn.weight, tb.attn.c_attn.weight[S][:, qkv])
    assert torch.equal(sb.attn.c_attn.bias, tb.attn.c_attn.bias[qkv])
    assert torch.equal(sb.attn.c_proj.weight, tb.attn.c_proj.weight[rows][:, S])
    assert torch.equal(sb.mlp.c_fc.weight, tb.mlp.c_fc.weight[S][:, ch])
    assert torch.equal(sb.mlp.c_proj.weight, tb.mlp.c_proj.weight[ch][:, S])
    assert torch.equal(student.transformer.wpe.weight, teacher.transformer.wpe.weight[:, S])
    assert torch.equal(student.lm_head.weight, teacher.transformer.wte.weight[:, S])
    assert student.lm_head.weight.data_ptr() == student.transformer.wte.weight.data_ptr()


# ------------------------------------------------------------------------------------------------------------ layers


def test_dropping_a_layer_equals_the_hand_built_model_and_generates():
    teacher = _llama(tied=False)
    student = prune_model(teacher, PrunePlan(list(range(32)), layers=[0, 2]))
    assert student.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]

    hand = {}
    for key, value in teacher.state_dict().items():
        if key.startswith("model.layers.1."):
            continue
        hand[key.replace("model.layers.2.", "model.layers.1.")] = value
    config = LlamaConfig.from_dict({**teacher.config.to_dict(), "num_hidden_layers": 2})
    manual = LlamaForCausalLM(config).eval()
    manual.load_state_dict(hand, strict=True)

    ids = _ids()
    with torch.no_grad():
        assert torch.allclose(student(ids).logits, manual(ids).logits, atol=1e-5)
        out = student.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
        ref = manual.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
        no_cache = student.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=False)
    assert out.shape == (1, 11)
    assert torch.equal(out, ref) and torch.equal(out, no_cache)


def test_qwen2_layer_types_follow_the_kept_layers():
    teacher = _qwen2()
    teacher.config.layer_types = ["full_attention", "sliding_attention"]
    student = prune_model(teacher, PrunePlan(S_HALF, layers=[1]))
    assert student.config.layer_types == ["sliding_attention"] and student.config.num_hidden_layers == 1


# ------------------------------------------------------------------------------------------------------------ heads


def test_gqa_keeps_the_most_important_head_of_each_group_by_default():
    teacher = _llama(kv=2)
    with torch.no_grad():  # make head 0 (group 0) and head 3 (group 1) the heaviest
        for layer in teacher.model.layers:
            layer.self_attn.q_proj.weight[_rows([0, 3])] *= 20
    scores = head_importance_from_weights(teacher)
    assert set(scores) == {0, 1, 2} and scores[0].shape == (4,)
    student = prune_model(teacher, PrunePlan(list(range(32)), num_heads=2))
    assert student.config.num_attention_heads == 2 and student.config.num_key_value_heads == 2
    assert student.flexkd_prune_selection["heads"] == {0: [0, 3], 1: [0, 3], 2: [0, 3]}
    assert torch.equal(student.model.layers[1].self_attn.q_proj.weight, teacher.model.layers[1].self_attn.q_proj.weight[_rows([0, 3])])


@pytest.mark.parametrize("heads", [1, 3, 5, 0])
def test_impossible_head_count_is_refused(heads):
    with pytest.raises(ConfigError, match="num_heads"):
        prune_model(_llama(kv=2), PrunePlan(list(range(32)), num_heads=heads))


def test_llama_heads_must_divide_the_hidden_size():
    # LlamaConfig validates hidden_size % num_attention_heads == 0 (even with an explicit head_dim)
    with pytest.raises(ConfigError, match=r"student\.prune\.num_heads.*multiple of num_heads"):
        prune_model(_llama(kv=4), PrunePlan(S_HALF, num_heads=3))
    with pytest.raises(ConfigError, match=r"student\.prune\.num_heads"):
        prune_model(_llama(kv=4), PrunePlan(list(range(6))))  # all 4 heads, d_S = 6


def test_mha_drops_heads_with_their_kv():
    teacher = _llama(kv=4)
    scores = {i: torch.tensor([3.0, 0.0, 2.0, 1.0]) for i in range(3)}
    student = prune_model(teacher, PrunePlan(S_HALF, num_heads=2), head_importance=scores)
    assert (student.config.num_attention_heads, student.config.num_key_value_heads) == (2, 2)
    rows = _rows([0, 2])
    ta, sa = teacher.model.layers[0].self_attn, student.model.layers[0].self_attn
    assert torch.equal(sa.k_proj.weight, ta.k_proj.weight[rows][:, S_HALF])
    assert torch.equal(sa.o_proj.weight, ta.o_proj.weight[S_HALF][:, rows])
    with torch.no_grad():
        student(_ids())
    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=4, bos_token_id=1, eos_token_id=2)).eval()
    student = prune_model(qwen, PrunePlan(S_HALF, num_heads=3), head_importance={0: torch.tensor([3.0, 0.0, 2.0, 1.0])})
    assert student.flexkd_prune_selection["kv_heads"][0] == [0, 2, 3]
    assert torch.equal(student.model.layers[0].self_attn.v_proj.bias, qwen.model.layers[0].self_attn.v_proj.bias[_rows([0, 2, 3])])


# ------------------------------------------------------------------------------------------------------------ round trip


def test_pruned_models_round_trip_through_save_pretrained(tmp_path):
    cases = [
        (prune_model(_llama(tied=True), PrunePlan(S_HALF, layers=[0, 2], num_heads=2, intermediate_size=20)), AutoModelForCausalLM),
        (prune_model(_qwen2(), PrunePlan(S_HALF, num_heads=2, intermediate_size=20)), AutoModelForCausalLM),
        (prune_model(_bert(), PrunePlan(S_HALF, layers=[1], intermediate_size=20)), AutoModelForSequenceClassification),
        (prune_model(_gpt2(), PrunePlan(S_HALF, layers=[0, 2])), AutoModelForCausalLM),
    ]
    ids = _ids()
    for n, (student, auto) in enumerate(cases):
        student.save_pretrained(tmp_path / str(n))
        loaded = auto.from_pretrained(tmp_path / str(n)).eval()
        assert type(loaded) is type(student)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, student(ids).logits), type(student).__name__
        # head_dim kept whole even though hidden/heads differs (16/2 = 8 for llama here, 16/2 for qwen2)
        if hasattr(loaded.config, "num_key_value_heads"):
            assert loaded.config.head_dim == 8


# ------------------------------------------------------------------------------------------------------------ importance


def test_activation_importance_ignores_padding_and_sees_dead_heads():
    teacher = _llama(kv=2)
    with torch.no_grad():  # KV group 1 outputs zeros -> query heads 2 and 3 have zero output
        teacher.model.layers[1].self_attn.v_proj.weight[_rows([1])] = 0
    ids = _ids(shape=(1, 5))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 5, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)], dim=1)
    h1, c1 = activation_importance(teacher, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    h2, c2 = activation_importance(teacher, [{"input_ids": padded, "attention_mask": mask, "labels": padded}])
    assert set(h1) == {0, 1, 2} and h1[0].shape == (4,) and c1[0].shape == (48,)
    for i in range(3):
        assert torch.allclose(h1[i], h2[i], atol=1e-5) and torch.allclose(c1[i], c2[i], atol=1e-5)
    assert torch.all(h1[1][2:] == 0) and torch.all(h1[1][:2] > 0)
    student = prune_model(teacher, PrunePlan(list(range(32)), num_heads=2, intermediate_size=30), head_importance=h1, channel_importance=c1)
    assert student.flexkd_prune_selection["heads"][1] in ([0, 2], [0, 3], [1, 2], [1, 3])
    assert student.flexkd_prune_selection["channels"][0] == sorted(torch.sort(c1[0], descending=True, stable=True).indices[:30].tolist())


def test_activation_importance_bert_and_max_batches():
    teacher = _bert()
    batches = ({"input_ids": _ids(seed=s), "attention_mask": torch.ones(2, 7, dtype=torch.long)} for s in range(100))
    heads, channels = activation_importance(teacher, batches, max_batches=2)
    assert heads[1].shape == (4,) and channels[1].shape == (48,) and bool((channels[1] >= 0).all())
    assert not teacher.training


def test_missing_importance_for_a_kept_layer_is_refused():
    with pytest.raises(ConfigError, match="head_importance"):
        prune_model(_llama(), PrunePlan(list(range(32)), num_heads=2), head_importance={0: torch.ones(4)})


# ------------------------------------------------------------------------------------------------------------ describe


def test_describe_reports_sizes_and_selection():
    teacher = _llama()
    plan = PrunePlan(S_HALF, layers=[0, 2], num_heads=2, intermediate_size=20)
    student = prune_model(teacher, plan)
    info = describe(plan, teacher, student)
    assert info["teacher"]["hidden_size"] == 32 and info["student"]["hidden_size"] == 16
    assert info["student"]["num_layers"] == 2 and info["student"]["num_heads"] == 2 and info["student"]["intermediate_size"] == 20
    assert info["student"]["parameters"] == sum(p.numel() for p in student.parameters()) < info["teacher"]["parameters"]
    assert info["layers"] == [0, 2] and set(info["heads"]) == {0, 2} and len(info["channels"][2]) == 20
    assert info["hidden_units"] == S_HALF and 0 < info["parameter_ratio"] < 1


def test_dtype_is_kept():
    teacher = _llama().to(torch.bfloat16)
    student = prune_model(teacher, PrunePlan(S_HALF))
    assert next(student.parameters()).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    "plan, field",
    [
        (PrunePlan([]), "hidden_units"),
        (PrunePlan([3, 1]), "hidden_units"),
        (PrunePlan([1, 1]), "hidden_units"),
        (PrunePlan([0, 32]), "hidden_units"),
        (PrunePlan([-1, 0]), "hidden_units"),
        (PrunePlan([0.5]), "hidden_units"),
        (PrunePlan([0, 1, 2, 3], layers=[3]), "layers"),
        (PrunePlan([0, 1, 2, 3], layers=[1, 1]), "layers"),
        (PrunePlan([0, 1, 2, 3], layers=[]), "layers"),
        (PrunePlan([0, 1, 2, 3], num_heads=8), "num_heads"),
        (PrunePlan([0, 1, 2, 3], intermediate_size=49), "intermediate_size"),
        (PrunePlan([0, 1, 2, 3], intermediate_size=0), "intermediate_size"),
    ],
)
def test_bad_plans_name_the_field(plan, field):
    with pytest.raises(ConfigError, match=rf"student\.prune\.{field}"):
        prune_model(_llama(layers=2), plan)


def test_bert_head_size_constraint():
    with pytest.raises(ConfigError, match="head size"):
        prune_model(_bert(), PrunePlan(list(range(12))))  # 12 is not a multiple of 8
    with pytest.raises(ConfigError, match=r"student\.prune\.num_heads"):
        prune_model(_bert(), PrunePlan(S_HALF, num_heads=4))  # 16 units -> 2 heads


def test_unsupported_model_types_are_refused():
    fake = types.SimpleNamespace(config=types.SimpleNamespace(model_type="t5"))
    with pytest.raises(ConfigError, match=r"'t5'.*bert.*gpt2.*llama"):
        prune_model(fake, PrunePlan([0]))
    with pytest.raises(ConfigError, match="t5"):
        head_importance_from_weights(fake)
