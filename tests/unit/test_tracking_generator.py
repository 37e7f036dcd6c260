"""flexkd.tracking for generation students: pyfunc text generator, sample tables, model card, registry.

A tiny random LlamaForCausalLM and a word-level tokenizer (built offline) go through a real MLflow SQLite store.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pandas as pd
import pytest

from flexkd import tracking
from flexkd.selection import Selection
from flexkd.errors import FlexKDError
from flexkd.data.generation import PromptFormatter, tokenize_prompts

EXPERIMENT = "flexkd-test"
WORDS = (
    "the a cat dog sat on mat is good bad what why how summarize text in one or two sentences . , : # "
    "user assistant instruction response input below an that describes task write"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)
PROMPTS = ["what is the cat", "why is the dog on the mat . the mat is good", "summarize"]


@pytest.fixture
def store(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv(tracking.PIPELINE_RUN_ENV, raising=False)
    yield tmp_path
    while mlflow.active_run() is not None:
        mlflow.end_run()


def _checkpoint(path, *, chat: bool):
    """A random 2-layer Llama (hidden 16) and a WordLevel tokenizer that puts BOS first, LLaMA-style."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _reference(checkpoint, records, *, task, chat, summary_instruction, max_prompt_tokens, max_new_tokens):
    """Greedy generation with transformers directly, one unpadded prompt at a time, formatted as training does."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    kwargs = {"summary_instruction": summary_instruction} if summary_instruction is not None else {}
    formatter = PromptFormatter(tokenizer, task, use_chat_template=chat, **kwargs)
    features = tokenize_prompts(records, tokenizer, formatter, max_prompt_tokens=max_prompt_tokens)
    texts = []
    for feature in features:
        ids = torch.tensor([feature["input_ids"]])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return formatter, features, texts


@pytest.mark.parametrize(
    ("chat", "task", "summary_instruction", "extra"),
    [
        (False, "summarization", "summarize in one sentence : {document}", None),  # plain Alpaca template
        (True, "instruction", None, ["", "the cat sat on the mat", None]),  # chat template, with "input"
    ],
    ids=["plain-summarization", "chat-instruction"],
)
def test_generator_pyfunc_matches_transformers_greedy(store, tmp_path, chat, task, summary_instruction, extra):
    import mlflow.pyfunc

    checkpoint = _checkpoint(tmp_path / "student", chat=chat)
    max_prompt_tokens, max_new_tokens = 24, 5
    with tracking.stage_run("distill", project_root=store, experiment=EXPERIMENT):
        uri = tracking.log_generator_model(
            checkpoint, max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens, use_chat_template=chat,
            summary_instruction=summary_instruction, task=task, input_example_prompts=PROMPTS[:1],
        )
    frame = pd.DataFrame({"prompt": PROMPTS})
    if extra is not None:
        frame["input"] = extra
    records = [{"prompt": p, "input": "" if x is None else x} for p, x in zip(PROMPTS, extra or [""] * 3)]
    formatter, features, expected = _reference(
        checkpoint, records, task=task, chat=chat, summary_instruction=summary_instruction,
        max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens,
    )

    model = mlflow.pyfunc.load_model(uri)
    # the served model formats and truncates prompts exactly as training does
    served = model.unwrap_python_model()
    assert [served.format_prompt(r["prompt"], r["input"]) for r in records] == [formatter.prompt(r) for r in records]
    assert [served.prompt_ids(r["prompt"], r["input"]) for r in records] == [f["input_ids"] for f in features]
    assert any(len(f["input_ids"]) == max_prompt_tokens for f in features)  # truncation was exercised
    if not chat:
        assert all(f["input_ids"][0] == 1 for f in features)  # BOS kept in front of the plain template

    out = model.predict(frame)  # one left-padded batch of prompts of different lengths
    assert list(out.columns) == ["text"] and len(out) == len(PROMPTS)
    assert all(isinstance(t, str) for t in out["text"])
    assert out["text"].tolist() == expected
    assert any(expected)  # the comparison is not between empty strings

    short = model.predict(frame, params={"max_new_tokens": 2})["text"].tolist()
    assert all(len(t.split()) <= 2 for t in short)
    assert [t.split() for t in short] == [t.split()[:2] for t in expected]


def test_generator_loads_without_flexkd_and_registers_with_a_generation_card(store, tmp_path):
    checkpoint = _checkpoint(tmp_path / "student", chat=False)
    with tracking.stage_run("distill", project_root=store, experiment=EXPERIMENT, tags={"method": "kd"}) as run:
        uri = tracking.log_generator_model(
            checkpoint, max_new_tokens=4, max_prompt_tokens=64, use_chat_template=False, summary_instruction=None,
            task="instruction", input_example_prompts=["what is the cat"],
        )
        samples = pd.DataFrame({
            "prompt": ["what is the cat", "why"], "reference": ["a cat", "because"],
            "teacher": ["the cat", "why not"], "student": ["cat", None], "references": [["a cat", "cat"], ["because"]],
        })
        tracking.log_text_table(samples, "samples/test.json")  # the active run
    run_id = run.info.run_id
    tracking.log_text_table(samples.head(1), "samples/other.json", run_id=run_id)  # a finished run, by id

    import mlflow

    table = mlflow.load_table("samples/test.json", run_ids=[run_id])
    assert table[["prompt", "reference", "teacher", "student"]].to_dict("list") == {
        "prompt": ["what is the cat", "why"], "reference": ["a cat", "because"],
        "teacher": ["the cat", "why not"], "student": ["cat", ""],
    }
    assert table["references"].tolist() == ["a cat || cat", "because"]
    assert len(mlflow.load_table("samples/other.json", run_ids=[run_id])) == 1
    with pytest.raises(FlexKDError, match=r"\.json"):
        tracking.log_text_table(samples, "samples/test.csv", run_id=run_id)

    local = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"prompt": PROMPTS}))["text"].tolist()
    code = (
        "import sys; sys.modules['flexkd'] = None\n"
        "import mlflow.pyfunc, pandas as pd\n"
        "m = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "out = m.predict(pd.DataFrame({'prompt': sys.argv[2:]}))\n"
        "print(out.to_json(orient='records'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, uri, *PROMPTS], cwd=store, capture_output=True, text=True, timeout=180,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    fresh = pd.read_json(io.StringIO(out.stdout.strip().splitlines()[-1]), dtype={"text": str})
    assert list(fresh.columns) == ["text"]
    assert fresh["text"].fillna("").tolist() == local

    card = tracking.model_card(
        task="dolly", teacher={"spec": "gpt2-xl", "test": {"rougeL": 27.1}},
        student={"architecture": "LlamaForCausalLM", "num_parameters": 4321},
        data={"files": ["train.jsonl"], "rows": 2}, method="kd",
        metrics={"validation": {"loss": 2.5}, "test": {"rougeL": 21.5}},
        selected_units=None, relevance=None, task_format="instruction",
    )
    assert "ROUGE-L" in card and "AutoModelForCausalLM" in card and "AutoModelForSequenceClassification" not in card
    assert "- **test split**: ROUGE-L 21.5000" in card and "- **validation split**: NLL 2.5000" in card
    assert '{"prompt": ["an example"]}' in card
    assert "models:/flexkd-dolly@champion" in card and "Instruction following" in card
    classification = tracking.model_card(
        task="sst2", teacher={}, student={}, data={}, method="kd", metrics={"accuracy": 0.9},
        selected_units=None, relevance=None,
    )
    assert "AutoModelForSequenceClassification" in classification and "ROUGE-L" not in classification
    with pytest.raises(FlexKDError, match="task_format"):
        tracking.model_card(task="x", teacher={}, student={}, data={}, method="kd", metrics={},
                            selected_units=None, relevance=None, task_format="translation")

    def selection(value):
        return Selection(key="pruned/kd", metric="neg_loss", value=value, validation_fingerprint="f" * 64)

    first = tracking.register_student(
        "dolly", model_uri=uri, run_id=run_id, selection=selection(-2.5), model_card_md=card,
        tags={"method": "kd", "task_format": "instruction"},
    )
    assert (first["name"], first["alias"]) == ("flexkd-dolly", "champion")
    worse = tracking.register_student(
        "dolly", model_uri=uri, run_id=run_id, selection=selection(-2.75), model_card_md=card,
    )
    assert worse["alias"] == "challenger"
    champion = mlflow.MlflowClient().get_model_version_by_alias("flexkd-dolly", "champion")
    assert champion.description == card and champion.tags["task_format"] == "instruction"
    served = mlflow.pyfunc.load_model("models:/flexkd-dolly@champion")
    assert served.predict(pd.DataFrame({"prompt": PROMPTS[:1]}))["text"].tolist() == local[:1]


def test_generator_rejects_bad_arguments(store, tmp_path):
    checkpoint = _checkpoint(tmp_path / "student", chat=False)
    kwargs = dict(max_new_tokens=4, max_prompt_tokens=16, summary_instruction=None, input_example_prompts=["a"])
    with tracking.stage_run("distill", project_root=store, experiment=EXPERIMENT):
        with pytest.raises(FlexKDError, match="no chat template"):
            tracking.log_generator_model(checkpoint, use_chat_template=True, task="instruction", **kwargs)
        with pytest.raises(FlexKDError, match="task must be"):
            tracking.log_generator_model(checkpoint, use_chat_template=False, task="translation", **kwargs)
        with pytest.raises(FlexKDError, match="not a save_pretrained checkpoint"):
            tracking.log_generator_model(tmp_path, use_chat_template=False, task="instruction", **kwargs)
    with pytest.raises(FlexKDError, match="no active MLflow run"):
        tracking.log_generator_model(checkpoint, use_chat_template=False, task="instruction", **kwargs)
