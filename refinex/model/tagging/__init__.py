"""The tagging head: a refine model that writes its program in one forward pass.

The same pretrained bases as the generative head, read once per chunk; one deletion
probability per line; programs made of the runs of deleted lines, valid by construction.
``labels`` is pure (no torch); ``model``, ``train`` and ``backend`` import torch when used.
"""
from __future__ import annotations

from refinex.model.tagging.labels import (
    DEFAULT_THRESHOLD,
    THRESHOLD_GRID,
    LabelledLines,
    ThresholdChoice,
    choose_threshold,
    chunk_labels,
    decide_lines,
    kept_char_f1,
    program_for_lines,
)

HEADS = ("generate", "tag")

__all__ = [
    "DEFAULT_THRESHOLD",
    "HEADS",
    "THRESHOLD_GRID",
    "LabelledLines",
    "ThresholdChoice",
    "choose_threshold",
    "chunk_labels",
    "decide_lines",
    "kept_char_f1",
    "program_for_lines",
]
