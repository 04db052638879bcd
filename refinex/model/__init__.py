"""The refine model: prompt format, SFT pairs, base models, training and inference backends."""
from __future__ import annotations

from refinex.model.prompts import PROMPT_VERSION, build_prompt, build_target

__all__ = ["PROMPT_VERSION", "build_prompt", "build_target"]
