"""The fast tier of the refine model: a line tagger with no transformer, for CPU executors.

Each line of a document is read as hashed word and character n-grams (an embedding bag),
next to its layout features (:func:`refinex.model.tagger.layout_features`) and, where the
page HTML is known, its place in the page (:func:`refinex.dom.dom_line_features`); a
bidirectional GRU (or residual convolutions) over the document's lines gives every line a
deletion probability. Programs are written as by the tagging head
(:mod:`refinex.model.tagging.labels`): runs of lines at or above a threshold
cross-validated on the training documents, valid by construction. It learns from whole
documents and their distilled programs (hard labels) or from the consensus members'
weighted votes (soft labels), not from the SFT chunks.

``features`` needs numpy, scipy and scikit-learn only; ``network``, ``train`` and
``backend`` import torch when used.
"""
from __future__ import annotations

ENCODER = "hashed"  # refinex_model.json "encoder" of a fast-tier model
TIER_FAST = "fast"

__all__ = ["ENCODER", "TIER_FAST"]
