"""refinex: deletion-only refinement of LLM pre-training corpora (RefineX), on Spark + Delta."""

__version__ = "0.1.0"
