"""Grammar-constrained decoding of refine programs.

* ``automaton``: :class:`ProgramAutomaton`, the byte-level automaton of the valid canonical
  programs of one chunk, and :func:`complete_prefix`.
* ``tokens``: :class:`TokenTable`, the byte string of every token id of a tokenizer, sorted
  for trie walks against the automaton.
* ``regex``: :func:`program_regex`, the equivalent (looser) regular expression for engines
  with their own structured-output support (vLLM, OpenAI-compatible servers).
* ``confidence``: per-operation confidences of a generated program, and dropping the unsure
  operations.
* ``processor``: :class:`ProgramLogitsProcessor` and :class:`NewlineStopCriteria`, the
  ``transformers`` integration; the only part that needs torch.

All of it is re-exported here. The processor's names are loaded on first use (module
``__getattr__``), so importing this package, or any module but ``processor``, does not
import torch or transformers.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from refinex.model.constrained.automaton import ProgramAutomaton, complete_prefix, escape_char
from refinex.model.constrained.confidence import drop_unsure_ops, op_confidences
from refinex.model.constrained.regex import int_range_regex, program_regex
from refinex.model.constrained.tokens import TokenTable, token_table_for

if TYPE_CHECKING:
    from refinex.model.constrained.processor import NewlineStopCriteria, ProgramLogitsProcessor

__all__ = [
    "ProgramAutomaton",
    "TokenTable",
    "ProgramLogitsProcessor",
    "NewlineStopCriteria",
    "token_table_for",
    "program_regex",
    "int_range_regex",
    "escape_char",
    "complete_prefix",
    "op_confidences",
    "drop_unsure_ops",
]

_LAZY = frozenset({"NewlineStopCriteria", "ProgramLogitsProcessor"})  # need torch and transformers


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from refinex.model.constrained import processor

        return getattr(processor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
