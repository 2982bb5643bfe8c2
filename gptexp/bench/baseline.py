"""The baseline: the book's own package (llms-from-scratch), which every figure is measured against."""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from ..errors import GptexpError, first_line

BOOK_PACKAGE = "llms-from-scratch"
BOOK_PACKAGE_VERSION = "1.0.19"  # the version the Makefile installs and experiments/ was produced with
BOOK_MODULES = ("llms_from_scratch.ch02", "llms_from_scratch.ch04", "llms_from_scratch.ch05")
BOOK_SEED = 123  # the book's torch.manual_seed before building a model


def require_book_package() -> ModuleType:
    """The book's package, imported; a GptexpError saying how to install it when it cannot be."""
    try:
        package = importlib.import_module("llms_from_scratch")
        for name in BOOK_MODULES:
            importlib.import_module(name)
    except ImportError as exc:
        raise GptexpError(
            f"gptexp bench measures gptexp against the book's package {BOOK_PACKAGE}, which cannot be "
            f"imported ({first_line(exc)}): install it with `pip install --no-deps "
            f"{BOOK_PACKAGE}=={BOOK_PACKAGE_VERSION}` (as `make install` does)"
        ) from None
    return package


def book_modules():
    """The book package's chapter 2, 4 and 5 modules."""
    import llms_from_scratch.ch02 as ch02
    import llms_from_scratch.ch04 as ch04
    import llms_from_scratch.ch05 as ch05

    return ch02, ch04, ch05


def seeded(make):
    """make() after the book's seed: the book's model and ours start from the same weights."""
    torch.manual_seed(BOOK_SEED)
    return make()


class PassThrough:
    """A 'tokenizer' whose encode returns ids given up front: feeds the book's classes pre-tokenized ids."""

    def __init__(self, ids):
        self.ids = ids

    def encode(self, txt, allowed_special=None):
        return self.ids
