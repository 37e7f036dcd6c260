"""Students logged as MLflow pyfunc models: classifiers (text -> label, score) and generators (prompt -> text).

Each is a "model from code": a module of :mod:`flexkd.tracking.serving` (``text_classifier.py``,
``text_generator.py``) logged with the ``save_pretrained`` checkpoint as its artifact ``checkpoint``, its
settings as ``model_config`` and pinned pip requirements. The module needs only mlflow, torch, transformers
and pandas, not flexkd, so a served model loads without flexkd installed.

mlflow is imported inside the functions (it takes ~1.5 s), so importing this module is cheap.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

from flexkd import resources
from flexkd.errors import FlexKDError
from flexkd.tracking.runs import active_run_id

SERVING_DIR = Path(__file__).resolve().parent / "serving"  # the pyfunc modules logged as models from code


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link ``src`` to ``dst``; copy it where a link cannot be made (another file system)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _pinned(distribution: str) -> str:
    """``name==version`` of the installed distribution, less any local tag; the bare name when not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{distribution}=={version(distribution).split('+')[0]}"
    except PackageNotFoundError:
        return distribution


def model_requirements() -> list[str]:
    """Pinned pip requirements of the served model (the versions installed here; local tags like +cpu cut)."""
    return [
        _pinned(d)
        for d in ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "pandas", "numpy")
    ]


@resources.phase("mlflow")
def _log_code_model(
    checkpoint_dir: str | Path,
    *,
    artifact_path: str,
    serving_module: str,
    model_config: Mapping[str, Any],
    signature,
    input_example,
) -> str:
    """Log ``serving/<serving_module>.py`` as a pyfunc "model from code" with the checkpoint as the artifact
    ``checkpoint``, ``model_config`` and the pinned requirements, into the active run; return the model URI."""
    import mlflow
    import mlflow.pyfunc

    run_id = active_run_id()
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / "config.json").is_file():
        raise FlexKDError(f"{checkpoint_dir}: not a save_pretrained checkpoint (no config.json)")
    with tempfile.TemporaryDirectory() as tmp:
        # The checkpoint is logged under the fixed name "checkpoint" (the model card's load path relies on it);
        # hard links where possible, so no weights are copied twice.
        staged = Path(tmp) / "checkpoint"
        shutil.copytree(checkpoint_dir, staged, copy_function=_link_or_copy)
        # MLflow stores the code file under its own name: flexkd_<module>.py, as in every model logged so far
        code = Path(tmp) / f"flexkd_{serving_module}.py"
        shutil.copyfile(SERVING_DIR / f"{serving_module}.py", code)
        info = mlflow.pyfunc.log_model(
            name=artifact_path,
            python_model=str(code),
            artifacts={"checkpoint": str(staged)},
            model_config=dict(model_config),
            pip_requirements=model_requirements(),
            signature=signature,
            input_example=input_example,
        )
    if info.run_id and info.run_id != run_id:  # pragma: no cover - defensive
        raise FlexKDError(f"model logged to run {info.run_id}, expected {run_id}")
    return info.model_uri


def log_classifier_model(
    checkpoint_dir: str | Path,
    *,
    artifact_path: str = "model",
    label_map: Mapping[str, int],
    max_length: int,
    input_example_texts: list[str],
    text_pair: bool = False,
) -> str:
    """Log a ``save_pretrained`` classifier (model + tokenizer) as an MLflow pyfunc model; return its URI.

    The URI is the LoggedModel's ``models:/m-...`` URI, which ``mlflow.register_model`` and
    ``mlflow.pyfunc.load_model`` accept. ``artifact_path`` is the model's name within the run.
    """
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = [ColSpec("string", "text")]
    if text_pair:
        inputs.append(ColSpec("string", "text_pair", required=False))
    signature = ModelSignature(
        inputs=Schema(inputs), outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score")])
    )
    return _log_code_model(
        checkpoint_dir,
        artifact_path=artifact_path,
        serving_module="text_classifier",
        model_config={"label_map": {str(k): int(v) for k, v in label_map.items()}, "max_length": int(max_length)},
        signature=signature,
        input_example=pd.DataFrame({"text": list(input_example_texts)}),
    )


def _prompt_templates() -> dict[str, str]:
    """The plain (Alpaca) prompt templates of ``flexkd.data.generation`` with ``{instruction}`` / ``{input}``
    fields, and its default summary instruction: copied as values into the logged model's config, so the
    served model formats prompts exactly as training did without importing flexkd."""
    from flexkd.data import generation as g

    return {
        "template": f"{g.ALPACA_HEADER}### Instruction:\n{{instruction}}\n\n### Response:\n",
        "template_with_input": (
            f"{g.ALPACA_HEADER_WITH_INPUT}### Instruction:\n{{instruction}}\n\n### Input:\n{{input}}\n\n"
            "### Response:\n"
        ),
        "default_summary_instruction": g.DEFAULT_SUMMARY_INSTRUCTION,
    }


def log_generator_model(
    checkpoint_dir: str | Path,
    *,
    artifact_path: str = "model",
    max_new_tokens: int,
    max_prompt_tokens: int,
    use_chat_template: bool,
    summary_instruction: str | None,
    task: str,
    input_example_prompts: list[str],
) -> str:
    """Log a ``save_pretrained`` causal LM (model + tokenizer) as an MLflow pyfunc text generator; return its URI.

    ``predict`` takes a DataFrame with ``prompt`` (the instruction; the document for ``task="summarization"``)
    and optionally ``input``, and returns a DataFrame with ``text``: the greedy continuation (left padded,
    stopped at EOS, new tokens only). Prompts are formatted as training formatted them
    (``flexkd.data.generation.PromptFormatter``): the tokenizer's chat template when ``use_chat_template``,
    else the Alpaca template; for summarization ``summary_instruction`` (None: the default one) with
    ``{document}`` replaced by the prompt. The prompt keeps its last ``max_prompt_tokens`` tokens;
    ``params={"max_new_tokens": n}`` overrides ``max_new_tokens`` per call. The model needs no flexkd.
    """
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    if task not in ("instruction", "summarization"):
        raise FlexKDError(f"task must be 'instruction' or 'summarization', got {task!r}")
    for name, value in (("max_new_tokens", max_new_tokens), ("max_prompt_tokens", max_prompt_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FlexKDError(f"{name} must be an int >= 1, got {value!r}")
    checkpoint_dir = Path(checkpoint_dir)
    if use_chat_template:
        from transformers import AutoTokenizer

        if not getattr(AutoTokenizer.from_pretrained(checkpoint_dir), "chat_template", None):
            raise FlexKDError(f"{checkpoint_dir}: use_chat_template=True but the tokenizer has no chat template")
    templates = _prompt_templates()
    if summary_instruction is None:
        summary_instruction = templates["default_summary_instruction"]
    model_config = {
        "task": task,
        "max_new_tokens": int(max_new_tokens),
        "max_prompt_tokens": int(max_prompt_tokens),
        "use_chat_template": bool(use_chat_template),
        "summary_instruction": str(summary_instruction),
        "template": templates["template"],
        "template_with_input": templates["template_with_input"],
    }
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "input", required=False)]),
        outputs=Schema([ColSpec("string", "text")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", int(max_new_tokens))]),
    )
    return _log_code_model(
        checkpoint_dir,
        artifact_path=artifact_path,
        serving_module="text_generator",
        model_config=model_config,
        signature=signature,
        input_example=pd.DataFrame({"prompt": list(input_example_prompts)}),
    )
