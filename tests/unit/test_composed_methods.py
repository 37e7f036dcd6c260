"""Methods composed in params from registered loss terms: a new term is one class and its registration; params
name it in a method with the other terms, each with its weight; the method trains, each term logged separately.
Config refuses, in plain words, what cannot be built; every decision about a method is asked of its terms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification

from flexkd.config import TrainConfig, parse_config
from flexkd.errors import ConfigError
from flexkd.losses import LOSS_TERMS, SelectedUnitsTerm, build_objective, get_method, register_term
from tests.integration.project import tiny_params

METHOD = "kd_flexkd_mse"
TERMS = {"ce": 0.5, "kd": 0.5, "flexkd": 0.1, "selected_mse": 0.05}
LOG_KEYS = {"ce": "task", "kd": "kd", "flexkd": "feature/flexkd", "selected_mse": "feature/selected_mse"}
D_S, D_T = 16, 32  # tiny_params' students; the teacher below


@pytest.fixture()
def selected_mse():
    """A new loss term, as a user adds one: the class and its registration, nothing else."""

    @register_term
    class SelectedMSE(SelectedUnitsTerm):
        """``selected_mse``: mean squared difference between student unit i and the selected teacher unit S[i]."""

        name = "selected_mse"

        def compare(self, hs, ht_selected):
            return F.mse_loss(hs, ht_selected)

    yield SelectedMSE
    LOSS_TERMS.pop("selected_mse")


def _params(tmp_path, **distill) -> dict:
    params = tiny_params(tmp_path / "data", tmp_path / "teacher")
    params["distill"].update(distill)
    return params


def _composed(tmp_path, terms=None, methods=None) -> dict:
    return _params(tmp_path, composed_methods={METHOD: dict(TERMS if terms is None else terms)},
                   methods=methods or ["ft", "kd", "flexkd", METHOD])


def test_a_new_term_composed_in_params_trains_and_each_term_is_logged(tmp_path, selected_mse):
    from flexkd.data.tokenize import PadCollator
    from flexkd.distill import method_objective, method_settings, stage_params
    from flexkd.train import distillation_loss, train_loop

    cfg = parse_config(_composed(tmp_path))  # the params dict as the pipeline reads it
    assert cfg.distill.methods == ["ft", "kd", "flexkd", METHOD]
    assert method_settings(cfg, "random", METHOD)["alpha"] is None  # the weights are the method's own
    assert stage_params(cfg, "random", METHOD)["terms"] == TERMS  # in the run's fingerprint and MLflow params
    assert "composed_methods" not in stage_params(cfg, "random", "flexkd")["distill"]  # built-in runs: unchanged

    torch.manual_seed(0)
    teacher = _bert(D_T, layers=2)
    student = _bert(D_S, layers=1)
    units = torch.randperm(D_T, generator=torch.Generator().manual_seed(1))[:D_S].tolist()
    objective = method_objective(cfg, "random", METHOD, student_hidden=D_S, teacher_hidden=D_T, selected_units=units)
    assert list(objective.terms) == list(TERMS) and isinstance(objective.terms["selected_mse"], selected_mse)
    assert objective.weights == TERMS and objective.needs_teacher_hidden
    assert objective.terms["selected_mse"].selected_units.tolist() == units

    rows = _rows()
    loss_fn = distillation_loss(student, teacher, objective)
    before = _mean_terms(student, loss_fn, rows)
    logged = []
    settings = TrainConfig(epochs=3, batch_size=8, lr=2e-3, warmup_ratio=0.1, checkpoint_every=100, log_every=1)
    train_loop(model=student, loss_fn=loss_fn, train_data=rows, collate=PadCollator(0), settings=settings, seed=3,
               work_dir=tmp_path / "work", fingerprint="composed", log=lambda m, s: logged.append(m), progress=False)
    after = _mean_terms(student, loss_fn, rows)

    assert after["total"] < 0.9 * before["total"], (before, after)  # on this seed: 0.53 -> 0.42
    for term in ("feature/flexkd", "feature/selected_mse"):  # 0.89 -> 0.43, 1.86 -> 0.77
        assert after[term] < 0.75 * before[term], (term, before, after)
    keys = {"train/task", "train/kd", "train/feature/flexkd", "train/feature/flexkd_skipped",
            "train/feature/selected_mse", "train/feature/selected_mse_skipped", "train/total"}
    assert all(keys <= set(m) for m in logged) and len(logged) == 15
    last, scale = logged[-1], {"kd": cfg.distill.temperature**2}  # the total: the weighted terms, kd times tau^2
    weighted = sum(weight * scale.get(term, 1.0) * last[f"train/{LOG_KEYS[term]}"] for term, weight in TERMS.items())
    assert last["train/total"] == pytest.approx(weighted, rel=1e-5)


def _bert(hidden: int, layers: int) -> BertForSequenceClassification:
    return BertForSequenceClassification(BertConfig(vocab_size=40, hidden_size=hidden, num_hidden_layers=layers,
                                                    num_attention_heads=2, intermediate_size=hidden * 2, num_labels=2))


def _rows(n: int = 40) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    rows = []
    for _ in range(n):
        ids = [1] + torch.randint(5, 40, (3 + int(torch.randint(0, 6, (1,), generator=g)),), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "token_type_ids": [0] * len(ids),
                     "labels": ids[1] % 2})
    return rows


def _mean_terms(student, loss_fn, rows) -> dict[str, float]:
    from flexkd.data.tokenize import PadCollator

    student.eval()
    with torch.no_grad():
        _, terms = loss_fn(student, PadCollator(0)(rows))
    student.train()
    return {key: value.item() for key, value in terms.items()}


# ---------------------------------------------------------------- what config refuses, in plain words


@pytest.mark.parametrize("terms,needle", [
    ({"ce": 0.5, "l2_units": 0.1}, r"distill\.composed_methods\.kd_flexkd_mse\.l2_units: unknown loss term; registered "
                                   r"terms: ce, kd, projector, cka, flexkd.*@register_term"),
    ({"ce": 0.5, "kd": -0.5}, r"distill\.composed_methods\.kd_flexkd_mse\.kd: the weight -0\.5 is negative; loss "
                              r"weights must be >= 0"),
    ({}, r"distill\.composed_methods\.kd_flexkd_mse: a method needs at least one loss term with its weight"),
    ({"ce": "alpha"}, r"distill\.composed_methods\.kd_flexkd_mse\.ce: Input should be a valid number"),
])
def test_config_refuses_a_composed_method_that_cannot_be_built(tmp_path, terms, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_config(_composed(tmp_path, terms=terms))


def test_config_refuses_unknown_methods_and_clashing_names(tmp_path):
    with pytest.raises(ConfigError, match=r"distill\.methods: unknown method\(s\) \['kd_cka'\]; valid: \['ft', 'kd', "
                                          r"'projector', 'cka', 'flexkd', 'kd_flexkd_mse'\] \(define a method of your "
                                          r"own under distill\.composed_methods\)"):
        parse_config(_composed(tmp_path, terms={"ce": 1.0}, methods=["ft", "kd_cka"]))
    params = _params(tmp_path, composed_methods={"flexkd": {"ce": 1.0}})
    with pytest.raises(ConfigError, match=r"distill\.composed_methods\.flexkd: 'flexkd' is a built-in method; give "
                                          "yours another name"):
        parse_config(params)
    params = _composed(tmp_path, terms={"ce": 0.5, "kd": 0.5})
    params["students"]["random"]["per_method"] = {METHOD: {"lr": 1e-4, "alpha": 0.9}}
    with pytest.raises(ConfigError, match=rf"students\.random\.per_method\.{METHOD}\.alpha: {METHOD} is a composed "
                                          rf"method.*distill\.composed_methods\.{METHOD}; drop alpha here"):
        parse_config(params)
    params["students"]["random"]["per_method"] = {METHOD: {"lr": 1e-4, "temperature": 4.0}}
    parse_config(params)
    with pytest.raises(ConfigError, match="unknown distillation method 'kd_cka'; valid methods: ft, kd, projector, "
                                          "cka, flexkd, kd_flexkd_mse"):
        parse_config(params).distill.method("kd_cka")


# ---------------------------------------------------------------- every decision asked of the terms


def test_the_teacher_cache_and_set_up_ask_the_method_s_terms(selected_mse):
    from benchmarks.tune import dims_of
    from flexkd.cache import cache_columns

    composed = {"logits_only": {"ce": 1.0, "kd": 1.0}, "selected": {"kd": 1.0, "flexkd": 1.0, "selected_mse": 1.0},
                "all_units": {"ce": 1.0, "flexkd": 1.0, "cka": 0.1}, "task_only": {"ce": 1.0}}
    method = {name: get_method(name, composed) for name in composed}
    assert [m.needs_teacher for m in method.values()] == [True, True, True, False]
    assert [m.teacher_units for m in method.values()] == [None, "selected", "all", None]
    assert [m.reads_selected_units for m in method.values()] == [False, True, True, False]
    units = [5, 1, 3]
    assert cache_columns("auto", units, 8, [method["logits_only"], method["selected"]]) == [1, 3, 5]
    assert cache_columns("auto", units, 8, ["ft", method["all_units"]]) == list(range(8))
    assert cache_columns("auto", units, 8, ["kd", "flexkd"]) == [1, 3, 5]  # built-in names still answer
    assert cache_columns("auto", units, 8, ["projector"]) == list(range(8))
    # what tuning varies: a composed method's weights are its own; the temperature when it has a logit term
    assert dims_of("ft") == ("lr",) and dims_of("kd") == ("lr", "alpha", "temperature")
    assert dims_of("cka") == ("lr", "alpha", "temperature", "feature_weight")
    assert dims_of("selected", composed) == ("lr", "temperature") and dims_of("task_only", composed) == ("lr",)
    # a selected-units term needs the relevance selection, k = d_S, as flexkd does
    with pytest.raises(ConfigError, match="method 'selected' needs selected_units from the relevance stage"):
        build_objective(method["selected"], student_hidden=3, teacher_hidden=8)
    assert not build_objective(method["task_only"], student_hidden=3, teacher_hidden=8).needs_teacher


def test_the_model_card_lists_the_method_s_weights_from_its_terms(tmp_path, selected_mse):
    from flexkd.champion import loss_weights

    cfg = parse_config(_composed(tmp_path))
    info = {"alpha": 0.4, "beta": 0.2}
    tau, logit_loss, flexkd_loss = cfg.distill.temperature, cfg.distill.logit_loss, cfg.distill.flexkd_loss
    assert loss_weights(cfg, "ft", info) == {"task": 1.0}
    assert loss_weights(cfg, "kd", info) == {"alpha": 0.4, "temperature": tau, "logit_loss": logit_loss}
    assert loss_weights(cfg, "cka", info) == {"alpha": 0.4, "temperature": tau, "logit_loss": logit_loss, "beta": 0.2}
    assert loss_weights(cfg, "flexkd", info) == {"alpha": 0.4, "temperature": tau, "logit_loss": logit_loss,
                                                 "beta": 0.2, "flexkd_loss": flexkd_loss}
    assert loss_weights(cfg, METHOD, {"alpha": None, "beta": None}) == {
        **TERMS, "temperature": tau, "logit_loss": logit_loss, "flexkd_loss": flexkd_loss}


def test_register_term_refuses_a_taken_name_or_a_bad_one():
    from flexkd.losses import CKALoss

    class OtherCKA(CKALoss):
        name = "cka"

    with pytest.raises(ConfigError, match="the name 'cka' is taken by flexkd.losses.terms.CKALoss"):
        register_term(OtherCKA)
    OtherCKA.name = "Other-CKA"
    with pytest.raises(ConfigError, match="must be lower-case letters, digits and '_'"):
        register_term(OtherCKA)
    assert register_term(CKALoss) is CKALoss and LOSS_TERMS["cka"] is CKALoss  # registering again: a no-op
