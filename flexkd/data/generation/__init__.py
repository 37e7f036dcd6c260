"""Generation data (instruction following, summarization): the same steps as classification, one module each.

``sources`` reads raw files and Hub datasets into one table shape, ``prompts`` templates a record into the prompt
text, ``tokenize`` builds features and batches, ``prepare`` writes the prepared splits and ``validation`` holds the
GX suite. The names below are the package's public interface.
"""

from flexkd.data.generation.prepare import prepare_generation
from flexkd.data.generation.prompts import (
    ALPACA_HEADER,
    ALPACA_HEADER_WITH_INPUT,
    DEFAULT_SUMMARY_INSTRUCTION,
    PromptFormatter,
)
from flexkd.data.generation.sources import (
    COLUMNS,
    TASKS,
    GenerationColumns,
    load_generation_hub,
    load_generation_table,
)
from flexkd.data.generation.tokenize import (
    CausalCollator,
    LeftPadCollator,
    end_token_id,
    pad_token_id,
    tokenize_generation,
    tokenize_prompts,
)
from flexkd.data.generation.validation import GenerationValidationSettings, validate_generation

__all__ = [
    "ALPACA_HEADER",
    "ALPACA_HEADER_WITH_INPUT",
    "COLUMNS",
    "CausalCollator",
    "DEFAULT_SUMMARY_INSTRUCTION",
    "GenerationColumns",
    "GenerationValidationSettings",
    "LeftPadCollator",
    "PromptFormatter",
    "TASKS",
    "end_token_id",
    "load_generation_hub",
    "load_generation_table",
    "pad_token_id",
    "prepare_generation",
    "tokenize_generation",
    "tokenize_prompts",
    "validate_generation",
]
