"""The GPT-2 BPE tokenizer (tiktoken), with an error a user can act on when it cannot load."""

from __future__ import annotations

import os

import tiktoken

from .errors import GptexpError


class TokenizerUnavailable(GptexpError):
    pass


def get_tokenizer(name: str = "gpt2") -> tiktoken.Encoding:
    """tiktoken's encoding `name`; tiktoken itself honours TIKTOKEN_CACHE_DIR."""
    try:
        return tiktoken.get_encoding(name)
    except Exception as exc:  # tiktoken raises requests/urllib/OSError/ValueError variants when offline
        where = os.environ.get("TIKTOKEN_CACHE_DIR")
        hint = (
            f"TIKTOKEN_CACHE_DIR={where} does not hold its BPE files"
            if where
            else "set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached BPE files"
        )
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TokenizerUnavailable(
            f"cannot load the {name!r} tokenizer (offline with no cache?): {hint} ({reason})"
        ) from None
