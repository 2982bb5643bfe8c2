"""The GPT-2 tokenizer loads offline from TIKTOKEN_CACHE_DIR, and says what to do when it cannot."""

from __future__ import annotations

import os
import subprocess
import sys


def test_the_tokenizer_is_gpt2s_bpe(tokenizer):
    assert tokenizer.n_vocab == 50257
    assert tokenizer.encode("Every effort moves you") == [6109, 3626, 6100, 345]


def test_without_a_cache_offline_the_error_is_one_line_naming_tiktoken_cache_dir(tmp_path):
    # An empty cache folder and a closed proxy make tiktoken's download fail at once, network or not.
    env = dict(
        os.environ,
        TIKTOKEN_CACHE_DIR=str(tmp_path),
        HTTPS_PROXY="http://127.0.0.1:9",
        HTTP_PROXY="http://127.0.0.1:9",
        https_proxy="http://127.0.0.1:9",
        http_proxy="http://127.0.0.1:9",
    )
    code = (
        "from gptexp.tokenizer import get_tokenizer\n"
        "try:\n    get_tokenizer('gpt2')\nexcept Exception as e:\n    print(type(e).__name__); print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    name, message = out.stdout.strip().split("\n")
    assert name == "TokenizerUnavailable"
    assert "TIKTOKEN_CACHE_DIR" in message and "gpt2" in message
