"""A run's data: corpus -> book's character split -> cached token ids -> the book's loaders.

Built (and so validated) before any tracked run starts: a corpus or split that cannot give one
window fails here with the numbers, and no MLflow run is created. The corpus is streamed into its
token caches (prepare.py), never held whole in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from .config import Config
from .corpus import default_data_dir
from .corpus_stream import StreamedCorpus
from .datasets import GPTDatasetV1, make_loader
from .errors import CorpusError
from .prepare import PreparedCorpus, Progress, prepare_corpus
from .tokenizer import get_tokenizer

# A corpus this large shows its preparation as progress bars (on a terminal) before training.
PROGRESS_BYTES = 16 * 2**20


@dataclass
class Splits:
    corpus: StreamedCorpus
    tokenizer: object
    train_ids: np.ndarray
    val_ids: np.ndarray
    train_loader: DataLoader
    val_loader: DataLoader
    prepared: PreparedCorpus | None = None  # where the ids came from (caches, character ranges)


def prepare_data(config: Config, data_dir: Path | None = None) -> Splits:
    data_dir = data_dir or default_data_dir()
    tokenizer = get_tokenizer("gpt2")
    prepared = prepare_corpus(
        config.data.source,
        config.data.train_ratio,
        data_dir,
        tokenizer=tokenizer,
        progress=Progress(min_bytes=PROGRESS_BYTES),
    )
    corpus = prepared.corpus
    ctx = config.model.context_length
    ids = {}
    for split in prepared.splits:
        name, tokens = split.name, split.ids
        assert tokens is not None  # prepare_corpus loads the ids unless told not to
        if len(tokens) < ctx + 1:
            raise CorpusError(
                f"{name} split of {corpus.name} has {len(tokens)} tokens; context_length {ctx} needs at least "
                f"{ctx + 1}: lower model.context_length or use a longer corpus / another data.train_ratio"
            )
        # No id of the tokenizer reaches n_vocab: only a smaller vocabulary needs the (full) scan.
        if config.model.vocab_size < tokenizer.n_vocab and tokens.max(initial=0) >= config.model.vocab_size:
            raise CorpusError(
                f"{name} split has token id {int(tokens.max())} but model.vocab_size is {config.model.vocab_size}: "
                "use vocab_size 50257 for the GPT-2 tokenizer"
            )
        ids[name] = tokens
    # The book's loaders: shuffled training windows at the configured stride, dropping the last
    # partial batch; validation windows at stride = context, in order, keeping every batch.
    train_ds = GPTDatasetV1.from_token_ids(ids["train"], ctx, config.stride, name="train split")
    val_ds = GPTDatasetV1.from_token_ids(ids["validation"], ctx, ctx, name="validation split")
    train_loader = make_loader(train_ds, config.train.batch_size, shuffle=True, drop_last=True, name="train split")
    val_loader = make_loader(val_ds, config.train.batch_size, shuffle=False, drop_last=False, name="validation split")
    return Splits(corpus, tokenizer, ids["train"], ids["validation"], train_loader, val_loader, prepared)
