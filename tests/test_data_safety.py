"""The data path under hostile conditions (issue 25): texts replaced while read, shared cache entries
written to, runs that keep only a reference to their text, binary or interrupted stdin, signals and
dead processes' temporary files, FIFOs in the cache, and a full disk."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import FAST, assert_usage_error, cli_env, invoke, set_flags
from minigpt_cli import batches
from minigpt_cli import corpus as corpus_module
from minigpt_cli.config import UserError
from minigpt_cli.tokenizer import CharTokenizer

TEXT = "to be or not to be\n" * 100


def write(tmp_path: Path, text: str = TEXT, name: str = "text.txt") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def all_ids(corpus: corpus_module.Corpus) -> np.ndarray:
    return np.concatenate([corpus.train, corpus.val])


def cache_files(tmp_path: Path, pattern: str = "*") -> list[Path]:
    folder = tmp_path / "cache"
    return sorted(folder.glob(pattern)) if folder.is_dir() else []


# -- item 3: the cache entry named for a text holds that text's ids ----------------------------------

@pytest.mark.parametrize("given_vocabulary", [False, True])
def test_a_text_replaced_between_the_passes_is_never_cached_under_the_old_fingerprint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given_vocabulary: bool):
    path = write(tmp_path, "abcdefgh\n" * 100)
    replacement = tmp_path / "new.txt"
    replacement.write_text("hgfedcba\n" * 100, encoding="utf-8")  # same size, same characters
    old_sha = hashlib.sha256(path.read_bytes()).hexdigest()
    hash_first = corpus_module.fingerprint_text

    def hash_then_replace(*args, **kwargs):
        fingerprint = hash_first(*args, **kwargs)
        os.replace(replacement, path)  # `mv new.txt text.txt` between the hashing and the encoding
        return fingerprint

    monkeypatch.setattr(corpus_module, "fingerprint_text", hash_then_replace)
    tokenizer = CharTokenizer("abcdefgh\n") if given_vocabulary else None
    with pytest.raises(UserError, match="changed while minigpt read it"):
        corpus_module.load_corpus(path, 0.1, tokenizer)
    assert not cache_files(tmp_path, f"{old_sha[:32]}*.npy")
    assert not cache_files(tmp_path, ".encoding-*")


# -- item 4: shared entries are read-only, and ids are checked where they are read -------------------

def test_cache_entries_and_the_runs_linked_copy_are_read_only(tmp_path: Path):
    corpus = corpus_module.load_corpus(write(tmp_path), 0.1)
    assert corpus.ids_path.stat().st_mode & 0o777 == 0o444
    run = tmp_path / "run"
    run.mkdir()
    assert "read-only hard link" in corpus_module.keep_in_run(run, corpus)
    assert (run / corpus_module.RUN_IDS).stat().st_mode & 0o777 == 0o444


def test_a_copy_in_the_run_is_read_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    corpus = corpus_module.load_corpus(write(tmp_path), 0.1)
    monkeypatch.setattr(os, "link", exdev)
    run = tmp_path / "run"
    run.mkdir()
    assert "read-only copy" in corpus_module.keep_in_run(run, corpus)
    assert (run / corpus_module.RUN_IDS).stat().st_mode & 0o777 == 0o444


def test_an_id_past_the_vocabulary_in_a_batch_is_a_damaged_file_not_an_index_error():
    ids = np.arange(100, dtype=np.uint8) % 10
    ids[50] = 255
    with pytest.raises(UserError, match="damaged.*id 255.*vocabulary of 10"):
        batches.get_batch(ids, np.array([40]), 16, vocab_size=10)
    batches.get_batch(ids, np.array([0]), 16, vocab_size=10)  # windows that miss it are read


def test_training_on_ids_written_past_the_vocabulary_exits_2(tmp_path: Path, small_corpus: Path,
                                                            monkeypatch: pytest.MonkeyPatch):
    """A byte of 255 written into a live run's data.npy killed training with an IndexError traceback."""
    from minigpt_cli import trainer

    load = trainer.load_corpus

    def damaged(*args, **kwargs):
        corpus = load(*args, **kwargs)
        corpus.train = np.array(corpus.train)
        corpus.train[::50] = 255
        return corpus

    monkeypatch.setattr(trainer, "load_corpus", damaged)
    result = invoke("train", "tiny", "--data", small_corpus, "--out", "run", *set_flags(*FAST, "train.max_iters=2"))
    assert result.exit_code == 2, result.stderr
    errors = [line for line in result.error_lines if line.startswith("error:")]
    assert len(errors) == 1 and "damaged" in errors[0] and "id 255" in errors[0], result.stderr


# -- item 5: runs that keep only a reference to their text ------------------------------------------

def exdev(*args, **kwargs):
    raise OSError(errno.EXDEV, "Invalid cross-device link")


def test_a_run_that_refers_to_its_text_is_read_from_it_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = write(tmp_path)
    corpus = corpus_module.load_corpus(path, 0.1)
    monkeypatch.setattr(os, "link", exdev)
    run = tmp_path / "run"
    run.mkdir()
    kept = corpus_module.keep_in_run(run, corpus, copy_max_bytes=100)
    assert f"refers to {path}" in kept and "cannot be linked" in kept and "Invalid cross-device link" in kept
    assert corpus_module.run_copy(run) == run / corpus_module.RUN_IDS
    again = corpus_module.load_corpus(corpus_module.run_copy(run), 0.1, corpus.tokenizer)
    assert np.array_equal(all_ids(again), all_ids(corpus)) and again.fingerprint == corpus.fingerprint
    path.write_text(TEXT.replace("be", "eb"), encoding="utf-8")
    with pytest.raises(UserError, match=r"refers to .*text\.txt, which has changed since"):
        corpus_module.load_corpus(corpus_module.run_copy(run), 0.1)
    path.unlink()
    with pytest.raises(UserError, match=r"refers to .*text\.txt, which is gone"):
        corpus_module.load_corpus(corpus_module.run_copy(run), 0.1)


def test_a_small_text_under_an_unwritable_cache_is_copied_into_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """With a cache that cannot be written, a 20 KB text got 'too large to copy and not linkable'."""
    (tmp_path / "file").write_text("", encoding="utf-8")
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "file" / "cache"))  # under a file: never a folder
    corpus = corpus_module.load_corpus(write(tmp_path), 0.1)
    assert corpus.ids_path is None and "not cached" in corpus.cache
    run = tmp_path / "run"
    run.mkdir()
    kept = corpus_module.keep_in_run(run, corpus)
    assert "too large" not in kept and "copy" in kept
    again = corpus_module.load_corpus(run / corpus_module.RUN_IDS, 0.1)
    assert again.cache == "run" and np.array_equal(all_ids(again), all_ids(corpus))


def test_cli_eval_and_resume_a_run_that_refers_to_its_text(tmp_path: Path, small_corpus: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    """`eval RUN` and `train --resume` failed with 'RUN/data.npy is damaged' for such a run."""
    monkeypatch.setattr(os, "link", exdev)
    monkeypatch.setattr(corpus_module, "RUN_COPY_MAX_BYTES", 100)
    text = tmp_path / "corpus.txt"
    shutil.copyfile(small_corpus, text)
    trained = invoke("train", "tiny", "--data", text, "--out", "run", *set_flags(*FAST, "train.max_iters=2"))
    assert trained.exit_code == 0, trained.stderr
    assert f"refers to {text}" in trained.stderr
    evaluated = invoke("eval", "run", "--json")
    assert evaluated.exit_code == 0, evaluated.stderr
    resumed = invoke("train", "--resume", "--out", "run", "--set", "train.max_iters=3")
    assert resumed.exit_code == 0, resumed.stderr
    text.write_text(small_corpus.read_text(encoding="utf-8")[:-10], encoding="utf-8")
    assert_usage_error(invoke("eval", "run"), "has changed since")


# -- item 6: stdin is checked as it is copied, and the copy never outlives the command ---------------

class Pipe:
    """A stdin that is not a terminal, over bytes, counting what was read."""

    def __init__(self, raw: bytes, interrupt_after: int | None = None):
        self.buffer = io.BytesIO(raw)
        reads = [0]
        read = self.buffer.read

        def counted(n: int = -1) -> bytes:
            reads[0] += 1
            if interrupt_after is not None and reads[0] > interrupt_after:
                raise KeyboardInterrupt
            return read(n)

        self.buffer.read = counted

    def isatty(self) -> bool:
        return False


def test_binary_stdin_stops_at_its_first_invalid_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(corpus_module, "CHUNK_BYTES", 16)
    pipe = Pipe(b"valid text " + b"\xff" + b"x" * 10_000)
    monkeypatch.setattr(sys, "stdin", pipe)
    with pytest.raises(UserError, match=r"stdin is not valid UTF-8: byte 0xff at offset 11"):
        corpus_module.load_corpus("-", 0.1)
    assert pipe.buffer.tell() < 100  # not the rest of it
    assert not cache_files(tmp_path, ".stdin-*")


def test_stdin_interrupted_while_copied_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(corpus_module, "CHUNK_BYTES", 16)
    monkeypatch.setattr(sys, "stdin", Pipe(TEXT.encode(), interrupt_after=3))
    with pytest.raises(KeyboardInterrupt):
        corpus_module.load_corpus("-", 0.1)
    assert (tmp_path / "cache").is_dir() and not cache_files(tmp_path, ".stdin-*")


# -- item 7: SIGTERM while encoding, and the files of processes that died -----------------------------

SIGTERM_WHILE_ENCODING = """
import os, signal, sys
from minigpt_cli import corpus
encode = corpus._Encoder.__call__
def terminated(self, text):
    os.kill(os.getpid(), signal.SIGTERM)
    return encode(self, text)
corpus._Encoder.__call__ = terminated
sys.argv = ["minigpt", *sys.argv[1:]]
from minigpt_cli.cli import main
main()
"""


def test_sigterm_while_encoding_leaves_no_temporary_file_and_no_run_folder(tmp_path: Path):
    path = write(tmp_path)
    result = subprocess.run([sys.executable, "-c", SIGTERM_WHILE_ENCODING, "train", "tiny", "--data", str(path),
                             "--out", str(tmp_path / "run"), *set_flags(*FAST)],
                            capture_output=True, text=True, env=cli_env(tmp_path / "cache"), timeout=120)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert "Traceback" not in result.stderr
    assert not cache_files(tmp_path, ".encoding-*")
    assert not (tmp_path / "run").exists()


def test_the_next_load_removes_temporary_files_of_dead_processes(tmp_path: Path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    folder = tmp_path / "cache"
    folder.mkdir()
    stale = [folder / f".encoding-{pid}-abc123.npy", folder / f".stdin-{pid}-x_y.txt"]
    live = [folder / f".encoding-{os.getpid()}-abc123.npy", folder / "notes.txt", folder / f".encoding-{pid}.npy"]
    for file in stale + live:
        file.write_bytes(b"partial")
    corpus_module.load_corpus(write(tmp_path), 0.1)
    assert not any(f.exists() for f in stale)
    assert all(f.exists() for f in live)


# -- item 9: a FIFO in the cache is not waited on -----------------------------------------------------

def test_fifos_in_place_of_cache_files_are_cache_misses(tmp_path: Path):
    path = write(tmp_path)
    corpus_module.load_corpus(path, 0.1)
    entries = cache_files(tmp_path, "*.npy") + cache_files(tmp_path, "*.json")
    assert len(entries) == 2
    for entry in entries:
        entry.unlink()
        os.mkfifo(entry)
    code = f"from minigpt_cli import corpus; print(corpus.load_corpus({str(path)!r}, 0.1).cache)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=cli_env(tmp_path / "cache"), timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "encoded"
    assert all(entry.is_file() for entry in entries)  # the FIFOs replaced by the entries


def test_a_fifo_as_a_runs_copy_is_a_clear_error(tmp_path: Path):
    corpus = corpus_module.load_corpus(write(tmp_path), 0.1)
    run = tmp_path / "run"
    run.mkdir()
    corpus_module.keep_in_run(run, corpus)
    (run / corpus_module.RUN_IDS).unlink()
    os.mkfifo(run / corpus_module.RUN_IDS)
    code = (f"from minigpt_cli import corpus\ntry: corpus.load_corpus({str(run / corpus_module.RUN_IDS)!r}, 0.1)\n"
            f"except corpus.UserError as exc: print(exc)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=cli_env(tmp_path / "cache"), timeout=60)
    assert result.returncode == 0, result.stderr
    assert "data.npy is damaged" in result.stdout


# -- item 11b: a full disk while encoding ----------------------------------------------------------

def full_disk_in(folder: Path):
    encode = corpus_module._encode_to

    def encode_to(path: Path, *args, **kwargs):
        if path.parent == folder:
            encode(path, *args, **kwargs)  # a partial file is left for the caller to remove
            raise OSError(errno.ENOSPC, "No space left on device")
        return encode(path, *args, **kwargs)

    return encode_to


def test_a_full_cache_disk_encodes_without_caching(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(corpus_module, "_encode_to", full_disk_in(tmp_path / "cache"))
    corpus = corpus_module.load_corpus(write(tmp_path), 0.1)
    assert "not cached" in corpus.cache and "No space left on device" in corpus.cache
    assert corpus.tokenizer.decode(all_ids(corpus).tolist()) == TEXT
    assert not cache_files(tmp_path, "*.npy") and not cache_files(tmp_path, ".encoding-*")


def test_a_full_disk_everywhere_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(corpus_module, "_encode_to", no_space)
    result = invoke("train", "tiny", "--data", write(tmp_path), "--out", "run", *set_flags(*FAST))
    assert_usage_error(result, "cannot write the encoded text", "No space left on device")
    assert not cache_files(tmp_path, ".encoding-*") and not (tmp_path / "run").exists()
