"""The book's sliding-window datasets and loaders, as views into one token array.

`GPTDatasetV1` yields the book's (input, target) windows in the book's order; a
`create_dataloader_v1` loader is a plain torch DataLoader over it, so for the same seed it draws
the book's shuffle (and consumes the global RNG exactly as the book's loader does, which keeps
dropout masks aligned in a seeded training run). Where the book's loader would be silently
empty (and its loss NaN), these raise a CorpusError with the numbers.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .errors import CorpusError
from .tokens import encode


def split_text(text: str, train_ratio: float = 0.9) -> tuple[str, str]:
    """The book's split: by characters, the first `train_ratio` for training."""
    split_idx = int(train_ratio * len(text))
    return text[:split_idx], text[split_idx:]


def num_windows(n_tokens: int, max_length: int, stride: int) -> int:
    """len(range(0, n_tokens - max_length, stride)): the book's window count."""
    return len(range(0, n_tokens - max_length, stride))


class GPTDatasetV1(Dataset):
    """Windows of `max_length` tokens every `stride` tokens; targets shifted by one.

    Holds only the flat token array: window i is a view of tokens[i*stride : i*stride+max_length+1].
    """

    def __init__(self, txt, tokenizer, max_length: int, stride: int, *, token_ids=None, name: str = "text"):
        if max_length < 1 or stride < 1:
            raise ValueError(f"max_length ({max_length}) and stride ({stride}) must be at least 1")
        self.token_ids = np.asarray(token_ids) if token_ids is not None else encode(txt, tokenizer)
        self.max_length = max_length
        self.stride = stride
        n = len(self.token_ids)
        self._len = num_windows(n, max_length, stride)
        if self._len == 0:
            raise CorpusError(
                f"{name} has {n} tokens; a window of {max_length} tokens needs at least {max_length + 1}: "
                "use a longer text or a shorter context_length"
            )

    @classmethod
    def from_token_ids(cls, token_ids, max_length: int, stride: int, *, name: str = "text") -> "GPTDatasetV1":
        return cls(None, None, max_length, stride, token_ids=token_ids, name=name)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, idx: int):
        if idx < 0:
            idx += self._len
        if not 0 <= idx < self._len:
            raise IndexError(f"window {idx} out of range for {self._len} windows")
        start = idx * self.stride
        window = torch.from_numpy(self.token_ids[start:start + self.max_length + 1].astype(np.int64))
        return window[:-1], window[1:]


def make_loader(dataset: GPTDatasetV1, batch_size: int, shuffle: bool, drop_last: bool,
                num_workers: int = 0, *, name: str = "text") -> DataLoader:
    """A DataLoader with the book's arguments that refuses to be empty."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                        num_workers=num_workers)
    if len(loader) == 0:
        raise CorpusError(
            f"{name} gives {len(dataset)} window(s) of {dataset.max_length} tokens, fewer than batch_size "
            f"{batch_size} with drop_last: lower batch_size or stride, or use a longer corpus"
        )
    return loader


def create_dataloader_v1(txt, batch_size=4, max_length=256, stride=128, shuffle=True, drop_last=True,
                         num_workers=0, *, tokenizer=None):
    """The book's loader factory; `tokenizer` defaults to GPT-2's, as in the book."""
    if tokenizer is None:
        from .tokenizer import get_tokenizer

        tokenizer = get_tokenizer("gpt2")
    dataset = GPTDatasetV1(txt, tokenizer, max_length, stride)
    return make_loader(dataset, batch_size, shuffle, drop_last, num_workers)
