"""Pre-flight checks: the mistakes the schema cannot see, found before any compute.

:mod:`flexkd.config` checks every value on its own (types, ranges, known names: a negative learning rate, a zero
batch, an unknown method or loss fail there). Some mistakes only show against the files and models the params
point at, and would otherwise surface minutes later, after the teacher was fine-tuned:

- ``runtime.device`` names a device this machine lacks (``cuda`` without CUDA, ``cuda:3`` on a two-GPU host),
  ``runtime.precision`` does not fit it (fp16 on the CPU), or a CUDA run asks for more processes than GPUs;

- the data directory or a configured data file is not there (``data.data_dir``, ``data.train_file``,
  ``data.test_file``);
- ``augment.enabled`` on a generation task (augmentation varies classification texts only);
- the teacher does not resolve, or asks to run custom code while ``teacher.trust_remote_code`` is off;
- a trained student's hidden size k is larger than the teacher's d_T (Flex-KD selects k of the teacher's d_T
  units): ``students.<name>.hidden_size``;
- a pruned student asks for more layers, heads or MLP channels than the teacher has
  (``students.<name>.num_layers`` / ``prune_layers`` / ``num_heads`` / ``intermediate_size``);
- a student loaded from a path (``init: path``) has another tokenizer than the teacher, or another hidden size
  (``students.<name>.path``);
- a student whose vocabulary is to be cut to the training split's tokens has a tokenizer that cannot be cut
  (``students.<name>.vocabulary: train`` needs a WordPiece tokenizer).

:func:`check` reads only small files: the data directory listing, the models' ``config.json`` (``AutoConfig``;
the header of a ``.gguf`` file) and, for ``init: path`` students, both tokenizers. No weights, no data rows.
Every failure is a :class:`~flexkd.errors.ConfigError` or :class:`~flexkd.errors.DataError` whose message starts
with the key to change. What cannot be checked (a Hub dataset, a GGUF header transformers cannot read) is
returned as a note.
"""

from __future__ import annotations

from types import SimpleNamespace

from flexkd.augment import check_task
from flexkd.config import DataConfig, FlexKDConfig, StudentConfig
from flexkd.errors import ConfigError, DataError


def check(cfg: FlexKDConfig, *, data: bool = True, teacher: str | None = None) -> list[str]:
    """Run every check on ``cfg``; raise on the first failure, return notes on what was not checked.

    ``data``: check the raw data files too (stages that read them: the pipeline, validate, prepare).
    ``teacher``: the model spec to check against (default ``teacher.model``; later stages pass the tuned teacher).
    """
    check_runtime(cfg)
    check_task(cfg)
    notes: list[str] = []
    if data:
        notes += check_data(cfg.data)
    spec = teacher or cfg.teacher.model
    teacher_config = model_config(spec, key="teacher.model", trust_remote_code=cfg.teacher.trust_remote_code)
    if teacher_config is None:
        return notes + [f"teacher.model: the config of {spec} could not be read; teacher sizes were not checked"]
    for name in cfg.distill.students:
        notes += check_student(cfg, name, teacher_config, spec)
    return notes


# --------------------------------------------------------------------------------------------------- runtime
def check_runtime(cfg: FlexKDConfig) -> None:
    """``runtime.device`` / ``precision`` resolve on this machine, and a multi-process CUDA run has a GPU per
    process."""
    import torch

    from flexkd.runtime import resolve

    runtime = resolve(cfg.runtime)
    if runtime.is_cuda:
        count = torch.cuda.device_count()
        for key, settings in (("teacher.finetune.num_processes", cfg.teacher.finetune),
                              ("distill.train.num_processes", cfg.distill.train)):
            if settings.num_processes > count:
                raise ConfigError(f"{key} is {settings.num_processes} but this machine has {count} CUDA device(s): "
                                  "one GPU per process. Lower it, or set runtime.device: cpu.")


# ------------------------------------------------------------------------------------------------------ data
def check_data(data: DataConfig) -> list[str]:
    """The data directory and the configured files exist (local source); a Hub dataset is only noted."""
    from flexkd.data.sources import resolve_data_dir
    from flexkd.data.raw_splits import resolve_source

    data = resolve_source(data)  # auto: local files when found, else the Hub (reachable, or one error naming both)
    if data.source == "hub":
        return [f"data.source is hub ({data.hub_id}): the dataset is checked when the validate stage loads it"]
    try:
        root = resolve_data_dir(data.data_dir)
    except DataError as err:
        raise DataError(f"data.data_dir: {err}") from None
    for key in ("train_file", "test_file"):
        name = getattr(data, key)
        if name is None:
            continue
        path = root / name
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise DataError(f"data.{key}: {path} {what} (data.data_dir resolves to {root})")
    return []


# ---------------------------------------------------------------------------------------------------- models
def _size(config, field: str) -> int | None:
    from flexkd.models import SIZE_FIELDS

    for name in SIZE_FIELDS[field]:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


def model_config(spec: str, *, key: str, trust_remote_code: bool = False):
    """The transformers config of a model spec (config.json or a GGUF header), without loading any weights.

    Raises ConfigError naming ``key`` when the spec does not resolve, the config cannot be read, or the model
    needs custom code and ``trust_remote_code`` is off. Returns None for a GGUF file transformers cannot read.
    """
    from transformers import AutoConfig

    from flexkd.models import resolve_source

    try:
        source = resolve_source(spec)
    except ConfigError as err:
        raise ConfigError(f"{key}: {err}") from None
    try:
        return AutoConfig.from_pretrained(source.location, trust_remote_code=trust_remote_code, **source.kwargs())
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ConfigError(
                f"{key}: {spec} needs custom modeling code from its directory, and teacher.trust_remote_code is "
                "false; set teacher.trust_remote_code: true only if you trust that code"
            ) from None
        if source.gguf_file:
            return None
        raise ConfigError(f"{key}: cannot read the model config of {spec}: {err}") from None
    except (OSError, KeyError) as err:
        if source.gguf_file:
            return None
        raise ConfigError(f"{key}: cannot read the model config of {spec}: {err}") from None


def check_student(cfg: FlexKDConfig, name: str, teacher_config, teacher_spec: str) -> list[str]:
    """One trained student against the teacher: k <= d_T, a prune plan that fits, a path student that matches."""
    scfg = cfg.students[name]
    key = f"students.{name}"
    d_teacher = _size(teacher_config, "hidden_size")
    if d_teacher is not None and scfg.hidden_size > d_teacher:
        raise ConfigError(
            f"{key}.hidden_size: {scfg.hidden_size} is more than the teacher's hidden size d_T = {d_teacher} "
            f"({teacher_spec}); Flex-KD selects k = hidden_size of the teacher's d_T units, so k <= d_T"
        )
    if scfg.init == "prune":
        _check_prune(key, scfg, teacher_config)
    elif scfg.init == "path":
        _check_path_student(cfg, key, scfg, teacher_spec)
    if scfg.vocabulary == "train":
        return _check_vocabulary(cfg, f"{key}.vocabulary", scfg.path if scfg.init == "path" else teacher_spec)
    return []


def _check_vocabulary(cfg: FlexKDConfig, key: str, spec: str) -> list[str]:
    """vocabulary: train cuts the student's tokenizer once it is trained: refuse one it cannot cut (not WordPiece) now."""
    from flexkd.models import load_tokenizer
    from flexkd.vocabulary import wordpiece_spec

    try:
        tokenizer = load_tokenizer(spec, trust_remote_code=cfg.teacher.trust_remote_code)
    except (OSError, ValueError) as err:
        return [f"{key}: the tokenizer of {spec} could not be read ({type(err).__name__}); not checked"]
    wordpiece_spec(tokenizer, key=key)
    return []


def _check_prune(key: str, scfg: StudentConfig, teacher_config) -> None:
    from flexkd.prune import PrunePlan, geometry, resolve_plan
    from flexkd.tasks import evenly_spaced_layers

    def renamed(err: ConfigError) -> ConfigError:
        message = str(err).replace("student.prune.hidden_units", f"{key}.hidden_size")
        message = message.replace("student.prune.layers", f"{key}.prune_layers").replace("student.prune.", f"{key}.")
        return ConfigError(message if message.startswith(key) else f"{key}.init: {message}")

    try:
        geo = geometry(SimpleNamespace(config=teacher_config))  # reads the config only
    except ConfigError as err:
        raise renamed(err) from None
    if scfg.prune_layers is not None:
        bad = [layer for layer in scfg.prune_layers if not 0 <= layer < geo.layers]
        if bad:
            raise ConfigError(
                f"{key}.prune_layers: {bad} out of range; the teacher has {geo.layers} layers "
                f"(0..{geo.layers - 1})"
            )
        layers = list(scfg.prune_layers)
    else:
        if scfg.num_layers > geo.layers:
            raise ConfigError(
                f"{key}.num_layers: {scfg.num_layers} is more than the teacher's {geo.layers} layers "
                "(a pruned student keeps a subset of them)"
            )
        layers = evenly_spaced_layers(geo.layers, scfg.num_layers)
    plan = PrunePlan(hidden_units=list(range(scfg.hidden_size)), layers=layers, num_heads=scfg.num_heads,
                     intermediate_size=scfg.intermediate_size)
    try:
        resolve_plan(plan, geo, teacher_config.model_type)
    except ConfigError as err:
        raise renamed(err) from None


def _check_path_student(cfg: FlexKDConfig, key: str, scfg: StudentConfig, teacher_spec: str) -> None:
    from flexkd.losses import check_vocab_compatible
    from flexkd.models import load_tokenizer

    trust = cfg.teacher.trust_remote_code
    student_config = model_config(scfg.path, key=f"{key}.path", trust_remote_code=trust)
    if student_config is not None:
        d_student = _size(student_config, "hidden_size")
        if d_student is not None and d_student != scfg.hidden_size:
            raise ConfigError(
                f"{key}.hidden_size: {scfg.hidden_size}, but the model at {key}.path ({scfg.path}) has hidden size "
                f"{d_student}"
            )
    try:
        teacher_tokenizer = load_tokenizer(teacher_spec, trust_remote_code=trust)
        student_tokenizer = load_tokenizer(scfg.path, trust_remote_code=trust)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{key}.path: cannot load the tokenizer of {scfg.path} or of the teacher: {err}") from None
    try:
        check_vocab_compatible(teacher_tokenizer, student_tokenizer)
    except ConfigError as err:
        raise ConfigError(f"{key}.path: {scfg.path} does not share the teacher's tokenizer: {err}") from None


def describe(notes: list[str]) -> str:
    return "pre-flight checks passed" + ("" if not notes else " (" + "; ".join(notes) + ")")

