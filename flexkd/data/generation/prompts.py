"""The prompt text a generation model sees: the tokenizer's chat template, or an Alpaca-style plain template.

The plain templates and the default summary instruction are module constants: ``flexkd.tracking`` copies them into
a logged model's config, so the served model formats prompts exactly as training did.
"""

from __future__ import annotations

from typing import Literal

from flexkd.data.generation.sources import check_task
from flexkd.errors import ConfigError, DataError

DEFAULT_SUMMARY_INSTRUCTION = "Summarize the following text in one or two sentences.\n\n{document}"
ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)
ALPACA_HEADER_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)


class PromptFormatter:
    """Turns a record (``{"prompt", "input", ...}``) into the prompt text the model sees.

    Instruction: with a chat template, one user message ``instruction`` (+ ``"\\n\\n" + input``) rendered with
    ``add_generation_prompt=True``; otherwise the Alpaca template (``### Instruction:`` / ``### Input:`` /
    ``### Response:``). Summarization: the same, with the instruction ``summary_instruction`` in which
    ``{document}`` is replaced by the document (appended after a blank line when the placeholder is absent).
    ``use_chat_template``: None = use it when the tokenizer has one; True = require it; False = plain template.
    """

    def __init__(
        self,
        tokenizer,
        task: Literal["instruction", "summarization"],
        *,
        use_chat_template: bool | None = None,
        summary_instruction: str = DEFAULT_SUMMARY_INSTRUCTION,
    ):
        self.tokenizer = tokenizer
        self.task = check_task(task)
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if use_chat_template and not has_template:
            raise ConfigError(
                f"use_chat_template=True but the tokenizer ({type(tokenizer).__name__}, "
                f"{getattr(tokenizer, 'name_or_path', '?')}) has no chat template; set it to false or null"
            )
        self.use_chat_template = has_template if use_chat_template is None else bool(use_chat_template)
        self.summary_instruction = summary_instruction

    def _instruction_and_input(self, record) -> tuple[str, str]:
        prompt = record["prompt"]
        extra = record.get("input") or ""
        if prompt is None:
            raise DataError(f"record (source_row {record.get('source_row', '?')}) has no prompt")
        if self.task == "summarization":
            if "{document}" in self.summary_instruction:
                prompt = self.summary_instruction.replace("{document}", prompt)
            else:
                prompt = f"{self.summary_instruction}\n\n{prompt}"
        return prompt, extra

    def prompt(self, record: dict) -> str:
        instruction, extra = self._instruction_and_input(record)
        if self.use_chat_template:
            content = instruction + (f"\n\n{extra}" if extra else "")
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
        if extra:
            return (
                f"{ALPACA_HEADER_WITH_INPUT}### Instruction:\n{instruction}\n\n### Input:\n{extra}\n\n"
                "### Response:\n"
            )
        return f"{ALPACA_HEADER}### Instruction:\n{instruction}\n\n### Response:\n"
