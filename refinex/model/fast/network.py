"""The fast tier's network: an embedding bag per line, context over the document's lines.

A line's vector is the weighted sum of its hashed n-gram embeddings (``EmbeddingBag``,
sparse gradients: a step touches only the buckets its lines use) next to its dense
features, projected to ``hidden_size``. A bidirectional GRU over the document's lines (or
residual convolutions of ``context_width`` lines) lets every line see the lines around it:
a menu item is a short line among short lines, a comment follows a "Comments" heading. One
linear layer gives each line its deletion logit. The GRU sees the whole document; the
convolutions (``dilated``: each layer's taps twice as far apart as the last's) see a window
of lines but train about ten times faster on a CPU. Padding is masked (the GRU is packed), so
a document's logits do not depend on the batch it is in.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Sequence, Union

import numpy as np

from refinex.model.fast.features import DENSE_FEATURES, LineFeatures

__all__ = ["CONTEXTS", "WEIGHTS_FILE", "FastArchitecture", "FastTagger", "load_network"]

WEIGHTS_FILE = "fast_tagger.safetensors"
CONTEXTS = ("gru", "conv")


@dataclass(frozen=True)
class FastArchitecture:
    """What a saved fast-tier model needs to be rebuilt (stored in ``refinex_model.json``)."""

    n_features: int = 2**18
    embedding_size: int = 64
    hidden_size: int = 128
    context: str = "gru"
    context_layers: int = 2
    context_width: int = 5
    dilated: bool = False  # convolution i spaces its taps 2**i lines apart (a wider view, same cost)
    dropout: float = 0.1
    dense_features: int = DENSE_FEATURES

    def __post_init__(self) -> None:
        if self.context not in CONTEXTS:
            raise ValueError(f"context must be one of {CONTEXTS}, got {self.context!r}")
        for name in ("n_features", "embedding_size", "hidden_size"):
            if int(getattr(self, name)) < 2:
                raise ValueError(f"{name} must be >= 2, got {getattr(self, name)}")
        if self.context == "gru" and self.hidden_size % 2:
            raise ValueError(f"hidden_size must be even for the bidirectional GRU, got {self.hidden_size}")
        if self.context_layers < 0:
            raise ValueError(f"context_layers must be >= 0, got {self.context_layers}")
        if self.context_width < 1 or self.context_width % 2 == 0:
            raise ValueError(f"context_width must be odd and >= 1, got {self.context_width}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "FastArchitecture":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def _module() -> Any:
    import torch

    return torch.nn.Module


class FastTagger(_module()):  # type: ignore[misc]
    """Documents' :class:`LineFeatures` -> one deletion logit per line."""

    def __init__(self, architecture: FastArchitecture) -> None:
        import torch

        super().__init__()
        arch = self.architecture = architecture
        self.embedding = torch.nn.EmbeddingBag(arch.n_features, arch.embedding_size, mode="sum", sparse=True)
        self.project = torch.nn.Sequential(
            torch.nn.Linear(arch.embedding_size + arch.dense_features, arch.hidden_size),
            torch.nn.GELU(),
            torch.nn.Dropout(arch.dropout),
        )
        self.gru = None
        self.convs = torch.nn.ModuleList()
        if arch.context_layers and arch.context == "gru":
            self.gru = torch.nn.GRU(arch.hidden_size, arch.hidden_size // 2, num_layers=arch.context_layers,
                                    batch_first=True, bidirectional=True,
                                    dropout=arch.dropout if arch.context_layers > 1 else 0.0)
        elif arch.context_layers:
            for layer in range(arch.context_layers):
                dilation = 2**layer if arch.dilated else 1
                self.convs.append(torch.nn.Conv1d(arch.hidden_size, arch.hidden_size, arch.context_width,
                                                  padding=dilation * (arch.context_width // 2), dilation=dilation))
        self.dropout = torch.nn.Dropout(arch.dropout)
        self.out = torch.nn.Linear(arch.hidden_size, 1)

    def sparse_parameters(self) -> list[Any]:
        """The embedding table (sparse gradients: ``torch.optim.SparseAdam``)."""
        return list(self.embedding.parameters())

    def dense_parameters(self) -> list[Any]:
        """Everything else."""
        sparse = {id(p) for p in self.sparse_parameters()}
        return [p for p in self.parameters() if id(p) not in sparse]

    def forward(self, documents: Sequence[LineFeatures]) -> list[Any]:
        """One logit per line for each document (documents of at least one line)."""
        import torch
        import torch.nn.functional as F
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, pad_sequence

        lengths = [doc.n_lines for doc in documents]
        if not documents or min(lengths) < 1:
            raise ValueError("every document needs at least one line")
        device = self.out.weight.device
        shift = np.cumsum([0] + [len(doc.indices) for doc in documents])
        indices = torch.from_numpy(np.concatenate([doc.indices for doc in documents])).to(device)
        offsets = torch.from_numpy(np.concatenate(
            [doc.offsets[:-1] + shift[i] for i, doc in enumerate(documents)])).to(device)
        weights = torch.from_numpy(np.concatenate([doc.weights for doc in documents])).to(device)
        dense = torch.from_numpy(np.concatenate([doc.dense for doc in documents])).to(device)
        bags = self.embedding(indices, offsets, per_sample_weights=weights)
        hidden = self.project(torch.cat([bags, dense], dim=-1))
        padded = pad_sequence(list(torch.split(hidden, lengths)), batch_first=True)
        if self.gru is not None:
            packed = pack_padded_sequence(padded, torch.tensor(lengths), batch_first=True, enforce_sorted=False)
            output, _ = self.gru(packed)
            padded, _ = pad_packed_sequence(output, batch_first=True, total_length=padded.shape[1])
        if len(self.convs):
            mask = (torch.arange(padded.shape[1], device=device)[None, :]
                    < torch.tensor(lengths, device=device)[:, None]).unsqueeze(-1).to(padded.dtype)
            for conv in self.convs:
                padded = padded + self.dropout(F.gelu(conv((padded * mask).transpose(1, 2)).transpose(1, 2)))
        logits = self.out(padded).squeeze(-1)
        return [logits[i, :n] for i, n in enumerate(lengths)]


def load_network(path: Union[str, os.PathLike[str]], architecture: FastArchitecture, device: Any = "cpu") -> Any:
    """A :class:`FastTagger` with the weights of ``path`` (safetensors), in eval mode."""
    from safetensors.torch import load_file

    network = FastTagger(architecture)
    network.load_state_dict(load_file(str(path), device="cpu"))
    return network.to(device).eval()
