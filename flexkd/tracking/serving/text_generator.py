"""Text generator served by MLflow pyfunc: a save_pretrained causal LM -> greedy continuations of prompts.

Logged as an MLflow "model from code" by :mod:`flexkd.tracking.models`: MLflow copies this file into the
model and runs it on load, where ``mlflow.models.set_model`` at the end names the model. It imports mlflow,
torch, transformers and pandas only, never flexkd, so the served model needs no flexkd.
"""

import re

import mlflow
import pandas as pd

_FIELD = re.compile(r"\{(instruction|input)\}")


class TextGeneratorModel(mlflow.pyfunc.PythonModel):
    """Input: a DataFrame with "prompt" (instruction, or the document for summarization) and optionally
    "input". Output: "text", the greedy continuation (new tokens only, special tokens skipped, stripped).

    Prompts are formatted as in training: a chat template (one user message, generation prompt added) or the
    plain Alpaca template from ``model_config``; tokenised without special tokens (the plain template gets the
    tokenizer's BOS in front when the tokenizer puts one there), cut from the left to ``max_prompt_tokens``
    (a leading BOS kept), left padded. ``params={"max_new_tokens": n}`` overrides the logged default.
    """

    batch_size = 8

    def load_context(self, context):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        checkpoint = context.artifacts["checkpoint"]
        config = dict(context.model_config or {})
        self.task = str(config.get("task", "instruction"))
        self.max_new_tokens = int(config.get("max_new_tokens", 64))
        self.max_prompt_tokens = int(config.get("max_prompt_tokens", 512))
        self.use_chat_template = bool(config.get("use_chat_template", False))
        self.summary_instruction = str(config.get("summary_instruction") or "{document}")
        self.template = str(config["template"])
        self.template_with_input = str(config["template_with_input"])
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.model = AutoModelForCausalLM.from_pretrained(checkpoint).to(self.device).eval()
        tok = self.tokenizer
        if tok.eos_token_id is not None:
            self.eos_ids = [int(tok.eos_token_id)]
        else:
            eos = getattr(self.model.generation_config, "eos_token_id", None)
            self.eos_ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
        pad = tok.pad_token_id if tok.pad_token_id is not None else (self.eos_ids[0] if self.eos_ids else None)
        if pad is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
        self.pad_id = int(pad)
        self.bos_id = None if tok.bos_token_id is None else int(tok.bos_token_id)
        self.plain_prefix = []
        if self.bos_id is not None:  # LLaMA-style tokenizers put BOS first; GPT-2 / BERT-style ones do not
            ids = tok("a", add_special_tokens=True)["input_ids"]
            if ids and ids[0] == self.bos_id:
                self.plain_prefix = [self.bos_id]

    def format_prompt(self, prompt, extra=""):
        """The templated prompt text, as flexkd's PromptFormatter builds it in training."""
        instruction = prompt
        if self.task == "summarization":
            if "{document}" in self.summary_instruction:
                instruction = self.summary_instruction.replace("{document}", prompt)
            else:
                instruction = self.summary_instruction + "\n\n" + prompt
        if self.use_chat_template:
            content = instruction + ("\n\n" + extra if extra else "")
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
        values = {"instruction": instruction, "input": extra}
        return _FIELD.sub(lambda m: values[m.group(1)], self.template_with_input if extra else self.template)

    def prompt_ids(self, prompt, extra=""):
        ids = list(self.tokenizer(self.format_prompt(prompt, extra), add_special_tokens=False)["input_ids"])
        if not self.use_chat_template:
            ids = self.plain_prefix + ids
        limit = self.max_prompt_tokens
        if len(ids) > limit:
            if self.bos_id is not None and ids[0] == self.bos_id and limit > 1:
                ids = [ids[0]] + ids[len(ids) - (limit - 1):]
            else:
                ids = ids[len(ids) - limit:]
        if not ids:
            ids = [self.bos_id if self.bos_id is not None else self.pad_id]
        return ids

    def predict(self, context, model_input, params=None):
        import torch

        if isinstance(model_input, pd.DataFrame):
            frame = model_input
        elif isinstance(model_input, dict):
            frame = pd.DataFrame(model_input)
        else:
            frame = pd.DataFrame({"prompt": list(model_input)})
        max_new_tokens = int((params or {}).get("max_new_tokens") or self.max_new_tokens)
        prompts = ["" if p is None or p != p else str(p) for p in frame["prompt"].tolist()]
        extras = [""] * len(prompts)
        if "input" in frame.columns:
            extras = ["" if v is None or v != v else str(v) for v in frame["input"].tolist()]
        encoded = [self.prompt_ids(p, x) for p, x in zip(prompts, extras)]
        texts = []
        with torch.no_grad():
            for start in range(0, len(encoded), self.batch_size):
                chunk = encoded[start : start + self.batch_size]
                width = max(len(ids) for ids in chunk)
                input_ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, ids in enumerate(chunk):  # left padding: every prompt ends at the last column
                    input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                    attention_mask[row, width - len(ids):] = 1
                generated = self.model.generate(
                    input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                    max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                    pad_token_id=self.pad_id, eos_token_id=self.eos_ids or None,
                )
                for row in generated[:, width:].tolist():
                    cut = next((i for i, token in enumerate(row) if token in self.eos_ids), len(row))
                    texts.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
        return pd.DataFrame({"text": texts})


mlflow.models.set_model(TextGeneratorModel())
