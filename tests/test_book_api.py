"""Book code runs on gptexp: the book's own tests through a module shim, and the book's behaviours
that code relies on (ordinary tensors, dataset attributes, empty loaders, ValueErrors)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

import gptexp
from gptexp.config import ConfigError
from gptexp.errors import CorpusError

from conftest import REPO, SMALL_CFG, cli_env

# The book's test files for the chapters gptexp covers: data (ch02), model (ch04), generation,
# pretraining (ch05) and appendix D's training loop. The ch05 and appendix-D ones train the 124M
# model at context 256 on one window (about two minutes on two cores).
BOOK_TEST_FILES = ("test_ch02.py", "test_ch04.py", "test_generate.py", "test_ch05.py", "test_appendix_d.py")


def book_tests_dir() -> Path:
    spec = importlib.util.find_spec("llms_from_scratch")  # locates the package without running it
    return Path(next(iter(spec.submodule_search_locations))) / "tests"


def test_the_books_own_ch02_ch04_ch05_appendix_d_and_generation_tests_pass_unmodified_through_the_shim(
    tmp_path, verdict_path
):
    # The book's ch02 test reads the-verdict.txt from the working directory (else downloads it).
    (tmp_path / "the-verdict.txt").write_bytes(verdict_path.read_bytes())
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # not this repo's pytest settings
    report = tmp_path / "junit.xml"
    files = [str(book_tests_dir() / name) for name in BOOK_TEST_FILES]
    # Nothing is written beside the book's files: no bytecode, no pytest cache.
    env = cli_env(PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]), PYTHONDONTWRITEBYTECODE=1)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "book_shim",
            "-p",
            "no:cacheprovider",
            "-c",
            "pytest.ini",
            f"--rootdir={book_tests_dir()}",
            "-q",
            f"--junitxml={report}",
            *files,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    suite = ET.parse(report).getroot().find("testsuite")
    counts = {k: int(suite.get(k)) for k in ("tests", "failures", "errors", "skipped")}
    assert counts == {"tests": 11, "failures": 0, "errors": 0, "skipped": 0}, counts
    ran = {case.get("classname").split(".")[-1] for case in suite.iter("testcase")}
    assert ran == {Path(f).stem for f in BOOK_TEST_FILES}


# --- GPTModelFast ---------------------------------------------------------------------------------


def test_gpt_model_fast_is_the_fast_impl_with_gpt_models_keys_and_seeded_weights():
    torch.manual_seed(123)
    fast = gptexp.GPTModelFast(SMALL_CFG)
    torch.manual_seed(123)
    reference = gptexp.GPTModel(dict(SMALL_CFG, impl="fast"))
    assert fast.impl == "fast" and isinstance(fast, gptexp.GPTModel)
    ours, theirs = fast.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_gpt_model_fast_seeded_init_and_logits_equal_the_books_gpt_model_fast():
    from llms_from_scratch.ch04 import GPTModelFast as BookFast

    torch.manual_seed(123)
    ours = gptexp.GPTModelFast(SMALL_CFG).eval()
    torch.manual_seed(123)
    theirs = BookFast(SMALL_CFG).eval()
    # The book's fused qkv rows are our three projections, in order.
    for i, block in enumerate(ours.trf_blocks):
        att = block.att
        fused = torch.cat([att.W_query.weight, att.W_key.weight, att.W_value.weight])
        assert torch.equal(fused, theirs.trf_blocks[i].att.qkv.weight)
        assert torch.equal(att.out_proj.weight, theirs.trf_blocks[i].att.proj.weight)
    idx = torch.tensor([[6109, 3626, 6100, 345]])
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs(idx), rtol=0, atol=1e-5)


def test_gpt_model_fast_refuses_impl_book():
    with pytest.raises(ValueError, match="GPTModelFast is impl 'fast'"):
        gptexp.GPTModelFast(dict(SMALL_CFG, impl="book"))


# --- generation returns ordinary tensors -----------------------------------------------------------


@pytest.mark.parametrize("use_cache", [True, False])
def test_generated_ids_are_ordinary_tensors_that_can_be_written_and_trained_on_as_the_books(book, use_cache):
    torch.manual_seed(123)
    model = gptexp.GPTModel(SMALL_CFG).eval()
    torch.manual_seed(123)
    theirs = book.GPTModel(SMALL_CFG).eval()
    idx = torch.tensor([[6109, 3626, 6100, 345]])
    out = gptexp.generate(model, idx, 6, SMALL_CFG["context_length"], use_cache=use_cache)
    simple = gptexp.generate_text_simple(model, idx, 6, SMALL_CFG["context_length"])
    want = book.generate(theirs, idx, 6, SMALL_CFG["context_length"])
    for ids in (out, simple):
        assert not ids.is_inference() and not want.is_inference()
        assert torch.equal(ids, want)
        model.train()
        gptexp.calc_loss_batch(ids[:, :-1], ids[:, 1:], model, "cpu").backward()  # training on samples
        ids[0, -1] = 0  # written in place
        assert ids[0, -1] == 0


# --- GPTDatasetV1 ------------------------------------------------------------------------------


def test_input_ids_and_target_ids_are_the_books_per_window_tensors(book, tokenizer, verdict_text):
    ours = gptexp.GPTDatasetV1(verdict_text, tokenizer, 16, 8)
    theirs = book.GPTDatasetV1(verdict_text, tokenizer, 16, 8)
    assert len(ours.input_ids) == len(ours.target_ids) == len(theirs.input_ids) == len(ours)
    for mine, book_ids in ((ours.input_ids, theirs.input_ids), (ours.target_ids, theirs.target_ids)):
        for i in (0, 1, len(ours) - 1, -1):
            assert mine[i].dtype == book_ids[i].dtype == torch.int64
            assert torch.equal(mine[i], book_ids[i]), i
        assert all(torch.equal(a, b) for a, b in zip(mine[2:5], book_ids[2:5], strict=True))
        assert sum(1 for _ in mine) == len(book_ids)
    assert ours.token_ids.nbytes == 2 * 5145  # still one flat array, nothing stored per window


def test_an_items_input_and_target_do_not_alias_each_other_or_the_dataset(book, tokenizer, verdict_text):
    ours = gptexp.GPTDatasetV1(verdict_text, tokenizer, 8, 4)
    theirs = book.GPTDatasetV1(verdict_text, tokenizer, 8, 4)
    x, y = ours[3]
    _, book_y = theirs[3]
    x.fill_(-1)  # an in-place edit of the input, e.g. masking tokens
    assert torch.equal(y, book_y)
    y.fill_(-2)
    assert torch.equal(ours[3][0], theirs[3][0]) and torch.equal(ours[3][1], book_y)
    assert torch.equal(ours.input_ids[3], theirs.input_ids[3])


class WordTokenizer:
    """A chapter-2 style tokenizer: a vocabulary of words and `encode`, nothing else (no n_vocab)."""

    def __init__(self, text: str, first_id: int = 0):
        words = sorted(set(re.findall(r"\w+|[^\w\s]", text)))
        self.vocab = {w: first_id + i for i, w in enumerate(words)}

    def encode(self, text, allowed_special=frozenset()):
        return [self.vocab[w] for w in re.findall(r"\w+|[^\w\s]", text)]


def test_a_tokenizer_with_only_encode_gives_the_books_windows(book, verdict_text):
    words = WordTokenizer(verdict_text)
    ours = gptexp.GPTDatasetV1(verdict_text, words, 12, 5)
    theirs = book.GPTDatasetV1(verdict_text, words, 12, 5)
    assert len(ours) == len(theirs) > 0
    assert ours.token_ids.dtype == np.uint16  # inferred from the largest id
    assert all(
        torch.equal(ours[i][0], theirs[i][0]) and torch.equal(ours[i][1], theirs[i][1]) for i in range(len(theirs))
    )


def test_token_ids_beyond_uint16_keep_their_values_without_n_vocab(verdict_text):
    words = WordTokenizer(verdict_text, first_id=70_000)
    ds = gptexp.GPTDatasetV1(verdict_text, words, 12, 5)
    assert ds.token_ids.dtype == np.uint32
    assert ds[0][0].tolist() == words.encode(verdict_text)[:12]


def test_an_encode_that_takes_only_the_text_works_too(verdict_text):
    class TextOnly(WordTokenizer):
        def encode(self, text):  # the book's chapter-2 SimpleTokenizer signature
            return super().encode(text)

    words = TextOnly(verdict_text)
    ds = gptexp.GPTDatasetV1(verdict_text, words, 12, 5)
    assert ds[1][0].tolist() == words.encode(verdict_text)[5:17]


# --- empty loaders and the errors that replace NaN ---------------------------------------------


def test_a_split_shorter_than_one_window_gives_an_empty_loader_as_the_books(book, verdict_text):
    _, val_text = gptexp.split_text(verdict_text, 0.9)  # 2,048 characters: fewer tokens than 1,024 + 1
    kwargs = dict(batch_size=2, max_length=1024, stride=1024, drop_last=False, shuffle=False, num_workers=0)
    ours, theirs = gptexp.create_dataloader_v1(val_text, **kwargs), book.create_dataloader_v1(val_text, **kwargs)
    assert len(ours) == len(theirs) == 0
    assert list(ours) == list(theirs) == []
    model = gptexp.GPTModel(dict(SMALL_CFG, context_length=1024))
    assert np.isnan(book.calc_loss_loader(theirs, model, "cpu"))
    with pytest.raises(ValueError) as err:  # where the book returns NaN, a clear error
        gptexp.calc_loss_loader(ours, model, "cpu")
    assert isinstance(err.value, CorpusError)
    message = str(err.value)
    assert "empty" in message and "0 window(s) of 1024 tokens" in message and "\n" not in message


def test_a_shuffled_empty_loader_fails_as_the_books_does(book):
    with pytest.raises(ValueError) as theirs:
        book.create_dataloader_v1("too short", max_length=16, stride=16, shuffle=True)
    with pytest.raises(ValueError) as ours:
        gptexp.create_dataloader_v1("too short", max_length=16, stride=16, shuffle=True)
    assert str(ours.value) == str(theirs.value)


def test_errors_for_bad_values_are_value_errors_so_book_code_catches_them():
    assert issubclass(CorpusError, ValueError) and issubclass(ConfigError, ValueError)
    model = gptexp.GPTModel(SMALL_CFG)
    try:
        gptexp.calc_loss_loader([], model, "cpu")
    except ValueError as exc:  # how code written against the book guards its data
        assert "empty" in str(exc)
    else:
        pytest.fail("an empty loader was accepted")
