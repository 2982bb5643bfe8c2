"""Specification of corpus resolution: registry names, local paths, checksums, offline use."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gptexp.corpus import (
    DOC_SEPARATOR,
    Corpus,
    default_data_dir,
    load_corpus,
    load_registry,
    resolve_registry_file,
    sha256_text,
)
from gptexp.errors import CorpusError

from conftest import TINY, cli_env

REPO = Path(__file__).resolve().parents[1]
VERDICT_SHA256 = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"
VERDICT_URL = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt"


def _find_real_verdict_folder() -> Path | None:
    # Read once at import, before the autouse fixture below clears the variable for each test.
    for folder in (os.environ.get("GPTEXP_DATA_MIRROR"), Path(__file__).resolve().parents[2] / "shared" / "data"):
        if folder and (Path(folder) / "the-verdict.txt").is_file():
            return Path(folder)
    return None


REAL_VERDICT_FOLDER = _find_real_verdict_folder()


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPTEXP_DATA_MIRROR", raising=False)
    monkeypatch.delenv("GPTEXP_DATA_DIR", raising=False)


@pytest.fixture
def verdict_mirror() -> Path:
    if REAL_VERDICT_FOLDER is None:
        pytest.skip("the-verdict.txt not found in $GPTEXP_DATA_MIRROR or ../shared/data next to the repo")
    return REAL_VERDICT_FOLDER


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """An empty data dir with the repo's real registry."""
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(REPO / "data" / "registry.yaml", folder / "registry.yaml")
    return folder


def write_registry(data_dir: Path, url: str, sha256: str, file: str = "doc.txt", name: str = "doc") -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    entry = {"file": file, "url": url, "sha256": sha256, "licence": "test", "description": "test"}
    (data_dir / "registry.yaml").write_text(yaml.safe_dump({name: entry}), encoding="utf-8")


def point_url_at(data_dir: Path, url: str) -> None:
    """Keep the real registry but make its download go somewhere local."""
    path = data_dir / "registry.yaml"
    registry = yaml.safe_load(path.read_text(encoding="utf-8"))
    registry["the-verdict"]["url"] = url
    path.write_text(yaml.safe_dump(registry), encoding="utf-8")


@pytest.fixture
def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/x.txt"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on loopback, and its base URL."""
    root = tmp_path / "served"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def raw_contents(data_dir: Path) -> list[str]:
    raw = data_dir / "raw"
    return sorted(p.name for p in raw.iterdir()) if raw.exists() else []


def assert_one_line(error: pytest.ExceptionInfo[CorpusError]) -> str:
    message = str(error.value)
    assert "\n" not in message and message.strip()
    return message


# --- the registry ---------------------------------------------------------------------------------


def test_registry_lists_the_verdict_with_its_checksum_url_and_licence() -> None:
    entry = load_registry(REPO / "data")["the-verdict"]
    assert entry.file == "the-verdict.txt"
    assert entry.sha256 == VERDICT_SHA256
    assert entry.url == VERDICT_URL
    assert "public domain" in entry.licence.lower() and "Wharton" in entry.licence


def test_default_data_dir_is_the_repo_data_folder_unless_overridden(monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_data_dir() == REPO / "data"
    monkeypatch.setenv("GPTEXP_DATA_DIR", "/somewhere/else")
    assert default_data_dir() == Path("/somewhere/else")


def test_a_missing_registry_is_an_error_naming_its_path(tmp_path: Path) -> None:
    with pytest.raises(CorpusError) as error:
        load_registry(tmp_path)
    assert str(tmp_path / "registry.yaml") in assert_one_line(error)


def test_an_invalid_registry_is_an_error_naming_its_path(tmp_path: Path) -> None:
    (tmp_path / "registry.yaml").write_text("the-verdict: [unclosed\n", encoding="utf-8")
    with pytest.raises(CorpusError) as error:
        load_registry(tmp_path)
    assert str(tmp_path / "registry.yaml") in assert_one_line(error)


def test_a_registry_file_name_cannot_escape_data_raw(tmp_path: Path) -> None:
    write_registry(tmp_path, "http://127.0.0.1/x", "0" * 64, file="../../etc/passwd")
    with pytest.raises(CorpusError, match="bare file name"):
        load_registry(tmp_path)


# --- named corpora: raw/, mirror, download --------------------------------------------------------


def test_the_verdict_comes_from_the_mirror_once_then_from_raw(
    data_dir: Path, verdict_mirror: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPTEXP_DATA_MIRROR", str(verdict_mirror))
    corpus = load_corpus("the-verdict", data_dir)
    assert len(corpus.text) == 20479
    assert corpus.sha256 == VERDICT_SHA256
    assert corpus.name == "the-verdict"
    assert corpus.files == (data_dir / "raw" / "the-verdict.txt",)
    assert raw_contents(data_dir) == ["the-verdict.txt"]

    monkeypatch.delenv("GPTEXP_DATA_MIRROR")
    again = load_corpus("the-verdict", data_dir, download=False)
    assert again == corpus


def test_the_mirror_argument_overrides_the_variable(
    data_dir: Path, verdict_mirror: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPTEXP_DATA_MIRROR", str(tmp_path / "nowhere"))
    path = resolve_registry_file("the-verdict", data_dir, mirror=str(verdict_mirror), download=False)
    assert path == data_dir / "raw" / "the-verdict.txt"


def test_a_mirror_file_with_wrong_content_is_refused_and_nothing_is_written(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "the-verdict.txt").write_text("not the story", encoding="utf-8")
    monkeypatch.setenv("GPTEXP_DATA_MIRROR", str(mirror))
    with pytest.raises(CorpusError) as error:
        load_corpus("the-verdict", data_dir)
    message = assert_one_line(error)
    assert VERDICT_SHA256 in message and sha256_text("not the story") in message
    assert raw_contents(data_dir) == []


def test_a_corrupted_file_in_raw_is_replaced_from_the_mirror(
    data_dir: Path, verdict_mirror: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (data_dir / "raw").mkdir()
    (data_dir / "raw" / "the-verdict.txt").write_text("corrupted", encoding="utf-8")
    monkeypatch.setenv("GPTEXP_DATA_MIRROR", str(verdict_mirror))
    assert load_corpus("the-verdict", data_dir).sha256 == VERDICT_SHA256
    assert raw_contents(data_dir) == ["the-verdict.txt"]


def test_a_corrupted_file_in_raw_is_not_used_without_a_mirror(data_dir: Path, closed_port_url: str) -> None:
    point_url_at(data_dir, closed_port_url)
    target = data_dir / "raw" / "the-verdict.txt"
    target.parent.mkdir()
    target.write_text("corrupted", encoding="utf-8")
    with pytest.raises(CorpusError) as error:
        load_corpus("the-verdict", data_dir)
    message = assert_one_line(error)
    assert str(target) in message and "delete it" in message
    assert VERDICT_SHA256 in message and sha256_text("corrupted") in message


def test_offline_without_a_copy_says_where_to_put_the_file_in_one_line(data_dir: Path, closed_port_url: str) -> None:
    point_url_at(data_dir, closed_port_url)
    with pytest.raises(CorpusError) as error:
        load_corpus("the-verdict", data_dir, timeout=5)
    message = assert_one_line(error)
    assert "GPTEXP_DATA_MIRROR" in message
    assert str(data_dir / "raw" / "the-verdict.txt") in message
    assert closed_port_url in message
    assert raw_contents(data_dir) == []


def test_a_download_lands_in_raw_with_the_right_checksum(data_dir: Path, served: tuple[Path, str]) -> None:
    root, base = served
    content = "A story served over HTTP.\n" * 100
    (root / "doc.txt").write_text(content, encoding="utf-8")
    write_registry(data_dir, f"{base}/doc.txt", sha256_text(content))
    corpus = load_corpus("doc", data_dir)
    assert corpus.text == content
    assert raw_contents(data_dir) == ["doc.txt"]
    assert hashlib.sha256((data_dir / "raw" / "doc.txt").read_bytes()).hexdigest() == sha256_text(content)


def test_a_download_with_the_wrong_checksum_is_refused_and_leaves_nothing(
    data_dir: Path, served: tuple[Path, str]
) -> None:
    root, base = served
    (root / "doc.txt").write_text("tampered", encoding="utf-8")
    write_registry(data_dir, f"{base}/doc.txt", sha256_text("the real thing"))
    with pytest.raises(CorpusError) as error:
        load_corpus("doc", data_dir)
    message = assert_one_line(error)
    assert sha256_text("tampered") in message
    assert "not available offline" not in message  # CorpusError is a ValueError: not re-wrapped as a failed download
    assert raw_contents(data_dir) == []


def test_a_name_that_is_neither_a_path_nor_registered_lists_the_known_names(data_dir: Path) -> None:
    with pytest.raises(CorpusError) as error:
        load_corpus("the-verdikt", data_dir)
    message = assert_one_line(error)
    assert "the-verdict" in message and "neither an existing file or directory" in message


# --- paths ----------------------------------------------------------------------------------------


def test_an_existing_path_wins_over_a_registry_name(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "the-verdict").write_text("my own verdict", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    corpus = load_corpus("the-verdict", data_dir)
    assert corpus.text == "my own verdict"
    assert raw_contents(data_dir) == []


def test_a_text_file_is_read_as_is(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("héllo wörld\n", encoding="utf-8")
    assert load_corpus(path) == Corpus(str(path), "héllo wörld\n", sha256_text("héllo wörld\n"), (path,))


def test_a_file_given_explicitly_may_have_any_extension(tmp_path: Path) -> None:
    path = tmp_path / "README.md"
    path.write_text("# Title\n", encoding="utf-8")
    assert load_corpus(path).text == "# Title\n"


def test_a_directory_joins_its_txt_files_in_name_order_with_endoftext(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "skip.md").write_text("not text", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("nested", encoding="utf-8")
    corpus = load_corpus(tmp_path)
    assert DOC_SEPARATOR == "<|endoftext|>"
    assert corpus.text == "first<|endoftext|>second"
    assert corpus.files == (tmp_path / "a.txt", tmp_path / "b.txt")
    assert corpus.sha256 == sha256_text("first<|endoftext|>second")


@pytest.mark.parametrize("content", [b"", b"  \n\t \n"], ids=["empty", "whitespace"])
def test_an_empty_file_is_an_error_naming_it(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(CorpusError) as error:
        load_corpus(path)
    assert str(path) in assert_one_line(error)


def test_a_non_utf8_file_is_an_error_naming_it_and_the_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin.txt"
    path.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(CorpusError) as error:
        load_corpus(path)
    message = assert_one_line(error)
    assert str(path) in message and "UTF-8" in message and "offset 0" in message


def test_a_missing_path_is_an_error(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CorpusError) as error:
        load_corpus(tmp_path / "missing.txt", data_dir)
    assert "missing.txt" in assert_one_line(error)


def test_a_directory_without_txt_files_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("text", encoding="utf-8")
    with pytest.raises(CorpusError) as error:
        load_corpus(tmp_path)
    assert str(tmp_path) in assert_one_line(error)


# --- unbounded and blocking inputs ----------------------------------------------------------------


def load_with_hang_guard(path: Path) -> Corpus | CorpusError:
    """load_corpus(path), but a reader stuck opening a FIFO is released (and reported) instead of hanging."""
    outcome: list[Corpus | CorpusError] = []

    def load() -> None:
        try:
            outcome.append(load_corpus(path))
        except CorpusError as e:
            outcome.append(e)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout=60)
    if thread.is_alive():
        # It is blocked in open(): a writer that comes and goes lets it see end of file.
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        thread.join()
        pytest.fail(f"load_corpus opened the FIFO {path} and blocked")
    return outcome[0]


def test_a_fifo_is_refused_without_being_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "corpus.txt"
    os.mkfifo(fifo)
    outcome = load_with_hang_guard(fifo)
    assert isinstance(outcome, CorpusError)
    message = " ".join(outcome.args)
    assert "\n" not in message and f"corpus file {fifo} is a FIFO" in message and "regular files" in message


@pytest.mark.parametrize("link", [False, True], ids=["device", "symlink-to-device"])
def test_dev_zero_is_refused_before_any_byte_is_read(tmp_path: Path, link: bool) -> None:
    path = Path("/dev/zero")
    if link:
        path = tmp_path / "zeros.txt"
        path.symlink_to("/dev/zero")
    with pytest.raises(CorpusError) as error:
        load_corpus(path)
    assert f"corpus file {path} is a character device" in assert_one_line(error)


def test_a_fifo_in_a_corpus_folder_is_refused_not_skipped(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    os.mkfifo(tmp_path / "b.txt")
    outcome = load_with_hang_guard(tmp_path)
    assert isinstance(outcome, CorpusError) and "b.txt" in str(outcome) and "a FIFO" in str(outcome)


def test_a_file_over_the_size_limit_is_refused_with_the_limit_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPTEXP_MAX_CORPUS_BYTES", "1000")
    path = tmp_path / "big.txt"
    path.write_text("x" * 1001, encoding="utf-8")
    with pytest.raises(CorpusError) as error:
        load_corpus(path)
    message = assert_one_line(error)
    assert str(path) in message and "1,000 bytes limit" in message and "GPTEXP_MAX_CORPUS_BYTES" in message
    path.write_text("x" * 1000, encoding="utf-8")
    assert len(load_corpus(path).text) == 1000  # the limit itself is allowed


def test_the_size_limit_applies_to_a_folders_files_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPTEXP_MAX_CORPUS_BYTES", "1000")
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("x" * 600, encoding="utf-8")
    with pytest.raises(CorpusError) as error:
        load_corpus(tmp_path)
    message = assert_one_line(error)
    assert f"the .txt files of corpus folder {tmp_path}" in message and "1,000 bytes limit" in message


def test_a_folder_where_the_registry_file_belongs_is_refused(
    data_dir: Path, verdict_mirror: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (data_dir / "raw" / "the-verdict.txt").mkdir(parents=True)
    monkeypatch.setenv("GPTEXP_DATA_MIRROR", str(verdict_mirror))
    with pytest.raises(CorpusError) as error:
        load_corpus("the-verdict", data_dir)
    assert "the-verdict.txt is a directory" in assert_one_line(error)


def test_a_fifo_as_data_source_is_one_line_exit_2_from_the_cli(tmp_path: Path) -> None:
    fifo = tmp_path / "corpus.txt"
    os.mkfifo(fifo)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "gptexp.cli", "train", "--config", str(TINY), "--set", f"data.source={fifo}"],
            capture_output=True,
            text=True,
            timeout=300,
            env=cli_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/m.db"),
        )
    except subprocess.TimeoutExpired:
        pytest.fail("gptexp train blocked on the FIFO")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"gptexp: error: corpus file {fifo} is a FIFO: only regular files (and folders of .txt files) are corpora; "
        "give a text file"
    ]
