"""The book's sliding-window datasets and loaders, as views into one token array.

`GPTDatasetV1` yields the book's (input, target) windows in the book's order; a
`create_dataloader_v1` loader is a plain torch DataLoader over it, so for the same seed it draws
the book's shuffle (and consumes the global RNG exactly as the book's loader does, which keeps
dropout masks aligned in a seeded training run). A text too short for one window gives an empty
dataset and loader, as the book's do; the clear error comes where one would be used: the
harness's preflight (data.prepare_data, `from_token_ids`, `make_loader`) and `calc_loss_loader`,
where the book would return NaN.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .errors import CorpusError
from .token_cache import token_dtype


def split_text(text: str, train_ratio: float = 0.9) -> tuple[str, str]:
    """The book's split: by characters, the first `train_ratio` for training."""
    split_idx = int(train_ratio * len(text))
    return text[:split_idx], text[split_idx:]


def num_windows(n_tokens: int, max_length: int, stride: int) -> int:
    """len(range(0, n_tokens - max_length, stride)): the book's window count."""
    return len(range(0, n_tokens - max_length, stride))


def encode_text(txt: str, tokenizer) -> np.ndarray:
    """txt -> flat token-id array with any tokenizer that has `encode`, as the book calls it.

    The dtype follows `tokenizer.n_vocab` where there is one (uint16 for GPT-2), else the largest
    id (uint16 below 65,536, uint32 below 2**32), so chapter-2 style tokenizers work too.
    """
    ids = _call_encode(tokenizer, txt)
    n_vocab = getattr(tokenizer, "n_vocab", None)
    if n_vocab is not None:
        return np.asarray(ids, dtype=token_dtype(n_vocab))  # straight from the list: no int64 copy
    wide = np.asarray(ids, dtype=np.int64)
    if wide.size and wide.min() < 0:
        raise CorpusError(f"the tokenizer gave a negative token id ({int(wide.min())}): token ids must be >= 0")
    top = int(wide.max()) if wide.size else 0
    return wide.astype(token_dtype(top + 1) if top < 2**32 else np.int64)


def _call_encode(tokenizer, txt: str) -> list[int]:
    """The book's call, encode(txt, allowed_special={"<|endoftext|>"}); an `encode` that takes
    only the text (the book's chapter-2 SimpleTokenizer) gets the text alone."""
    try:
        params = inspect.signature(tokenizer.encode).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: call it as the book does
        params = None
    if params is not None and not any(p.name == "allowed_special" or p.kind is p.VAR_KEYWORD for p in params):
        return tokenizer.encode(txt)
    return tokenizer.encode(txt, allowed_special={"<|endoftext|>"})


class GPTDatasetV1(Dataset):
    """Windows of `max_length` tokens every `stride` tokens; targets shifted by one.

    Holds only the flat token array: window i is tokens[i*stride : i*stride+max_length+1].
    `input_ids` and `target_ids` are the book's per-window tensors, made on access rather than
    stored; every item is a fresh pair of tensors that share nothing with each other or the array.
    """

    def __init__(self, txt, tokenizer, max_length: int, stride: int, *, token_ids=None):
        if max_length < 1 or stride < 1:
            raise ValueError(f"max_length ({max_length}) and stride ({stride}) must be at least 1")
        self.tokenizer = tokenizer
        self.token_ids = np.asarray(token_ids) if token_ids is not None else encode_text(txt, tokenizer)
        self.max_length = max_length
        self.stride = stride
        self._len = num_windows(len(self.token_ids), max_length, stride)
        self.input_ids = WindowTensors(self, shift=0)
        self.target_ids = WindowTensors(self, shift=1)

    @classmethod
    def from_token_ids(cls, token_ids, max_length: int, stride: int, *, name: str = "text") -> GPTDatasetV1:
        """The harness's constructor: unlike the book's one, it refuses a split too short for one window."""
        dataset = cls(None, None, max_length, stride, token_ids=token_ids)
        if len(dataset) == 0:
            raise CorpusError(
                f"{name} has {len(dataset.token_ids)} tokens; a window of {max_length} tokens needs at least "
                f"{max_length + 1}: use a longer text or a shorter context_length"
            )
        return dataset

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, idx: int):
        start = self.window_start(idx)
        return self.tokens_at(start), self.tokens_at(start + 1)

    def window_start(self, idx: int) -> int:
        if idx < 0:
            idx += self._len
        if not 0 <= idx < self._len:
            raise IndexError(f"window {idx} out of range for {self._len} windows")
        return idx * self.stride

    def tokens_at(self, start: int) -> torch.Tensor:
        """(max_length,) int64 tensor of the tokens from `start`: a copy, never a view of the array."""
        return torch.from_numpy(self.token_ids[start : start + self.max_length].astype(np.int64))


class WindowTensors(Sequence):
    """The book's `input_ids` (shift 0) or `target_ids` (shift 1) list, without storing it."""

    def __init__(self, dataset: GPTDatasetV1, shift: int):
        self._dataset = dataset
        self._shift = shift

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return [self[i] for i in range(*idx.indices(len(self)))]
        return self._dataset.tokens_at(self._dataset.window_start(idx) + self._shift)


def make_loader(
    dataset: GPTDatasetV1, batch_size: int, shuffle: bool, drop_last: bool, num_workers: int = 0, *, name: str = "text"
) -> DataLoader:
    """The harness's loader: the book's arguments, but it refuses to be empty."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=num_workers)
    if len(loader) == 0:
        raise CorpusError(
            f"{name} gives {len(dataset)} window(s) of {dataset.max_length} tokens, fewer than batch_size "
            f"{batch_size} with drop_last: lower batch_size or stride, or use a longer corpus"
        )
    return loader


def create_dataloader_v1(
    txt, batch_size=4, max_length=256, stride=128, shuffle=True, drop_last=True, num_workers=0, *, tokenizer=None
):
    """The book's loader factory; `tokenizer` defaults to GPT-2's, as in the book.

    As the book's, it may be empty (a text shorter than one window, or fewer windows than
    batch_size with drop_last); `calc_loss_loader` then refuses it rather than return NaN.
    """
    if tokenizer is None:
        from .tokenizer import get_tokenizer

        tokenizer = get_tokenizer("gpt2")
    dataset = GPTDatasetV1(txt, tokenizer, max_length, stride)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=num_workers)
