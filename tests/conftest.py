"""Shared fixtures: the real GPT-2 tokenizer, the real corpus, and the book's package as oracle.

Offline defaults: when TIKTOKEN_CACHE_DIR / GPTEXP_DATA_MIRROR are unset, the ../shared folder
beside the checkout (as laid out for developers and CI) is used.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

if not os.environ.get("TIKTOKEN_CACHE_DIR") and (SHARED / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken_cache")
if not os.environ.get("GPTEXP_DATA_MIRROR") and (SHARED / "data").is_dir():
    os.environ["GPTEXP_DATA_MIRROR"] = str(SHARED / "data")

VERDICT_SHA256 = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"

# A model small enough to train a few steps in well under a second on 2 cores.
SMALL_CFG = {
    "vocab_size": 50257,
    "context_length": 32,
    "emb_dim": 64,
    "n_heads": 4,
    "n_layers": 2,
    "drop_rate": 0.1,
    "qkv_bias": False,
}


@pytest.fixture(scope="session")
def tokenizer():
    from gptexp.tokenizer import get_tokenizer

    return get_tokenizer("gpt2")


@pytest.fixture(scope="session")
def verdict_path() -> Path:
    mirror = os.environ.get("GPTEXP_DATA_MIRROR")
    path = Path(mirror) / "the-verdict.txt" if mirror else None
    if path is None or not path.is_file():
        pytest.skip("the-verdict.txt not found: set GPTEXP_DATA_MIRROR to a folder that holds it")
    return path


@pytest.fixture(scope="session")
def verdict_text(verdict_path) -> str:
    return verdict_path.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def book():
    """The book's package (llms-from-scratch), our reference implementation."""
    import llms_from_scratch.ch02 as ch02
    import llms_from_scratch.ch04 as ch04
    import llms_from_scratch.ch05 as ch05

    class Book:
        GPTModel = ch04.GPTModel
        generate_text_simple = staticmethod(ch04.generate_text_simple)
        generate = staticmethod(ch05.generate)
        calc_loss_batch = staticmethod(ch05.calc_loss_batch)
        calc_loss_loader = staticmethod(ch05.calc_loss_loader)
        GPTDatasetV1 = ch02.GPTDatasetV1
        create_dataloader_v1 = staticmethod(ch02.create_dataloader_v1)
        text_to_token_ids = staticmethod(ch05.text_to_token_ids)

    return Book


@pytest.fixture(scope="session", autouse=True)
def data_dir(tmp_path_factory):
    """A private data folder (registry copy, raw/, cache/) so tests never write into the checkout."""
    import shutil

    d = tmp_path_factory.mktemp("data")
    shutil.copy(REPO / "data" / "registry.yaml", d / "registry.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPTEXP_DATA_DIR", str(d))
        yield d


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """A real MLflow store (SQLite + local artifacts) in a temp folder, as MLFLOW_TRACKING_URI."""
    d = tmp_path_factory.mktemp("mlruns")
    uri = f"sqlite:///{d}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        yield uri


TINY = REPO / "configs" / "tiny.yaml"


def cli_env(**extra) -> dict:
    """The environment for a `gptexp` subprocess: this one plus `extra`."""
    env = dict(os.environ)
    env.update({k: str(v) for k, v in extra.items()})
    return env
