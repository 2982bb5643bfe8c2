"""A pytest plugin that puts gptexp behind the book's module names, to run the book's own tests.

    python -m pytest -p book_shim .../llms_from_scratch/tests/test_ch04.py

with this folder and the repository on PYTHONPATH, in a process of its own (never import it into
the suite's process: it replaces the book's modules there). Every `llms_from_scratch.*` module the
book's tests import is a stand-in holding gptexp's objects under the book's names, installed
before collection: the book's own code is never imported (checked at the end of the session), and
a name gptexp does not offer fails the import ("cannot import name ...") instead of falling back
to the book. Keep pytest's default import mode: `--import-mode=importlib` imports the book's
package __init__ as the test files' parent.
"""

from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import pytest

import gptexp

# Book module -> the names gptexp offers for it (same name in `gptexp`).
BOOK_NAMES: dict[str, tuple[str, ...]] = {
    "ch02": ("GPTDatasetV1", "create_dataloader_v1"),
    "ch04": ("GPTModel", "GPTModelFast", "generate_text_simple"),
    "ch05": (
        "generate",
        "text_to_token_ids",
        "token_ids_to_text",
        "calc_loss_batch",
        "calc_loss_loader",
        "train_model_simple",
        "evaluate_model",
        "generate_and_print_sample",
        "plot_losses",
    ),
    "appendix_d": ("train_model",),
}


class KVCacheGPTModel(gptexp.GPTModelFast):
    """Stands in for the book's `kv_cache.gpt2.GPTModel`, which gptexp folds into the fast model.

    The book's model keeps its cache on itself, hence `reset_kv_cache`; gptexp's cache is a
    KVCache object per `generate` call, so there is nothing to reset. The method exists because
    the book's test picks the cached decoding loop by its presence.
    """

    def reset_kv_cache(self) -> None:
        pass


def kv_generate_text_simple(model, idx, max_new_tokens, context_size=None, use_cache=True):
    """The book's `kv_cache.generate.generate_text_simple` signature, on gptexp's KV-cached `generate`."""
    model.eval()
    return gptexp.generate(model, idx, max_new_tokens, context_size or model.cfg["context_length"], use_cache=use_cache)


def _module(name: str, objects: dict) -> types.ModuleType:
    module = types.ModuleType(name, f"gptexp under the book's name {name}")
    module.__path__ = []  # a package whose unlisted submodules are not found, never the book's
    module.__gptexp_shim__ = True
    module.__dict__.update(objects)
    return module


def install() -> None:
    modules = {"llms_from_scratch": {}, "llms_from_scratch.kv_cache": {}}
    modules.update(
        {f"llms_from_scratch.{m}": {n: getattr(gptexp, n) for n in names} for m, names in BOOK_NAMES.items()}
    )
    modules["llms_from_scratch.kv_cache.gpt2"] = {"GPTModel": KVCacheGPTModel}
    modules["llms_from_scratch.kv_cache.generate"] = {"generate_text_simple": kv_generate_text_simple}
    for name, objects in modules.items():
        sys.modules[name] = _module(name, objects)
    for name in modules:
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, sys.modules[name])


install()


@pytest.fixture
def tmp_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pytest's fresh folder, already holding the working directory's the-verdict.txt: the book's
    ch05 and appendix-D tests download it into tmp_path unless it is there, and we run offline."""
    folder = tmp_path_factory.mktemp("book")
    verdict = Path.cwd() / "the-verdict.txt"
    if verdict.is_file():
        shutil.copy(verdict, folder / verdict.name)
    return folder


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Fail the session if any of the book's own modules (other than its test files) got imported."""
    stray = sorted(
        name
        for name, module in list(sys.modules.items())
        if "/llms_from_scratch/" in (getattr(module, "__file__", None) or "").replace("\\", "/")
        and "/llms_from_scratch/tests/" not in module.__file__.replace("\\", "/")
    )
    if stray:
        sys.stderr.write(f"book_shim: the book's own modules were imported: {', '.join(stray)}\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
