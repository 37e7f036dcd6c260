"""Teacher and student logits over one vocabulary.

Teacher and student must share the tokenizer (``check_vocab_compatible``); their logit widths may differ only by
padding rows, which ``align_vocab`` cuts off. For generation the KD target may keep only the teacher's top k
tokens per position (``distill.teacher_top_k``): ``sparse_teacher_parts`` is what the teacher cache stores,
``densify_teacher_logits`` turns it back into logits, ``sparsify_teacher_logits`` does both.
"""

from __future__ import annotations

import math

import torch

from flexkd.errors import ConfigError


def align_vocab(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    student_vocab: int | None = None,
    teacher_vocab: int | None = None,
    shared_vocab: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncate student and teacher logits (..., V) to the shared vocabulary; refuse any other mismatch.

    Teacher and student must share the tokenizer; their logit widths may differ only by padding rows
    (embedding matrices padded to a multiple of 8, 64, ...). The shared size is ``shared_vocab`` (the
    tokenizer's real vocabulary, ``len(tokenizer)``) when given, else the common value of ``student_vocab`` /
    ``teacher_vocab`` (each model's real vocabulary) when given, else the smaller width. ConfigError when
    the leading dims differ, when ``student_vocab`` and ``teacher_vocab`` differ (different vocabularies,
    not padding), or when the shared size exceeds either width. Returns views (gradients flow).
    """
    s_width, t_width = int(student_logits.shape[-1]), int(teacher_logits.shape[-1])
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ConfigError(
            f"align_vocab: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in leading dims (only the vocabulary width may differ)"
        )
    if student_vocab is not None and teacher_vocab is not None and int(student_vocab) != int(teacher_vocab):
        raise ConfigError(
            f"align_vocab: student vocabulary ({student_vocab}) and teacher vocabulary ({teacher_vocab}) differ; "
            "teacher and student must share the tokenizer (logit widths may differ only by padding rows)"
        )
    for who, vocab, width in (("student", student_vocab, s_width), ("teacher", teacher_vocab, t_width)):
        if vocab is not None and not 1 <= int(vocab) <= width:
            raise ConfigError(
                f"align_vocab: {who} vocabulary size {vocab} does not fit its logit width {width} "
                f"(student width {s_width}, teacher width {t_width})"
            )
    if shared_vocab is not None:
        shared = int(shared_vocab)
        for who, vocab in (("student", student_vocab), ("teacher", teacher_vocab)):
            if vocab is not None and int(vocab) != shared:
                raise ConfigError(
                    f"align_vocab: shared vocabulary {shared} differs from the {who} vocabulary {vocab}"
                )
    elif student_vocab is not None or teacher_vocab is not None:
        shared = int(student_vocab if student_vocab is not None else teacher_vocab)
    else:
        shared = min(s_width, t_width)
    if not 1 <= shared <= min(s_width, t_width):
        raise ConfigError(
            f"align_vocab: shared vocabulary size {shared} does not fit the logits: student width {s_width}, "
            f"teacher width {t_width} (widths may exceed the shared vocabulary only by padding rows; "
            "teacher and student must share the tokenizer)"
        )
    if s_width == shared and t_width == shared:
        return student_logits, teacher_logits
    return student_logits[..., :shared], teacher_logits[..., :shared]


def sparse_teacher_parts(
    teacher_logits: torch.Tensor, top_k: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's k largest logits (..., k), their token ids (..., k) and one tail logit (...,).

    The tail logit f is chosen so that the V - k other tokens, each given logit f, carry at temperature tau
    exactly the probability mass they carry in the full distribution: (V - k) exp(f / tau) = sum exp(z_j / tau)
    over those tokens. ``densify_teacher_logits`` turns the parts back into (..., V) logits whose tempered
    softmax equals the teacher's on the top k tokens and spreads the rest evenly. This is what the teacher
    cache stores for generation (k + k + 1 numbers per position instead of V).
    """
    if top_k < 1:
        raise ConfigError(f"distill.teacher_top_k must be >= 1, got {top_k}")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    z = teacher_logits.float() / temperature
    vocab = z.shape[-1]
    k = min(int(top_k), vocab)
    values, indices = z.topk(k, dim=-1)
    if k == vocab:
        return values * temperature, indices, torch.full(z.shape[:-1], float("-inf"), device=z.device)
    lse_all = torch.logsumexp(z, dim=-1)
    lse_top = torch.logsumexp(values, dim=-1)
    # log of the tail mass's share of the normaliser, kept finite when the top k hold (almost) all the mass
    tail_share = torch.clamp(-torch.expm1(lse_top - lse_all), min=1e-30)
    lse_rest = lse_all + torch.log(tail_share)
    fill = (lse_rest - math.log(vocab - k)) * temperature
    return values * temperature, indices, fill


def densify_teacher_logits(values: torch.Tensor, indices: torch.Tensor, fill: torch.Tensor, vocab: int) -> torch.Tensor:
    """(..., vocab) logits: ``values`` at ``indices``, ``fill`` everywhere else (see ``sparse_teacher_parts``)."""
    dense = fill.float().unsqueeze(-1).expand(*fill.shape, int(vocab)).clone()
    return dense.scatter_(-1, indices.long(), values.float())


def sparsify_teacher_logits(teacher_logits: torch.Tensor, top_k: int, temperature: float) -> torch.Tensor:
    """The teacher's (..., V) logits reduced to their top k plus an evenly spread tail (same shape)."""
    values, indices, fill = sparse_teacher_parts(teacher_logits, top_k, temperature)
    return densify_teacher_logits(values, indices, fill, teacher_logits.shape[-1])


def check_vocab_compatible(teacher_tokenizer, student_tokenizer) -> int:
    """Refuse (ConfigError) tokenizers whose vocabularies differ; return the shared size ``len(tokenizer)``.

    Compares ``len()`` and the full ``get_vocab()`` token -> id maps (added tokens included); the message
    names both sizes and a few differing tokens.
    """
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    t_len, s_len = len(teacher_tokenizer), len(student_tokenizer)
    if t_len == s_len and t_vocab == s_vocab:
        return t_len
    differing = sorted(
        token for token in set(t_vocab) | set(s_vocab) if t_vocab.get(token) != s_vocab.get(token)
    )
    sample = ", ".join(
        f"{token!r}: teacher {t_vocab.get(token)} / student {s_vocab.get(token)}" for token in differing[:5]
    )
    raise ConfigError(
        f"teacher and student tokenizers differ: teacher vocabulary {t_len} tokens, student vocabulary "
        f"{s_len} tokens, {len(differing)} tokens map to different ids (e.g. {sample or 'none'}); logit "
        "distillation needs a shared tokenizer"
    )
