"""The tagging head's network: a pretrained base read once per chunk, a small head per line.

A chunk's lines are encoded without the instruction prompt and without ``[NNN]`` prefixes:
each line's first ``max_line_tokens`` tokens followed by a newline token, packed into
windows of at most ``window_tokens`` tokens (a window starts with bos where the tokenizer
has one). The base (any ``transformers`` ``AutoModel``: its decoder without the LM head)
runs one forward pass per window. A line's vector is its newline token's hidden state (it
has seen the whole line and the lines above) next to the mean over the line's tokens, plus
the line's layout features (:func:`refinex.model.tagger.layout_features`) and, with
``structure_features``, its page-structure features (:class:`refinex.dom.PageStructure`,
zeros where the page HTML is unknown). Context over a
chunk's line vectors (residual convolutions, or a bidirectional GRU) lets each line see the
lines after it, which the causal base cannot, and a linear layer gives one deletion logit
per line.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

__all__ = [
    "HEAD_FILE",
    "EncodedChunk",
    "LineEncoder",
    "TagArchitecture",
    "TagHead",
    "line_vectors",
    "n_layout_columns",
]

HEAD_FILE = "tag_head.safetensors"
CONTEXTS = ("conv", "gru")
_CHARS_PER_TOKEN_CAP = 16  # lines are cut to this many characters per kept token before tokenizing


@dataclass(frozen=True)
class TagArchitecture:
    """What a saved tagging model needs to be rebuilt (stored in ``refinex_model.json``)."""

    hidden_size: int
    max_line_tokens: int = 32
    window_tokens: int = 1024
    head_size: int = 128
    context_layers: int = 2
    dropout: float = 0.1
    layout_features: bool = True
    structure_features: bool = False  # the lines' page-structure features (refinex.dom) where HTML is known
    context: str = "conv"  # "conv" (residual convolutions over the lines) or "gru" (bidirectional)
    context_width: int = 5  # lines a convolution sees (odd)

    def __post_init__(self) -> None:
        if self.context not in CONTEXTS:
            raise ValueError(f"context must be one of {CONTEXTS}, got {self.context!r}")
        if self.context_width < 1 or self.context_width % 2 == 0:
            raise ValueError(f"context_width must be odd and >= 1, got {self.context_width}")
        for name in ("hidden_size", "max_line_tokens", "window_tokens", "head_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.context_layers < 0:
            raise ValueError(f"context_layers must be >= 0, got {self.context_layers}")
        if self.window_tokens < self.max_line_tokens + 2:
            raise ValueError(
                f"window_tokens ({self.window_tokens}) must hold one line: at least max_line_tokens + 2 "
                f"({self.max_line_tokens + 2})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TagArchitecture":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass(frozen=True)
class EncodedChunk:
    """One chunk as base inputs: its windows' token ids and, per line, where it sits."""

    windows: tuple[tuple[int, ...], ...]
    spans: tuple[tuple[int, int, int], ...]  # per line: (window, first token, newline token)
    layout: np.ndarray  # (lines, layout features) float32

    @property
    def n_lines(self) -> int:
        return len(self.spans)

    @property
    def n_tokens(self) -> int:
        return sum(len(w) for w in self.windows)


class LineEncoder:
    """Turns a chunk's raw lines into :class:`EncodedChunk` with a Hugging Face tokenizer."""

    def __init__(self, tokenizer: Any, architecture: TagArchitecture) -> None:
        self.tokenizer = tokenizer
        self.architecture = architecture
        newline = tokenizer.encode("\n", add_special_tokens=False)
        if not newline:
            raise ValueError("the tokenizer encodes a newline as nothing: it cannot mark line ends")
        self.newline_id = int(newline[-1])
        bos = getattr(tokenizer, "bos_token_id", None)
        self.bos = () if bos is None else (int(bos),)

    def encode(self, lines: Sequence[str], structure: Any = None) -> EncodedChunk:
        """The chunk's windows and line spans; its layout columns are the layout features,
        then (``structure_features``) the page-structure features (zeros when ``structure``,
        the lines' :class:`refinex.dom.PageStructure`, is ``None``)."""
        from refinex.dom import DOM_FEATURES
        from refinex.model.tagger import layout_features

        arch = self.architecture
        if not lines:
            raise ValueError("a chunk has at least one line")
        cap = arch.max_line_tokens * _CHARS_PER_TOKEN_CAP
        texts = [line[:cap] for line in lines]
        nonempty = [i for i, t in enumerate(texts) if t]
        ids: list[list[int]] = [[] for _ in texts]
        if nonempty:
            encoded = self.tokenizer([texts[i] for i in nonempty], add_special_tokens=False)["input_ids"]
            for i, row in zip(nonempty, encoded):
                ids[i] = list(row[: arch.max_line_tokens])
        windows: list[list[int]] = []
        spans: list[tuple[int, int, int]] = []
        current: list[int] = list(self.bos)
        for row in ids:
            piece = row + [self.newline_id]
            if len(current) + len(piece) > arch.window_tokens and len(current) > len(self.bos):
                windows.append(current)
                current = list(self.bos)
            start = len(current)
            current.extend(piece)
            spans.append((len(windows), start, len(current) - 1))
        windows.append(current)
        parts = [layout_features(list(lines)).astype(np.float32)] if arch.layout_features else []
        if arch.structure_features:
            if structure is not None and len(structure) != len(lines):
                raise ValueError(f"structure of {len(structure)} lines for {len(lines)} lines")
            parts.append(np.zeros((len(lines), DOM_FEATURES), dtype=np.float32) if structure is None
                         else structure.features.astype(np.float32))
        layout = np.concatenate(parts, axis=1) if parts else np.zeros((len(lines), 0), dtype=np.float32)
        return EncodedChunk(tuple(tuple(w) for w in windows), tuple(spans), layout)


def n_layout_columns(architecture: TagArchitecture) -> int:
    """Columns of an :class:`EncodedChunk`'s ``layout`` for ``architecture``."""
    from refinex.dom import DOM_FEATURES
    from refinex.model.tagger import LAYOUT_FEATURES

    return LAYOUT_FEATURES * bool(architecture.layout_features) + DOM_FEATURES * bool(architecture.structure_features)


def line_vectors(hidden: Any, spans: Sequence[tuple[int, int, int]]) -> Any:
    """``(lines, 2 * hidden)``: per span ``(row, first, last)`` of ``hidden`` (batch, time,
    hidden), the last token's state next to the mean over the span (computed in fp32)."""
    import torch

    states = hidden.float()
    rows = torch.tensor([s[0] for s in spans], dtype=torch.long, device=states.device)
    first = torch.tensor([s[1] for s in spans], dtype=torch.long, device=states.device)
    last = torch.tensor([s[2] for s in spans], dtype=torch.long, device=states.device)
    sums = states.cumsum(dim=1)
    before = torch.where(
        (first > 0).unsqueeze(-1), sums[rows, (first - 1).clamp(min=0)], torch.zeros_like(sums[rows, last])
    )
    mean = (sums[rows, last] - before) / (last - first + 1).unsqueeze(-1).to(states.dtype)
    return torch.cat([states[rows, last], mean], dim=-1)


def _torch_module() -> Any:
    import torch

    return torch.nn.Module


class TagHead(_torch_module()):  # type: ignore[misc]
    """Line vectors (+ layout features) -> a projection -> context over the chunk's lines ->
    one logit per line.

    The context sees the lines after a line as well as before it: ``conv`` stacks residual
    convolutions of ``context_width`` lines (each layer widens the view; fast and fully
    parallel), ``gru`` a bidirectional GRU over the whole chunk (sequential, slower on CPU).
    Padding is masked, so a chunk's logits do not depend on the batch it is in.
    """

    def __init__(self, architecture: TagArchitecture, n_layout: int) -> None:
        import torch

        super().__init__()
        arch = architecture
        self.architecture = arch
        self.n_layout = int(n_layout)
        size = arch.head_size
        self.project = torch.nn.Sequential(
            torch.nn.Linear(2 * arch.hidden_size + self.n_layout, size),
            torch.nn.GELU(),
            torch.nn.Dropout(arch.dropout),
        )
        self.gru = None
        self.convs = torch.nn.ModuleList()
        if arch.context_layers and arch.context == "gru":
            self.gru = torch.nn.GRU(size, size // 2, num_layers=arch.context_layers, batch_first=True,
                                    bidirectional=True)
            size = 2 * (size // 2)
        elif arch.context_layers:
            self.convs.extend(
                torch.nn.Conv1d(size, size, arch.context_width, padding=arch.context_width // 2)
                for _ in range(arch.context_layers)
            )
        self.dropout = torch.nn.Dropout(arch.dropout)
        self.out = torch.nn.Linear(size, 1)

    def forward(self, vectors: Sequence[Any], layouts: Sequence[Any]) -> list[Any]:
        """One logit per line for each chunk (``vectors[i]``: (lines, 2 * hidden))."""
        import torch
        import torch.nn.functional as F
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, pad_sequence

        inputs = [torch.cat([v.float(), l.float()], dim=-1) for v, l in zip(vectors, layouts)]
        lengths = [int(x.shape[0]) for x in inputs]
        padded = self.project(pad_sequence(inputs, batch_first=True))
        mask = (torch.arange(padded.shape[1], device=padded.device)[None, :]
                < torch.tensor(lengths, device=padded.device)[:, None]).unsqueeze(-1).to(padded.dtype)
        if self.gru is not None:
            packed = pack_padded_sequence(padded, torch.tensor(lengths), batch_first=True, enforce_sorted=False)
            output, _ = self.gru(packed)
            padded, _ = pad_packed_sequence(output, batch_first=True, total_length=padded.shape[1])
        for conv in self.convs:
            hidden = (padded * mask).transpose(1, 2)  # padding is zero, as a lone chunk's edges are
            padded = padded + self.dropout(F.gelu(conv(hidden).transpose(1, 2)))
        logits = self.out(padded).squeeze(-1)
        return [logits[i, :n] for i, n in enumerate(lengths)]


def run_base(base: Any, windows: Sequence[Sequence[int]], pad_id: int, device: Any) -> Any:
    """The base's last hidden states of right-padded ``windows`` (batch, time, hidden)."""
    import torch

    width = max(len(w) for w in windows)
    ids = torch.full((len(windows), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(windows), width), dtype=torch.long)
    for row, window in enumerate(windows):
        ids[row, : len(window)] = torch.tensor(window, dtype=torch.long)
        mask[row, : len(window)] = 1
    out = base(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    return out.last_hidden_state


def token_batches(lengths: Sequence[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Indices sorted by length (longest first), cut into batches of at most ``max_rows``
    rows and ``max_tokens`` padded tokens (a longer row gets a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        width = lengths[current[0]] if current else lengths[index]
        if current and (len(current) >= max_rows or width * (len(current) + 1) > max_tokens):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def chunk_vectors(
    base: Any, chunks: Sequence[EncodedChunk], pad_id: int, device: Any, max_rows: int, max_tokens: int,
    autocast: Any = None,
) -> list[Any]:
    """Line vectors (lines, 2 * hidden) of every chunk, the base run over all their windows
    batched by length; gradients flow where the base has trainable parameters."""
    import contextlib

    import torch

    windows: list[tuple[int, int]] = []  # (chunk, window)
    for c, chunk in enumerate(chunks):
        windows.extend((c, w) for w in range(len(chunk.windows)))
    lengths = [len(chunks[c].windows[w]) for c, w in windows]
    per_window: dict[tuple[int, int], Any] = {}
    for batch in token_batches(lengths, max_rows, max_tokens):
        keys = [windows[i] for i in batch]
        with autocast if autocast is not None else contextlib.nullcontext():
            hidden = run_base(base, [chunks[c].windows[w] for c, w in keys], pad_id, device)
        for row, key in enumerate(keys):
            per_window[key] = (hidden, row)
    out = []
    for c, chunk in enumerate(chunks):
        pieces = []
        for w in range(len(chunk.windows)):
            hidden, row = per_window[(c, w)]
            spans = [(row, s, e) for win, s, e in chunk.spans if win == w]
            pieces.append(line_vectors(hidden, spans))
        out.append(torch.cat(pieces, dim=0))
    return out


def load_head(path: Union[str, os.PathLike[str]], architecture: TagArchitecture, n_layout: int, device: Any) -> Any:
    """A :class:`TagHead` with the weights of ``path`` (safetensors), in eval mode."""
    from safetensors.torch import load_file

    head = TagHead(architecture, n_layout)
    head.load_state_dict(load_file(str(path), device="cpu"))
    return head.to(device).eval()
