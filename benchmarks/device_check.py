"""The device check: ``python -m benchmarks.device_check`` proves that flexkd trains on an accelerator, and how fast.

Made for a bare GPU image: it needs torch, transformers, accelerate and safetensors plus flexkd's small core
(pydantic, PyYAML, numpy, pandas), and the repository's own files (the data are the test fixtures,
``tests/fixtures/datasets``; the tokenizer is trained on them): no MLflow, Prefect, DVC, Great Expectations,
datasets or rouge-score (without it ROUGE-L is computed without stemming), and no network. A run asserts that
MLflow, Prefect, DVC and Great Expectations were not imported; the test suite runs it with those and datasets and
rouge-score made unimportable.

(a) The real path (:mod:`flexkd.stages`, the code the pipeline's flows run) on the device under the runtime's
    precision (bf16 on a GPU): prepare the Alpaca fixture, fine-tune a GPT-2-shaped teacher, score and select its
    units, build the teacher cache, distill a student pruned from it with kd, projector and flexkd, generate and
    score ROUGE-L and response NLL on the test split. A forward hook on every module checks that each module ran
    with its parameters and outputs on the device (and, on a GPU, under autocast); every training's logged loss
    must fall.
(b) Throughput (GPU sizes: a GPT-2 XL-shaped teacher, 1.5B parameters; a 768-wide student): one training step of
    the library's loop (``flexkd.train.train_loop``: batches from its collator, runtime autocast, fused AdamW,
    clipping, the scheduler) against a bare PyTorch loop doing the same work on the same shapes, for the teacher
    (fine-tuning) and for the student (flexkd distillation with the teacher online): tokens per second, model FLOPs
    utilisation against the device's peak, peak memory.

``--device cpu --tiny`` runs the same code with tiny models on the CPU: the test suite runs it, so that it cannot rot.
Prints a table; writes JSON (``--output``). Exit status 1 when a check of (a) fails.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "datasets"
NOT_NEEDED = ("mlflow", "prefect", "dvc", "great_expectations")  # asserted unimported; the test also blocks datasets, rouge_score

# Dense bf16 peak (FLOP/s) of the GPUs this check may meet; --peak-tflops for others.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}

SIZES = {  # (a) teacher / student, (b) teacher / student / tokens per step
    "gpu": {"teacher": dict(n_embd=768, n_layer=12, n_head=12), "student": dict(num_layers=6, hidden_size=384, num_heads=6,
                                                                                intermediate_size=1536),
            "big_teacher": dict(n_embd=1600, n_layer=48, n_head=25), "big_student": dict(n_embd=768, n_layer=12, n_head=12),
            "vocab": 50257, "seq": 1024, "batch": 8, "student_batch": 16, "steps": 6},
    "tiny": {"teacher": dict(n_embd=64, n_layer=2, n_head=4), "student": dict(num_layers=1, hidden_size=32, num_heads=2,
                                                                               intermediate_size=64),
             "big_teacher": dict(n_embd=64, n_layer=2, n_head=4), "big_student": dict(n_embd=32, n_layer=1, n_head=2),
             "vocab": 512, "seq": 32, "batch": 4, "student_batch": 4, "steps": 4},
}


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


# ------------------------------------------------------------------------------------------- (a) the real path
def train_tokenizer(directory: Path, texts: list[str], vocab_size: int):
    """A word-level tokenizer trained on the fixture texts (no download): [PAD], [UNK], [BOS], [EOS]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=vocab_size,
                                                             special_tokens=["[PAD]", "[UNK]", "[BOS]", "[EOS]"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                        eos_token="[EOS]")
    tokenizer.save_pretrained(directory)
    return tokenizer


def save_gpt2(directory: Path, tokenizer, shape: dict, seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tokenizer), n_positions=512, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
    torch.manual_seed(seed)
    return save_causal_lm(GPT2LMHeadModel(config), tokenizer, directory, eos_token_id=tokenizer.eos_token_id)


def save_causal_lm(model, tokenizer, directory: Path, *, eos_token_id: int) -> Path:
    """Save a random-weight causal LM with its tokenizer; generation stops at ``eos_token_id`` and pads."""
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


class DeviceWatch:
    """A forward hook on every module: counts the modules that ran with parameters or outputs off the device,
    and (under autocast) the linear layers that computed in the autocast dtype."""

    def __init__(self, device: torch.device, autocast_dtype: torch.dtype | None):
        self.device, self.autocast_dtype = device, autocast_dtype
        self.on_device = self.off_device = self.linear = self.linear_autocast = 0
        self.examples: list[str] = []
        self._handle = None

    def _hook(self, module, args, output):
        tensors = [p for p in module.parameters(recurse=False)]
        tensors += [t for t in (output if isinstance(output, (tuple, list)) else [output]) if torch.is_tensor(t)]
        if not tensors:
            return
        if all(t.device.type == self.device.type for t in tensors):
            self.on_device += 1
        else:
            self.off_device += 1
            if len(self.examples) < 5:
                self.examples.append(f"{type(module).__name__} on {sorted({str(t.device) for t in tensors})}")
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            self.linear += 1
            if torch.is_tensor(output) and output.dtype == self.autocast_dtype:
                self.linear_autocast += 1

    def __enter__(self):
        self._handle = torch.nn.modules.module.register_module_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def falls(values: list[float]) -> bool:
    """The mean of the last third of a loss curve is below the mean of its first third."""
    third = max(1, len(values) // 3)
    return len(values) >= 2 and statistics.fmean(values[-third:]) < statistics.fmean(values[:third])


def path_check(device: str, precision: str, tiny: bool, work: Path) -> dict:
    import yaml

    from flexkd import stages
    from flexkd.config import parse_config
    from flexkd.project import Paths
    from flexkd.tasks import task_for

    sizes = SIZES["tiny" if tiny else "gpu"]
    records = json.loads((FIXTURES / "alpaca_5k" / "alpaca_data_first5k.json").read_text())
    texts = [" ".join(r[k] for k in ("instruction", "input", "output")) for r in records]
    teacher_dir = save_gpt2(work / "teacher-init", train_tokenizer(work / "tokenizer", texts, 2000 if tiny else 8000),
                            sizes["teacher"])

    raw = yaml.safe_load((REPO / "profiles" / "alpaca.yaml").read_text())
    raw["project"].update(experiment="device-check", seed=0)
    raw["data"].update(data_dir=str(FIXTURES), source="local", test_size=16, validation_size=16, max_train=96 if tiny else 160)
    raw["teacher"].update(model=str(teacher_dir))
    steps = dict(eval_every=8, checkpoint_every=1000, log_every=1, warmup_ratio=0.1)
    raw["teacher"]["finetune"].update(enabled=True, epochs=2 if tiny else 3, batch_size=8, lr=3e-3 if tiny else 1e-3, **steps)
    raw["relevance"].update(n_examples=32, batch_size=8)
    raw["students"] = {"pruned": {"init": "prune", "prune_importance": "activations", **sizes["student"]}}
    raw["distill"].update(students=["pruned"], methods=["kd", "projector", "flexkd"])
    raw["distill"]["train"].update(epochs=2, batch_size=8, lr=3e-3 if tiny else 1e-3, **steps)
    raw["teacher_cache"].update(enabled=True, features="auto")
    raw["generation"].update(max_prompt_tokens=64, max_response_tokens=48, max_new_tokens=12 if tiny else 32,
                             batch_size=8, eval_max_examples=8 if tiny else 16, seeds=None)
    raw["runtime"].update(device=device, precision=precision, teacher_dtype="auto")
    cfg = parse_config(raw, source="device check")
    paths = Paths(work / "project", cfg.data.task, cfg.project.runs_dir, cfg.project.work_dir)
    task = task_for(cfg)
    runtime = task.runtime
    curves: dict[str, list[float]] = {}

    def logger(name):
        def log(metrics, step=None):
            if "train/total" in metrics:
                curves.setdefault(name, []).append(float(metrics["train/total"]))
        return log

    results: dict = {"runtime": runtime.describe(), "stages": {}}
    began = time.perf_counter()
    with DeviceWatch(runtime.device, runtime.autocast_dtype) as watch:
        manifest = task.prepare(task.load_raw(), paths.prepared)
        results["rows"] = manifest["rows"]
        t = time.perf_counter()
        teacher = stages.finetune_teacher(cfg, paths, task, log=logger("teacher"))
        results["stages"]["finetune_teacher"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        selection = stages.select_units(cfg, paths, task, plot=False)
        results["stages"]["relevance"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        stages.teacher_cache(cfg, paths, task)
        results["stages"]["teacher_cache"] = round(time.perf_counter() - t, 2)
        students, placed = {}, {}
        for method in cfg.distill.methods:
            t = time.perf_counter()
            out = stages.distill(cfg, paths, task, "pruned", method, log=logger(f"pruned/{method}"))
            results["stages"][f"distill/{method}"] = round(time.perf_counter() - t, 2)
            setup = out["setup"]
            modules = [setup.model] + ([setup.extra] if setup.extra is not None else [])
            placed[method] = all(p.device.type == runtime.device.type for m in modules for p in m.parameters())
            students[method] = {"teacher_outputs": setup.teacher_outputs, "validation": out["scores"]}
        from flexkd.models import load_tokenizer

        t = time.perf_counter()
        for name, directory in [("teacher", paths.teacher)] + [(m, paths.student("pruned", m)) for m in students]:
            model = task.load_model(str(directory)).to(runtime.device)
            scores, predictions = task.test_scores(model, load_tokenizer(str(directory)), paths.prepared)  # its own
            (students[name] if name in students else teacher).update(test=scores, sample=predictions[0] if predictions else "")
        results["stages"]["evaluate"] = round(time.perf_counter() - t, 2)
    results["seconds"] = round(time.perf_counter() - began, 1)
    results["teacher"] = {"validation": teacher["validation"], "test": teacher.get("test")}
    results["students"] = students
    results["selected_units"] = selection["index"].k
    results["losses"] = {name: {"first": values[0], "last": values[-1], "steps_logged": len(values), "falls": falls(values)}
                         for name, values in curves.items()}
    checks = {
        "every module ran on the device": watch.off_device == 0 and watch.on_device > 0,
        "students' parameters on the device after training": all(placed.values()),
        "every training's loss falls": bool(curves) and all(v["falls"] for v in results["losses"].values()),
        "ROUGE-L scored for the teacher and every student": all(
            "rougeL" in block.get("test", {}) for block in [teacher, *students.values()]),
        "teacher cache served kd and flexkd": students["kd"]["teacher_outputs"] == "cache"
        and students["flexkd"]["teacher_outputs"] == "cache",
    }
    if runtime.autocast_dtype is not None:
        checks[f"linear layers computed in {runtime.precision}"] = watch.linear_autocast > 0
    results["watch"] = {"modules_on_device": watch.on_device, "modules_off_device": watch.off_device,
                        "off_device_examples": watch.examples, "linear_calls": watch.linear,
                        "linear_calls_in_autocast_dtype": watch.linear_autocast}
    results["checks"] = checks
    results["passed"] = all(checks.values())
    return results


# -------------------------------------------------------------------------------------------- (b) throughput
def gpt2(shape: dict, vocab: int, seq: int, device: torch.device, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab, n_positions=seq, bos_token_id=0, eos_token_id=0, **shape)
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it runs: a 1.5B model is not built on the host first
        model = GPT2LMHeadModel(config)
    return model.float()


def training_flops_per_token(model, seq: int) -> float:
    """6 x parameters (the tied embedding counted once, as the LM head's matmul; positions are a lookup) plus
    attention's 12 x layers x width x sequence (PaLM, appendix B)."""
    cfg = model.config
    n = sum(p.numel() for name, p in model.named_parameters() if "wpe" not in name)
    return 6 * n + 12 * cfg.n_layer * cfg.n_embd * seq


def forward_flops_per_token(model, seq: int) -> float:
    return training_flops_per_token(model, seq) / 3


def synthetic_rows(n: int, seq: int, vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (n, seq), generator=g)
    return [{"input_ids": row.tolist(), "attention_mask": [1] * seq, "labels": row.tolist()} for row in ids]


def _library_seconds(model, loss_fn, rows, batch, runtime, steps, work: Path, extra=None) -> float:
    """Mean seconds per step of ``flexkd.train.train_loop`` over ``steps`` steps after as many warm-up steps.

    The loop logs every ``steps`` steps (a run logs every 10 to 20): the log callback synchronises the device
    and stamps the time at the end of the warm-up and of the measured steps."""
    from flexkd.config import TrainConfig
    from flexkd.data.generation import CausalCollator
    from flexkd.train import Interrupted, train_loop

    stamps: list[float] = []

    def log(metrics, step=None):
        if "train/total" in metrics:
            runtime.synchronize()
            stamps.append(time.perf_counter())

    settings = TrainConfig(epochs=1, max_steps=10_000, batch_size=batch, lr=1e-5, warmup_ratio=0.0,
                           eval_every=10_000, checkpoint_every=10_000, log_every=steps)
    try:
        train_loop(model=model, loss_fn=loss_fn, extra=extra, train_data=rows, collate=CausalCollator(0), settings=settings,
                   seed=0, work_dir=work, fingerprint="device-check", log=log, stop_after=2 * steps,
                   progress=False, desc="device check", runtime=runtime)
    except Interrupted:
        pass
    return (stamps[1] - stamps[0]) / steps


def _bare_seconds(step_fn, params, rows, batch, runtime, steps) -> float:
    """Mean seconds per step of a bare PyTorch loop (fused AdamW, global-norm clipping, the autocast of
    ``step_fn``) over ``steps`` steps after as many warm-up steps."""
    device = runtime.device
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type in ("cpu", "cuda"))
    began = None
    for i in range(2 * steps):
        if i == steps:
            runtime.synchronize()
            began = time.perf_counter()
        chunk = rows[i * batch : (i + 1) * batch]
        ids = torch.tensor([r["input_ids"] for r in chunk])
        ids = ids.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else ids
        loss = step_fn(ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        loss.item()  # the library's loop checks that the loss is finite every step: the same synchronisation
    runtime.synchronize()
    return (time.perf_counter() - began) / steps


def _reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def throughput(runtime, sizes: dict, peak: float | None, work: Path) -> dict:
    import torch.nn.functional as F

    from flexkd.losses import build_objective
    from flexkd.train import distillation_loss, task_loss

    device, dtype = runtime.device, runtime.autocast_dtype
    seq, vocab, batch, steps = sizes["seq"], sizes["vocab"], sizes["batch"], sizes["steps"]

    def autocast():  # the bare loop's own: plain torch.autocast, off in fp32
        return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)

    out: dict = {"precision": runtime.precision, "seq": seq, "peak_flops": peak}

    def report(name, seconds, tokens, flops_per_token, model_params):
        tps = tokens / seconds
        row = {"step_seconds": round(seconds, 4), "tokens_per_second": round(tps, 1),
               "mfu": round(tps * flops_per_token / peak, 4) if peak else None, "peak_memory_gib": _peak_gib(device),
               "parameters": model_params, "batch": tokens // seq}
        out[name] = row
        return row

    # -- teacher fine-tuning step: library loop vs bare loop
    rows = synthetic_rows(batch * (2 * steps + 1), seq, vocab, seed=1)
    for name in ("teacher/library", "teacher/bare"):
        _reset_memory(device)
        model = gpt2(sizes["big_teacher"], vocab, seq, device, seed=0)
        n_params = sum(p.numel() for p in model.parameters())
        fpt = training_flops_per_token(model, seq)
        if name == "teacher/library":
            seconds = _library_seconds(model, task_loss(), rows, batch, runtime, steps, work / "teacher")
        else:
            model.train()

            def step(ids, model=model):
                with autocast():
                    logits = model(input_ids=ids).logits
                return F.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), ids[:, 1:].reshape(-1))

            seconds = _bare_seconds(step, list(model.parameters()), rows, batch, runtime, steps)
        report(name, seconds, batch * seq, fpt, n_params)
        del model
    # -- student distill step (flexkd, teacher online in the teacher dtype): library loop vs bare loop
    sbatch = sizes["student_batch"]
    rows = synthetic_rows(sbatch * (2 * steps + 1), seq, vocab, seed=2)
    for name in ("student/library", "student/bare"):
        _reset_memory(device)
        teacher = gpt2(sizes["big_teacher"], vocab, seq, device, seed=0)
        runtime.frozen(teacher)
        student = gpt2(sizes["big_student"], vocab, seq, device, seed=3)
        d_t, d_s = teacher.config.n_embd, student.config.n_embd
        units = sorted(torch.randperm(d_t, generator=torch.Generator().manual_seed(0))[:d_s].tolist())
        fpt = training_flops_per_token(student, seq) + forward_flops_per_token(teacher, seq)
        n_params = sum(p.numel() for p in student.parameters())
        if name == "student/library":
            objective = build_objective("flexkd", alpha=0.5, temperature=1.0, feature_weight=0.1, student_hidden=d_s,
                                        teacher_hidden=d_t, selected_units=units).to(device)
            loss_fn = distillation_loss(student, teacher, objective, lambda b: (b["labels"] != -100).long())
            seconds = _library_seconds(student, loss_fn, rows, sbatch, runtime, steps, work / "student")
        else:
            student.train()
            index = torch.tensor(units, device=device)

            def step(ids, student=student, teacher=teacher, index=index):
                with torch.no_grad(), autocast():
                    t_out = teacher(input_ids=ids, output_hidden_states=True)
                with autocast():
                    s_out = student(input_ids=ids, output_hidden_states=True)
                s_logits, t_logits = s_out.logits[:, :-1].float(), t_out.logits[:, :-1].float()
                task = F.cross_entropy(s_logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))
                kd = F.kl_div(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), log_target=True,
                              reduction="none").sum(-1).mean()
                s_h = s_out.hidden_states[-1].float().reshape(-1, d_s)
                t_h = t_out.hidden_states[-1].float().reshape(-1, d_t)[:, index]
                s_c, t_c = s_h - s_h.mean(0), t_h - t_h.mean(0)
                corr = (s_c * t_c).sum(0) / (s_c.norm(dim=0) * t_c.norm(dim=0) + 1e-8)
                return 0.5 * task + 0.5 * kd + 0.1 * (1 - corr).mean()

            seconds = _bare_seconds(step, list(student.parameters()), rows, sbatch, runtime, steps)
        report(name, seconds, sbatch * seq, fpt, n_params)
        del teacher, student
    out["teacher_library_over_bare"] = round(out["teacher/library"]["tokens_per_second"] / out["teacher/bare"]["tokens_per_second"], 3)
    out["student_library_over_bare"] = round(out["student/library"]["tokens_per_second"] / out["student/bare"]["tokens_per_second"], 3)
    return out


# ---------------------------------------------------------------------------------------------------- report
def _percent(value: float | None) -> str:
    return "" if value is None else f"{value:.1%}"


def render(result: dict) -> str:
    lines = [f"Device check on {result['device_name']} ({result['device']}), precision {result['precision']}, "
             f"{'tiny' if result['tiny'] else 'GPU'} sizes; torch {result['torch']}, transformers {result['transformers']}.", ""]
    path = result.get("path")
    if path:
        lines += ["(a) the library's real path (flexkd.stages), " + f"{path['seconds']} s:", "",
                  "| check | result |", "|---|---|"]
        lines += [f"| {name} | {'ok' if ok else 'FAILED'} |" for name, ok in path["checks"].items()]
        lines += ["", "| model | validation response NLL | test ROUGE-L |", "|---|---:|---:|"]
        for name, block in [("teacher", path["teacher"]), *((f"pruned/{m}", b) for m, b in path["students"].items())]:
            test = block.get("test") or {}
            lines.append(f"| {name} | {block['validation'].get('loss', float('nan')):.3f} | {test.get('rougeL', float('nan')):.2f} |")
        lines.append("")
    speed = result.get("throughput")
    if speed:
        lines += [f"(b) one training step, library loop vs bare PyTorch loop ({speed['precision']}, sequence {speed['seq']}; "
                  f"MFU against {speed['peak_flops'] / 1e12:.0f} TFLOP/s)" if speed["peak_flops"] else
                  f"(b) one training step, library loop vs bare PyTorch loop ({speed['precision']}, sequence {speed['seq']}; "
                  "no peak known for this device: no MFU)", "",
                  "| step | parameters | batch | s / step | tokens / s | MFU | peak memory (GiB) |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name in ("teacher/library", "teacher/bare", "student/library", "student/bare"):
            row = speed[name]
            lines.append(f"| {name} | {row['parameters'] / 1e6:.1f}M | {row['batch']} | {row['step_seconds']:.4f} | "
                         f"{row['tokens_per_second']:,.0f} | {_percent(row['mfu'])} | "
                         f"{'' if row['peak_memory_gib'] is None else row['peak_memory_gib']} |")
        lines += ["", f"Library / bare tokens per second: teacher {speed['teacher_library_over_bare']:.2f}x, "
                      f"student {speed['student_library_over_bare']:.2f}x (goal ≥ 0.9); teacher MFU goal ≥ 40% in bf16."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check that flexkd trains on the device, and how fast.")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (runtime.device)")
    parser.add_argument("--precision", default="auto", help="auto | fp32 | bf16 | fp16 (runtime.precision)")
    parser.add_argument("--tiny", action="store_true", help="tiny models (the CPU check of the test suite)")
    parser.add_argument("--skip-path", action="store_true", help="only (b), the throughput")
    parser.add_argument("--skip-throughput", action="store_true", help="only (a), the real path")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak, for MFU")
    parser.add_argument("--work-dir", default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "device_check.json"),
                        help="JSON result (BENCHMARKS.md shows a GPU run's)")
    args = parser.parse_args(argv)

    import transformers

    from flexkd.config import RuntimeConfig
    from flexkd.runtime import resolve

    from flexkd.errors import FlexKDError

    try:
        runtime = resolve(RuntimeConfig(device=args.device, precision=args.precision))
    except FlexKDError as err:
        print(f"device check: {err}", file=sys.stderr)
        return 2
    result = {"device": str(runtime.device), "device_name": runtime.describe()["device_name"],
              "precision": runtime.precision, "tiny": args.tiny, "torch": torch.__version__,
              "transformers": transformers.__version__}
    sizes = SIZES["tiny" if args.tiny else "gpu"]
    with tempfile.TemporaryDirectory(prefix="flexkd-device-check-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if not args.skip_path:
            result["path"] = path_check(args.device, args.precision, args.tiny, work / "path")
        if not args.skip_throughput:
            result["throughput"] = throughput(runtime, sizes, peak_flops(runtime.device, args.peak_tflops),
                                              work / "throughput")
    imported = sorted(name for name in NOT_NEEDED if sys.modules.get(name) is not None)
    result["imported_but_not_needed"] = imported
    passed = (result.get("path", {}).get("passed", True)) and not imported
    result["passed"] = passed
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(render(result))
    if imported:
        print(f"device check: imported {imported}, which a bare GPU image lacks", file=sys.stderr)
    print(f"device check {'passed' if passed else 'FAILED'}; wrote {args.output}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
