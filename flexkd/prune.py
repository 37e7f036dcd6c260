"""Relevance-guided pruning: slice a (tuned) teacher down to a student whose hidden unit i starts as teacher unit S[i].

Width and depth pruning in the style of Minitron, with Flex-KD's relevance index S (docs/METHOD.md, "Where this
project goes beyond the paper") as the importance of the hidden units. Attention heads and MLP channels are ranked
by weight norms (default) or by mean |activation| over calibration batches (``activation_importance``).

The student is a plain Hugging Face model of the teacher's class, built from a new config with
``teacher.__class__(config)`` and filled with ``load_state_dict(sliced, strict=True)``: it round-trips through
``save_pretrained`` / ``from_pretrained`` with no custom code.

Families (dispatch on ``config.model_type``):
- ``llama``, ``qwen2``, ``mistral`` (same layout). ``head_dim`` is kept (written to the config explicitly), so heads
  stay whole and the attention scaling is unchanged. Heads are pruned GQA-aware: with H query heads in G KV groups
  (H/G per group), ``num_heads`` = h keeps h/G heads in every group (all KV heads kept) when G divides h;
  otherwise, when H/G divides h, it keeps h/(H/G) whole groups (the most important ones, their KV heads with them).
  Any other h is refused. For plain multi-head attention (G = H) this means any h.
- ``bert``: BERT derives the head size from hidden_size / num_attention_heads, so num_heads * teacher head size
  must equal d_S.
- ``gpt2``: same constraint as BERT (head_dim = n_embd / n_head). Conv1D weights are (in, out). With
  ``scale_attn_by_inverse_layer_idx`` the attention scaling follows the *new* layer index when layers are dropped.

With a plan that keeps everything the student computes exactly what the teacher computes. With fewer hidden
units, RMSNorm / LayerNorm statistics are taken over the d_S kept units, so the student is a starting point to
distill from, not a copy.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from flexkd.errors import ConfigError
from flexkd.models import count_parameters

LLAMA_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_TYPES = ("bert", "gpt2", "llama", "mistral", "qwen2")
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
FIELD = "student.prune"


@dataclass(frozen=True)
class PrunePlan:
    """What to keep. ``hidden_units`` is the relevance index's S (ascending, len d_S)."""

    hidden_units: list[int]
    layers: list[int] | None = None  # teacher layer indices to keep, ascending (None: all)
    num_heads: int | None = None  # attention (query) heads per layer (None: all; BERT/GPT-2: d_S / head size)
    intermediate_size: int | None = None  # MLP channels per layer (None: all)


# ------------------------------------------- Families: geometry of the teacher and the slicing rules of its state dict
@dataclass(frozen=True)
class Geometry:
    """The sizes pruning works with, read from a model's config (:func:`geometry`)."""

    family: str  # "llama", "bert" or "gpt2"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int


def _family(model) -> str:
    model_type = getattr(model.config, "model_type", None)
    if model_type in LLAMA_TYPES:
        return "llama"
    if model_type in ("bert", "gpt2"):
        return model_type
    raise ConfigError(
        f"prune: model_type {model_type!r} ({type(model).__name__}) is not supported; "
        f"supported: {', '.join(SUPPORTED_TYPES)}"
    )


def geometry(model) -> Geometry:
    """The Geometry of ``model`` (only ``model.config`` is read); ConfigError for a family or variant not supported."""
    family = _family(model)
    c = model.config
    if family == "llama":
        heads = int(c.num_attention_heads)
        kv = int(getattr(c, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // heads)
        return Geometry(family, int(c.hidden_size), int(c.num_hidden_layers), heads, kv, head_dim, int(c.intermediate_size))
    if family == "bert":
        heads = int(c.num_attention_heads)
        if getattr(c, "position_embedding_type", "absolute") not in (None, "absolute"):
            raise ConfigError(f"prune: BERT position_embedding_type {c.position_embedding_type!r} is not supported (absolute only)")
        if getattr(c, "is_decoder", False) or getattr(c, "add_cross_attention", False):
            raise ConfigError("prune: BERT decoders / cross-attention are not supported")
        return Geometry(family, int(c.hidden_size), int(c.num_hidden_layers), heads, heads, int(c.hidden_size) // heads, int(c.intermediate_size))
    # gpt2
    if getattr(c, "add_cross_attention", False):
        raise ConfigError("prune: GPT-2 with cross-attention is not supported")
    heads = int(c.n_head)
    inner = int(c.n_inner) if c.n_inner is not None else 4 * int(c.n_embd)
    return Geometry(family, int(c.n_embd), int(c.n_layer), heads, heads, int(c.n_embd) // heads, inner)


# A rule maps a key to index specs per dimension: "S" hidden units, "Q" query-head rows, "KV" key/value-head rows,
# "QKV" GPT-2's packed c_attn columns, "C" MLP channels, None untouched. A bias follows its weight's output dim.
_LAYER_RULES = {
    "llama": {
        r"self_attn\.q_proj\.weight": ("Q", "S"),
        r"self_attn\.q_proj\.bias": ("Q",),
        r"self_attn\.[kv]_proj\.weight": ("KV", "S"),
        r"self_attn\.[kv]_proj\.bias": ("KV",),
        r"self_attn\.o_proj\.weight": ("S", "Q"),
        r"self_attn\.o_proj\.bias": ("S",),
        r"mlp\.(gate|up)_proj\.weight": ("C", "S"),
        r"mlp\.(gate|up)_proj\.bias": ("C",),
        r"mlp\.down_proj\.weight": ("S", "C"),
        r"mlp\.down_proj\.bias": ("S",),
        r"(input|post_attention)_layernorm\.weight": ("S",),
    },
    "bert": {
        r"attention\.self\.(query|key|value)\.weight": ("Q", "S"),
        r"attention\.self\.(query|key|value)\.bias": ("Q",),
        r"attention\.output\.dense\.weight": ("S", "Q"),
        r"attention\.output\.dense\.bias": ("S",),
        r"attention\.output\.LayerNorm\.(weight|bias)": ("S",),
        r"intermediate\.dense\.weight": ("C", "S"),
        r"intermediate\.dense\.bias": ("C",),
        r"output\.dense\.weight": ("S", "C"),
        r"output\.dense\.bias": ("S",),
        r"output\.LayerNorm\.(weight|bias)": ("S",),
    },
    "gpt2": {  # Conv1D: weight is (in, out)
        r"ln_[12]\.(weight|bias)": ("S",),
        r"attn\.c_attn\.weight": ("S", "QKV"),
        r"attn\.c_attn\.bias": ("QKV",),
        r"attn\.c_proj\.weight": ("Q", "S"),
        r"attn\.c_proj\.bias": ("S",),
        r"mlp\.c_fc\.weight": ("S", "C"),
        r"mlp\.c_fc\.bias": ("C",),
        r"mlp\.c_proj\.weight": ("C", "S"),
        r"mlp\.c_proj\.bias": ("S",),
        r"attn\.(bias|masked_bias)": (),  # legacy causal-mask buffers
    },
}

# Keys outside the layers, matched at the end of the full key.
_HEAD_RULES = [  # task heads shared by the families: (vocab|labels, hidden)
    (r"(^|\.)(lm_head|score|classifier|qa_outputs)\.weight", (None, "S")),
    (r"(^|\.)(lm_head|score|classifier|qa_outputs)\.bias", (None,)),
]
_OTHER_RULES = {
    "llama": [
        (r"(^|\.)embed_tokens\.weight", (None, "S")),
        (r"(^|\.)norm\.weight", ("S",)),
        (r"(^|\.)rotary_emb\.inv_freq", ()),
    ],
    "bert": [
        (r"(^|\.)embeddings\.(word|position|token_type)_embeddings\.weight", (None, "S")),
        (r"(^|\.)embeddings\.LayerNorm\.(weight|bias)", ("S",)),
        (r"(^|\.)embeddings\.(position_ids|token_type_ids)", ()),
        (r"(^|\.)pooler\.dense\.weight", ("S", "S")),
        (r"(^|\.)pooler\.dense\.bias", ("S",)),
        (r"(^|\.)cls\.predictions\.transform\.dense\.weight", ("S", "S")),
        (r"(^|\.)cls\.predictions\.transform\.(dense\.bias|LayerNorm\.weight|LayerNorm\.bias)", ("S",)),
        (r"(^|\.)cls\.predictions\.decoder\.weight", (None, "S")),
        (r"(^|\.)cls\.predictions\.(decoder\.)?bias", ()),
        (r"(^|\.)cls\.seq_relationship\.weight", (None, "S")),
        (r"(^|\.)cls\.seq_relationship\.bias", ()),
    ],
    "gpt2": [
        (r"(^|\.)(wte|wpe)\.weight", (None, "S")),
        (r"(^|\.)ln_f\.(weight|bias)", ("S",)),
    ],
}
_LAYER_KEY = {
    "llama": re.compile(r"^(?P<pre>(?:.*\.)?layers\.)(?P<idx>\d+)\.(?P<rest>.+)$"),
    "bert": re.compile(r"^(?P<pre>(?:.*\.)?encoder\.layer\.)(?P<idx>\d+)\.(?P<rest>.+)$"),
    "gpt2": re.compile(r"^(?P<pre>(?:.*\.)?h\.)(?P<idx>\d+)\.(?P<rest>.+)$"),
}


def _layer_modules(model) -> list[torch.nn.Module]:
    family = _family(model)
    base = model.base_model
    if family == "llama":
        return list(base.layers)
    if family == "bert":
        return list(base.encoder.layer)
    return list(base.h)


# ------------------------------------------------------------------------------------ Importance of heads and channels
def _rows_norm2(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Squared L2 norm of each of ``groups`` equal blocks of rows."""
    w = weight.detach().float()
    return w.reshape(groups, -1).pow(2).sum(dim=1)


def head_importance_from_weights(model) -> dict[int, torch.Tensor]:
    """Per teacher layer: one score per query head, the L2 norm of the head's rows of q, k, v and columns of o.

    For GQA, the k and v rows are those of the head's KV group (shared by the group's query heads).
    """
    geo = geometry(model)
    h, g, e = geo.heads, geo.kv_heads, geo.hidden
    rep = h // g
    out = {}
    for i, layer in enumerate(_layer_modules(model)):
        if geo.family == "llama":
            a = layer.self_attn
            q = _rows_norm2(a.q_proj.weight, h)
            kv = (_rows_norm2(a.k_proj.weight, g) + _rows_norm2(a.v_proj.weight, g)).repeat_interleave(rep)
            o = _rows_norm2(a.o_proj.weight.t(), h)
        elif geo.family == "bert":
            a = layer.attention
            q = _rows_norm2(a.self.query.weight, h)
            kv = _rows_norm2(a.self.key.weight, h) + _rows_norm2(a.self.value.weight, h)
            o = _rows_norm2(a.output.dense.weight.t(), h)
        else:
            w = layer.attn.c_attn.weight.detach().float()  # (e, 3e)
            q = _rows_norm2(w[:, :e].t(), h)
            kv = _rows_norm2(w[:, e : 2 * e].t(), h) + _rows_norm2(w[:, 2 * e :].t(), h)
            o = _rows_norm2(layer.attn.c_proj.weight, h)  # (e_in = heads, e_out)
        out[i] = (q + kv + o).sqrt()
    return out


def channel_importance_from_weights(model) -> dict[int, torch.Tensor]:
    """Per teacher layer: one score per MLP channel, the L2 norm of the channel's rows (in) and column (out)."""
    geo = geometry(model)
    out = {}
    for i, layer in enumerate(_layer_modules(model)):
        if geo.family == "llama":
            m = layer.mlp
            s = m.gate_proj.weight.detach().float().pow(2).sum(1) + m.up_proj.weight.detach().float().pow(2).sum(1)
            s = s + m.down_proj.weight.detach().float().pow(2).sum(0)
        elif geo.family == "bert":
            s = layer.intermediate.dense.weight.detach().float().pow(2).sum(1)
            s = s + layer.output.dense.weight.detach().float().pow(2).sum(0)
        else:
            s = layer.mlp.c_fc.weight.detach().float().pow(2).sum(0) + layer.mlp.c_proj.weight.detach().float().pow(2).sum(1)
        out[i] = s.sqrt()
    return out


# Per family, in each layer: the module whose input is the concatenated head outputs, and the one whose input is
# the MLP activation.
_ATTN_OUT_AND_MLP_ACT = {"llama": ("self_attn.o_proj", "mlp.down_proj"), "bert": ("attention.output.dense", "output.dense"),
                         "gpt2": ("attn.c_proj", "mlp.c_proj")}


def _attn_out_and_mlp_act_modules(model) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """Per layer: (module whose input is the concatenated head outputs, module whose input is the MLP activation)."""
    attn_out, mlp_act = _ATTN_OUT_AND_MLP_ACT[geometry(model).family]
    return [(layer.get_submodule(attn_out), layer.get_submodule(mlp_act)) for layer in _layer_modules(model)]


def activation_importance(
    model, batches: Iterable[Mapping[str, torch.Tensor]], max_batches: int = 8
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Data-driven importance (Minitron): mean |activation| per head output and per MLP channel.

    Forward pre-hooks read the input of the attention output projection (the heads' outputs, concatenated) and of
    the MLP down projection (the channels' activations); the score is the mean absolute value over the head's
    dims (or the channel) and over the non-padding positions of up to ``max_batches`` batches.
    Returns (head scores, channel scores), each keyed by teacher layer index.
    """
    geo = geometry(model)
    if max_batches < 1:
        raise ConfigError(f"activation_importance: max_batches={max_batches} must be >= 1")
    device = next(model.parameters()).device
    n = len(_layer_modules(model))
    head_sum = [torch.zeros(geo.heads, dtype=torch.float64) for _ in range(n)]
    chan_sum = [torch.zeros(geo.intermediate, dtype=torch.float64) for _ in range(n)]
    count, mask = 0.0, None  # non-padding positions seen; the current batch's

    def reduce(x: torch.Tensor) -> torch.Tensor:  # |x| summed over the batch's non-padding positions
        x = x.detach().float().abs().reshape(-1, x.shape[-1])
        return (x if mask is None else x[mask.reshape(-1)]).sum(0).double().cpu()

    def make_hooks(i: int):
        def attn_hook(module, args):
            head_sum[i] += reduce(args[0]).reshape(geo.heads, geo.head_dim).mean(1)

        def mlp_hook(module, args):
            chan_sum[i] += reduce(args[0])

        return attn_hook, mlp_hook

    handles = []
    was_training = model.training
    model.eval()
    try:
        for i, (attn_mod, mlp_mod) in enumerate(_attn_out_and_mlp_act_modules(model)):
            attn_hook, mlp_hook = make_hooks(i)
            handles.append(attn_mod.register_forward_pre_hook(attn_hook))
            handles.append(mlp_mod.register_forward_pre_hook(mlp_hook))
        seen = 0
        with torch.no_grad():
            for batch in batches:
                if seen >= max_batches:
                    break
                inputs = {k: batch[k].to(device) for k in _MODEL_INPUTS if k in batch and batch[k] is not None}
                if "input_ids" not in inputs:
                    raise ConfigError("activation_importance: a calibration batch has no input_ids")
                mask = inputs.get("attention_mask")
                mask = mask.bool() if mask is not None else torch.ones_like(inputs["input_ids"], dtype=torch.bool)
                count += float(mask.sum())
                model(**inputs)
                seen += 1
        if seen == 0 or count == 0:
            raise ConfigError("activation_importance: no calibration batch (or no non-padding token) was given")
    finally:
        for handle in handles:
            handle.remove()
        mask = None
        model.train(was_training)
    heads = {i: (head_sum[i] / count).float() for i in range(n)}
    channels = {i: (chan_sum[i] / count).float() for i in range(n)}
    return heads, channels


# --------------------------------------------------------------------------------------- Plan validation and selection
def _int_list(value, field: str) -> list[int]:
    try:
        items = list(value)
    except TypeError as err:
        raise ConfigError(f"{FIELD}.{field}: must be a list of integers, got {value!r}") from err
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int | torch.Tensor) and not hasattr(item, "__index__"):
            raise ConfigError(f"{FIELD}.{field}: must be a list of integers, got {item!r}")
        out.append(int(item))
    return out


def _check_sorted_unique(values: list[int], bound: int, field: str, what: str) -> None:
    if not values:
        raise ConfigError(f"{FIELD}.{field}: must keep at least one {what}")
    bad = [v for v in values if not 0 <= v < bound]
    if bad:
        raise ConfigError(f"{FIELD}.{field}: {bad[:5]} out of range [0, {bound})")
    if len(set(values)) != len(values):
        raise ConfigError(f"{FIELD}.{field}: duplicate indices")
    if values != sorted(values):
        raise ConfigError(f"{FIELD}.{field}: must be in ascending order")


def _valid_head_counts(geo: Geometry, d_s: int, model_type: str) -> list[int]:
    rep = geo.heads // geo.kv_heads
    valid = [h for h in range(1, geo.heads + 1) if h % geo.kv_heads == 0 or h % rep == 0]
    if model_type == "llama":  # LlamaConfig.validate_architecture insists on hidden_size % num_attention_heads == 0
        valid = [h for h in valid if d_s % h == 0]
    return valid


def resolve_plan(plan: PrunePlan, geo: Geometry, model_type: str) -> tuple[list[int], list[int], int, int]:
    """(hidden units, layers, heads per layer, MLP channels) of ``plan`` against the teacher's geometry, defaults
    filled in; ConfigError naming the ``student.prune`` field that does not fit."""
    if not isinstance(plan, PrunePlan):
        raise ConfigError(f"{FIELD}: expected a PrunePlan, got {type(plan).__name__}")
    units = _int_list(plan.hidden_units, "hidden_units")
    _check_sorted_unique(units, geo.hidden, "hidden_units", "hidden unit")
    d_s = len(units)
    layers = list(range(geo.layers)) if plan.layers is None else _int_list(plan.layers, "layers")
    _check_sorted_unique(layers, geo.layers, "layers", "layer")

    heads = plan.num_heads
    if geo.family in ("bert", "gpt2"):
        if d_s % geo.head_dim != 0:
            raise ConfigError(
                f"{FIELD}.hidden_units: {geo.family} needs hidden_size = num_heads * head size, and the teacher's head "
                f"size is {geo.head_dim} ({geo.hidden}/{geo.heads}); d_S={d_s} is not a multiple of it"
            )
        wanted = d_s // geo.head_dim
        if heads is None:
            heads = wanted
        elif int(heads) != wanted:
            raise ConfigError(
                f"{FIELD}.num_heads: {geo.family} needs num_heads * head size ({geo.head_dim}) == d_S ({d_s}), "
                f"so num_heads must be {wanted}, got {heads}"
            )
    elif heads is None:
        heads = geo.heads
    if isinstance(heads, bool) or not isinstance(heads, int) or not 1 <= heads <= geo.heads:
        raise ConfigError(f"{FIELD}.num_heads: {heads!r} must be an integer in [1, {geo.heads}]")
    valid = _valid_head_counts(geo, d_s, model_type)
    if heads not in valid:
        why = "heads are kept uniformly per KV group, or whole groups are dropped"
        if model_type == "llama":
            why += f"; LlamaConfig also requires hidden_size (d_S={d_s}) to be a multiple of num_heads"
        raise ConfigError(
            f"{FIELD}.num_heads: {heads} is not possible with {geo.heads} query heads in {geo.kv_heads} KV groups "
            f"({why}); valid choices: {valid}"
        )

    channels = geo.intermediate if plan.intermediate_size is None else plan.intermediate_size
    if isinstance(channels, bool) or not isinstance(channels, int) or not 1 <= channels <= geo.intermediate:
        raise ConfigError(f"{FIELD}.intermediate_size: {channels!r} must be an integer in [1, {geo.intermediate}]")
    return units, layers, heads, channels


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest scores (ties: lower index first), ascending."""
    ranked = torch.sort(scores.detach().double().cpu(), descending=True, stable=True).indices[:k]
    return sorted(int(i) for i in ranked)


def _scores_for(importance: Mapping[int, torch.Tensor], layer: int, size: int, name: str) -> torch.Tensor:
    if layer not in importance:
        raise ConfigError(f"prune: {name} has no scores for teacher layer {layer}")
    scores = torch.as_tensor(importance[layer]).detach().flatten()
    if scores.numel() != size:
        raise ConfigError(f"prune: {name}[{layer}] has {scores.numel()} scores, expected {size}")
    if bool(torch.isnan(scores.float()).any()):
        raise ConfigError(f"prune: {name}[{layer}] contains NaN")
    return scores


def _select_heads(geo: Geometry, heads: int, scores: torch.Tensor | None) -> tuple[list[int], list[int]]:
    """(kept query heads, kept KV heads), both ascending."""
    if heads == geo.heads:
        return list(range(geo.heads)), list(range(geo.kv_heads))
    assert scores is not None
    rep = geo.heads // geo.kv_heads
    if heads % geo.kv_heads == 0:  # the same number of query heads in every group, all KV heads kept
        per_group = heads // geo.kv_heads
        kept = []
        for g in range(geo.kv_heads):
            kept += [g * rep + j for j in _top(scores[g * rep : (g + 1) * rep], per_group)]
        return kept, list(range(geo.kv_heads))
    groups = _top(scores.double().reshape(geo.kv_heads, rep).sum(1), heads // rep)  # whole groups
    return [g * rep + j for g in groups for j in range(rep)], groups


def _rows(blocks: list[int], size: int) -> torch.Tensor:
    return torch.tensor([b * size + j for b in blocks for j in range(size)], dtype=torch.long)


# ------------------------------------------------------------------------------------------------------------- Pruning
def _student_config(teacher, geo: Geometry, d_s: int, layers: list[int], heads: int, kv_heads: int, channels: int):
    data = teacher.config.to_dict()
    if geo.family == "llama":
        data.update(hidden_size=d_s, num_hidden_layers=len(layers), num_attention_heads=heads, num_key_value_heads=kv_heads,
                    head_dim=geo.head_dim, intermediate_size=channels)
        if isinstance(data.get("layer_types"), list) and len(data["layer_types"]) == geo.layers:
            data["layer_types"] = [data["layer_types"][i] for i in layers]
        if "max_window_layers" in data and data.get("max_window_layers") is not None:
            # keep qwen2's sliding-window boundary at the same teacher layer
            data["max_window_layers"] = sum(1 for i in layers if i < data["max_window_layers"])
    elif geo.family == "bert":
        data.update(hidden_size=d_s, num_hidden_layers=len(layers), num_attention_heads=heads, intermediate_size=channels)
    else:
        data.update(n_embd=d_s, n_layer=len(layers), n_head=heads, n_inner=channels)
    data["_name_or_path"] = ""
    return teacher.config.__class__.from_dict(data)


def _build(cls, config):
    from transformers.initialization import no_init_weights

    with no_init_weights():  # skip random init: every parameter is overwritten by load_state_dict(strict=True)
        model = cls(config)
    model.tie_weights()
    return model


def prune_model(
    teacher,
    plan: PrunePlan,
    *,
    head_importance: Mapping[int, torch.Tensor] | None = None,
    channel_importance: Mapping[int, torch.Tensor] | None = None,
):
    """A student of the teacher's class, sliced to ``plan``; student hidden unit i is teacher unit S[i].

    ``head_importance`` / ``channel_importance``: per teacher layer, one score per query head / MLP channel (e.g.
    from ``activation_importance``); defaults are ``head_importance_from_weights`` / ``channel_importance_from_weights``,
    computed only when something is to be dropped. The selection is recorded in ``student.flexkd_prune_selection``
    (not saved with the model; ``describe`` reports it).
    """
    geo = geometry(teacher)
    units, layers, heads, channels = resolve_plan(plan, geo, teacher.config.model_type)
    if heads < geo.heads and head_importance is None:
        head_importance = head_importance_from_weights(teacher)
    if channels < geo.intermediate and channel_importance is None:
        channel_importance = channel_importance_from_weights(teacher)
    selection = _select_per_layer(geo, layers, heads, channels, head_importance, channel_importance)
    kv_count = len(selection["kv_heads"][layers[-1]])
    config = _student_config(teacher, geo, len(units), layers, heads, kv_count, channels)
    sliced = _slice_state_dict(teacher, geo, units, layers, selection)

    student = _build(teacher.__class__, config)
    student.to(dtype=next(teacher.parameters()).dtype)
    try:
        student.load_state_dict(sliced, strict=True)
    except RuntimeError as err:
        raise ConfigError(f"prune: the sliced weights do not fit {type(teacher).__name__}({config.model_type}): {err}") from err
    student.to(next(teacher.parameters()).device)
    student.train(teacher.training)
    if getattr(teacher, "generation_config", None) is not None and getattr(student, "generation_config", None) is not None:
        student.generation_config = teacher.generation_config.__class__.from_dict(teacher.generation_config.to_dict())
    student.flexkd_prune_selection = {"hidden_units": units, "layers": layers, **selection}
    return student


def _select_per_layer(geo: Geometry, layers: list[int], heads: int, channels: int,
                      head_importance: Mapping[int, torch.Tensor] | None,
                      channel_importance: Mapping[int, torch.Tensor] | None) -> dict[str, dict[int, list[int]]]:
    """Per kept teacher layer: the query heads, KV heads and MLP channels kept (all of a kind when none is dropped)."""
    selection = {"heads": {}, "kv_heads": {}, "channels": {}}
    for layer in layers:
        h_scores = _scores_for(head_importance, layer, geo.heads, "head_importance") if heads < geo.heads else None
        selection["heads"][layer], selection["kv_heads"][layer] = _select_heads(geo, heads, h_scores)
        if channels < geo.intermediate:
            kept = _top(_scores_for(channel_importance, layer, geo.intermediate, "channel_importance"), channels)
        else:
            kept = list(range(geo.intermediate))
        selection["channels"][layer] = kept
    return selection


def _slice_state_dict(teacher, geo: Geometry, units: list[int], layers: list[int],
                      selection: dict[str, dict[int, list[int]]]) -> dict[str, torch.Tensor]:
    """The teacher's state dict cut by its family's rules to the kept units, heads and channels; the kept layers
    renumbered from 0."""
    s_idx = torch.tensor(units, dtype=torch.long)
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    for layer in layers:
        q_rows = _rows(selection["heads"][layer], geo.head_dim)
        per_layer[layer] = {
            "S": s_idx,
            "Q": q_rows,
            "KV": _rows(selection["kv_heads"][layer], geo.head_dim),
            "QKV": torch.cat([q_rows + k * geo.hidden for k in range(3)]),
            "C": torch.tensor(selection["channels"][layer], dtype=torch.long),
        }
    new_position = {old: new for new, old in enumerate(layers)}
    layer_key = _LAYER_KEY[geo.family]
    layer_rules = [(re.compile(p + "$"), spec) for p, spec in _LAYER_RULES[geo.family].items()]
    other_rules = [(re.compile(p + "$"), spec) for p, spec in _OTHER_RULES[geo.family] + _HEAD_RULES]

    sliced = {}
    for key, tensor in teacher.state_dict().items():
        match = layer_key.match(key)
        if match:
            old = int(match["idx"])
            if old not in new_position:
                continue
            spec = next((s for rx, s in layer_rules if rx.fullmatch(match["rest"])), None)
            new_key = f"{match['pre']}{new_position[old]}.{match['rest']}"
            index = per_layer[old]
        else:
            spec = next((s for rx, s in other_rules if rx.search(key)), None)
            new_key = key
            index = {"S": s_idx}
        if spec is None:
            raise ConfigError(f"prune: do not know how to slice {key!r} of {type(teacher).__name__} ({teacher.config.model_type})")
        out = tensor.detach()
        for dim, name in enumerate(spec):
            if name is not None:
                out = out.index_select(dim, index[name].to(out.device))
        sliced[new_key] = out.clone()
    return sliced


# ----------------------------------------------------------------------------------------------------------- Reporting
def _sizes(model) -> dict:
    geo = geometry(model)
    return {
        "hidden_size": geo.hidden,
        "num_layers": geo.layers,
        "num_heads": geo.heads,
        "num_kv_heads": geo.kv_heads,
        "head_dim": geo.head_dim,
        "intermediate_size": geo.intermediate,
        "parameters": count_parameters(model),
    }


def describe(plan: PrunePlan, teacher, student) -> dict:
    """Sizes before and after, parameter counts and what was kept (for the model card)."""
    before, after = _sizes(teacher), _sizes(student)
    selection = getattr(student, "flexkd_prune_selection", None) or {}
    layers = list(plan.layers) if plan.layers is not None else list(range(before["num_layers"]))
    return {
        "model_type": teacher.config.model_type,
        "architecture": type(teacher).__name__,
        "teacher": before,
        "student": after,
        "parameter_ratio": after["parameters"] / before["parameters"] if before["parameters"] else None,
        "hidden_units": [int(i) for i in plan.hidden_units],
        "layers": [int(i) for i in layers],
        **{kind: {int(k): list(v) for k, v in selection.get(kind, {}).items()} for kind in ("heads", "kv_heads", "channels")},
    }
