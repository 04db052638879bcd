"""Prompt and target format of the refine model (shared by SFT, training and inference)."""
from __future__ import annotations

PROMPT_VERSION = "refinex-prompt-v1"

INSTRUCTION = (
    "Clean this web document for language-model pre-training. Each line starts with its id "
    "in brackets. Write a program that deletes navigation, ads, cookie and share notices, "
    "boilerplate and broken fragments, one operation per line: remove_lines(start, end), "
    'remove_str(line, "text") or keep_all().'
)
PROGRAM_HEADER = "Program:\n"


def build_prompt(numbered_chunk: str) -> str:
    """The model input for one chunk whose lines carry ``[NNN]`` ids."""
    return f"{INSTRUCTION}\n\nDocument:\n{numbered_chunk}\n\n{PROGRAM_HEADER}"


def build_target(program_text: str) -> str:
    """The supervised continuation: the canonical program text, ending with a newline."""
    return program_text.rstrip("\n") + "\n"
