"""Reading text (file, folder, stdin), the encoded cache, and reproducible batches."""

from __future__ import annotations

import hashlib
import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FAST, assert_usage_error, invoke, set_flags
from minigpt_cli import batches
from minigpt_cli import corpus as corpus_module
from minigpt_cli.config import UserError
from minigpt_cli.tokenizer import CharTokenizer


def test_non_utf8_file_names_the_file_and_byte_offset(tmp_path: Path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("héllo".encode("utf-8") + b" w\xe9rld")  # 6 bytes + 2: the bad byte is at offset 8
    with pytest.raises(UserError) as info:
        corpus_module.read_text(path)
    message = str(info.value)
    assert str(path) in message
    assert "offset 8" in message
    assert "0xe9" in message


def test_non_utf8_file_in_a_folder_names_that_file(tmp_path: Path):
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "a.txt").write_text("fine\n", encoding="utf-8")
    (folder / "b.txt").write_bytes(b"ok\n\xff")
    with pytest.raises(UserError, match=r"b\.txt.*offset 3"):
        corpus_module.read_text(folder)


def test_folder_of_txt_files_is_read_in_name_order(tmp_path: Path):
    folder = tmp_path / "books"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("second", encoding="utf-8")
    (folder / "a.txt").write_text("first\n", encoding="utf-8")
    (folder / "sub" / "c.txt").write_text("third\n", encoding="utf-8")
    (folder / "notes.md").write_text("ignored", encoding="utf-8")
    (folder / "image.bin").write_bytes(b"\xff\xfe")
    text, source = corpus_module.read_text(folder)
    assert text == "first\nsecond\nthird\n"
    assert "3 files" in source


def test_folder_without_txt_files_is_an_error(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .txt files"):
        corpus_module.read_text(tmp_path / "empty")


def test_stdin(monkeypatch: pytest.MonkeyPatch):
    class Pipe(io.TextIOWrapper):
        def isatty(self) -> bool:
            return False

    monkeypatch.setattr(sys, "stdin", Pipe(io.BytesIO("to be or not\n".encode("utf-8")), encoding="utf-8"))
    text, source = corpus_module.read_text("-")
    assert text == "to be or not\n"
    assert source == "stdin"


def test_utf8_byte_order_mark_is_dropped(tmp_path: Path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfabc")
    assert corpus_module.read_text(path)[0] == "abc"


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p / "missing.txt", "missing.txt"),
    (lambda p: (p / "empty.txt").write_text("") and None or p / "empty.txt", "empty"),
])
def test_missing_or_empty_file_is_an_error(tmp_path: Path, make, fragment):
    with pytest.raises(UserError, match=fragment):
        corpus_module.read_text(make(tmp_path))


@pytest.mark.parametrize("vocab_size, dtype", [(2, np.uint8), (256, np.uint8), (257, np.uint16),
                                               (65536, np.uint16), (65537, np.uint32)])
def test_smallest_integer_dtype(vocab_size: int, dtype):
    assert corpus_module.dtype_for_vocab(vocab_size) == np.dtype(dtype)


def test_cache_uses_the_smallest_dtype_and_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "text.txt"
    path.write_text("abcabc\n" * 200, encoding="utf-8")
    corpus = corpus_module.load_corpus(path, 0.1)
    cached = list((tmp_path / "cache").glob("*.npy"))
    assert len(cached) == 1
    assert np.load(cached[0]).dtype == np.uint8
    assert corpus.train.dtype == np.uint8

    def no_encoding(*args, **kwargs):
        raise AssertionError("the cached array should have been used")

    monkeypatch.setattr(corpus_module, "_encode_to", no_encoding)
    again = corpus_module.load_corpus(path, 0.1)
    assert np.array_equal(np.concatenate([again.train, again.val]), np.concatenate([corpus.train, corpus.val]))
    assert again.fingerprint == corpus.fingerprint


def test_cache_with_more_than_256_characters_uses_uint16(tmp_path: Path):
    path = tmp_path / "wide.txt"
    path.write_text("".join(chr(0x4E00 + i) for i in range(300)) * 3, encoding="utf-8")
    corpus = corpus_module.load_corpus(path, 0.1)
    assert corpus.tokenizer.vocab_size == 300
    assert corpus.train.dtype == np.uint16
    assert CharTokenizer.from_text(path.read_text(encoding="utf-8")).encode(path.read_text(encoding="utf-8")) == \
        np.concatenate([corpus.train, corpus.val]).tolist()


def test_a_corrupt_cache_file_is_rebuilt(tmp_path: Path):
    path = tmp_path / "text.txt"
    path.write_text("hello world\n" * 50, encoding="utf-8")
    first = np.array(corpus_module.load_corpus(path, 0.1).train)  # a copy: the corpus maps the cache file
    (cache_file,) = (tmp_path / "cache").glob("*.npy")
    cache_file.chmod(0o644)  # cache entries are read-only
    cache_file.write_bytes(b"garbage")
    second = corpus_module.load_corpus(path, 0.1)
    assert np.array_equal(first, second.train)


def test_split_is_the_tail_of_the_text(tmp_path: Path):
    path = tmp_path / "text.txt"
    path.write_text("0123456789" * 10, encoding="utf-8")
    corpus = corpus_module.load_corpus(path, 0.2)
    assert len(corpus.train) == 80 and len(corpus.val) == 20
    assert corpus.tokenizer.decode(corpus.val.tolist()) == "0123456789" * 2


def test_batches_are_reproducible_from_seed_and_step():
    a = batches.batch_indices(10_000, 32, 8, seed=7, step=3)
    assert np.array_equal(a, batches.batch_indices(10_000, 32, 8, seed=7, step=3))
    assert not np.array_equal(a, batches.batch_indices(10_000, 32, 8, seed=7, step=4))
    assert not np.array_equal(a, batches.batch_indices(10_000, 32, 8, seed=8, step=3))
    assert not np.array_equal(a, batches.batch_indices(10_000, 32, 8, seed=7, step=3, micro_step=1))
    assert a.min() >= 0 and a.max() <= 10_000 - 32 - 1


def test_ranks_split_the_global_batch():
    whole = batches.batch_indices(10_000, 32, 8, seed=1, step=5, world_size=1)
    ranks = [batches.batch_indices(10_000, 32, 4, seed=1, step=5, rank=r, world_size=2) for r in range(2)]
    assert np.array_equal(np.concatenate(ranks), whole)


def test_an_epoch_reads_every_window_once_in_a_shuffled_order_that_moves_each_epoch():
    n_tokens, block, batch = 10_001, 50, 8  # 200 windows of 50: 25 batches an epoch
    starts = np.concatenate([batches.epoch_batch_indices(n_tokens, block, batch, seed=3, step=s) for s in range(50)])
    first, second = starts[:200], starts[200:]
    for epoch in (first, second):
        assert len(np.unique(epoch)) == 200  # no window twice
        _, counts = np.unique(epoch % block, return_counts=True)
        assert counts.max() >= 199  # one offset an epoch (the last window may be pulled in to fit)
        assert epoch.min() >= 0 and epoch.max() <= n_tokens - block - 1
        assert not np.array_equal(np.sort(epoch), epoch)  # shuffled
    assert not np.array_equal(first // block, second // block)  # a new order each epoch
    read = np.zeros(n_tokens, dtype=bool)  # an epoch reads all the text but its offset's first characters
    for start in first:
        read[start:start + block + 1] = True
    assert read.mean() > 1 - block / n_tokens - 1e-9
    # Reproducible from (seed, step), a step at a time (so a resumed run continues the same order).
    assert np.array_equal(batches.epoch_batch_indices(n_tokens, block, batch, seed=3, step=31), starts[248:256])
    assert not np.array_equal(batches.epoch_batch_indices(n_tokens, block, batch, seed=4, step=31), starts[248:256])


def test_epoch_batches_split_over_ranks_and_micro_steps_as_one_big_batch():
    whole = batches.epoch_batch_indices(10_001, 50, 8, seed=1, step=5)
    ranks = [batches.epoch_batch_indices(10_001, 50, 4, seed=1, step=5, rank=r, world_size=2) for r in range(2)]
    assert np.array_equal(np.concatenate(ranks), whole)
    micro = [batches.epoch_batch_indices(10_001, 50, 2, seed=1, step=5, micro_step=m, rank=r, world_size=2,
                                      accum_steps=2) for m in range(2) for r in range(2)]
    assert np.array_equal(np.concatenate(micro), whole)


def test_a_text_too_big_for_an_epoch_order_draws_windows_at_random(monkeypatch):
    monkeypatch.setattr(batches, "MAX_EPOCH_WINDOWS", 100)
    assert np.array_equal(batches.epoch_batch_indices(10_001, 50, 8, seed=2, step=7),
                          batches.batch_indices(10_001, 50, 8, seed=2, step=7))


def test_targets_are_inputs_shifted_by_one():
    ids = np.arange(100, dtype=np.uint8)
    starts = batches.batch_indices(len(ids), 10, 4, seed=0, step=0)
    x, y = batches.get_batch(ids, starts, 10)
    assert x.shape == y.shape == (4, 10)
    assert x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x[:, 0], torch.from_numpy(starts.astype(np.int64)))


def test_short_split_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "short.txt"
    path.write_text("x" * 300, encoding="utf-8")
    corpus = corpus_module.load_corpus(path, 0.1)  # 30 characters of validation text
    corpus_module.check_split_lengths(corpus, block_size=29)
    with pytest.raises(UserError, match=r"val split.*30 characters.*block_size \+ 1 = 31"):
        corpus_module.check_split_lengths(corpus, block_size=30)


# -- through the CLI ---------------------------------------------------------------------------------

def test_cli_non_utf8_data(tmp_path: Path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"abc\x80def")
    assert_usage_error(invoke("train", "tiny", "--data", path), str(path), "offset 3")


def test_cli_missing_data(tmp_path: Path):
    assert_usage_error(invoke("train", "tiny", "--data", tmp_path / "nowhere.txt"), "nowhere.txt")


def test_cli_empty_data(tmp_path: Path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    assert_usage_error(invoke("train", "tiny", "--data", path), "empty")


def test_cli_short_split(tmp_path: Path):
    path = tmp_path / "short.txt"
    path.write_text("to be or not to be\n" * 10, encoding="utf-8")  # 190 chars: 19 of validation
    result = invoke("train", "tiny", "--data", path, *set_flags(*FAST, "model.block_size=32"))
    assert_usage_error(result, "val split", "block_size + 1 = 33")
    assert not any(Path("runs").glob("*/latest.json"))


def test_cli_data_folder(tmp_path: Path, small_corpus: Path):
    folder = tmp_path / "books"
    folder.mkdir()
    text = small_corpus.read_text(encoding="utf-8")
    (folder / "1.txt").write_text(text[:10_000], encoding="utf-8")
    (folder / "2.txt").write_text(text[10_000:], encoding="utf-8")
    result = invoke("train", "tiny", "--data", folder, "--out", "runs/folder", "--json",
                    *set_flags(*FAST, "train.max_iters=2", "train.eval_interval=100"))
    assert result.exit_code == 0, result.stderr
    assert result.json()["steps"] == 2


# -- corpora larger than memory: chunked reading, the cache, evaluation sizing -----------------------

MIXED = "héllo wörld 你好 🙂 end\n"  # 1-, 2-, 3- and 4-byte characters


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 5, 7, 64])
def test_chunked_encoding_equals_encoding_the_whole_text(tmp_path: Path, chunk_bytes: int):
    path = tmp_path / "mixed.txt"
    path.write_bytes(b"\xef\xbb\xbf" + (MIXED * 20).encode("utf-8"))  # with a byte order mark
    whole = MIXED * 20
    corpus = corpus_module.load_corpus(path, 0.25, chunk_bytes=chunk_bytes)
    assert corpus.tokenizer.chars == sorted(set(whole))
    ids = np.concatenate([corpus.train, corpus.val])
    assert ids.tolist() == corpus.tokenizer.encode(whole)
    assert len(corpus.val) == len(whole) // 4
    assert corpus.fingerprint == hashlib.sha256(whole.encode("utf-8")).hexdigest()


def test_chunked_reading_of_a_folder_joins_files_as_whole_reading_did(tmp_path: Path):
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "a.txt").write_text("no newline at the end", encoding="utf-8")
    (folder / "b.txt").write_bytes(b"\xef\xbb\xbf" + MIXED.encode("utf-8"))
    (folder / "c.txt").write_text("", encoding="utf-8")
    expected = "no newline at the end\n" + MIXED + "\n"
    corpus = corpus_module.load_corpus(folder, 0.1, chunk_bytes=4)
    assert corpus.tokenizer.decode(np.concatenate([corpus.train, corpus.val]).tolist()) == expected
    assert corpus_module.read_text(folder)[0] == expected


def test_invalid_utf8_far_into_a_file_names_its_byte_offset(tmp_path: Path):
    path = tmp_path / "bad.txt"
    path.write_bytes("ü".encode("utf-8") * 50 + b"\xff" + b"tail")
    with pytest.raises(UserError, match=r"byte 0xff at offset 100"):
        corpus_module.load_corpus(path, 0.1, chunk_bytes=8)
    path.write_bytes(b"abc" + "€".encode("utf-8")[:2])  # cut inside the last character
    with pytest.raises(UserError, match=r"offset 3"):
        corpus_module.load_corpus(path, 0.1, chunk_bytes=2)


def test_the_cache_holds_the_ids_once_and_is_read_through_a_memory_map(tmp_path: Path):
    path = tmp_path / "text.txt"
    path.write_text("to be or not to be\n" * 100, encoding="utf-8")
    first = corpus_module.load_corpus(path, 0.1)
    second = corpus_module.load_corpus(path, 0.1)
    assert (first.cache, second.cache) == ("encoded", "cached")
    assert isinstance(second.train, np.memmap) and isinstance(second.val, np.memmap)
    assert Path(second.train.filename) == Path(second.val.filename) == second.ids_path
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".json", ".npy"]  # ids, and length + vocabulary


def test_a_same_size_edit_with_the_old_mtime_is_not_served_from_the_cache(tmp_path: Path):
    path = tmp_path / "text.txt"
    path.write_text("abcdefgh\n" * 100, encoding="utf-8")
    stat = path.stat()
    before = corpus_module.load_corpus(path, 0.1)
    path.write_text("abcdefgh\n" * 99 + "hgfedcba\n", encoding="utf-8")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    after = corpus_module.load_corpus(path, 0.1)
    assert after.cache == "encoded" and after.fingerprint != before.fingerprint
    assert after.tokenizer.decode(after.val[-9:].tolist()) == "hgfedcba\n"


def test_cached_ids_outside_the_vocabulary_are_rebuilt(tmp_path: Path):
    """A cache file with the right shape and dtype but ids past the vocabulary made train die with
    IndexError (issue 19, item 6): cached ids are range-checked and a bad file is encoded again."""
    path = tmp_path / "text.txt"
    path.write_text("hello world\n" * 50, encoding="utf-8")
    good = np.array(np.concatenate(list(_splits(corpus_module.load_corpus(path, 0.1)))))
    (cache_file,) = (tmp_path / "cache").glob("*.npy")
    bad = good.copy()
    bad[123] = 200  # the vocabulary has 8 characters
    cache_file.unlink()  # a new file: the corpus above still maps the old one
    np.save(cache_file, bad)
    again = corpus_module.load_corpus(path, 0.1)
    assert np.array_equal(np.concatenate(list(_splits(again))), good)
    assert int(np.max(np.load(cache_file))) < again.tokenizer.vocab_size


def _splits(corpus):
    return corpus.train, corpus.val


def test_cli_trains_past_a_cache_with_ids_outside_the_vocabulary(tmp_path: Path, small_corpus: Path):
    first = invoke("train", "tiny", "--data", small_corpus, "--out", "a", "--json",
                   *set_flags(*FAST, "train.max_iters=1"))
    assert first.exit_code == 0, first.stderr
    for cache_file in (tmp_path / "cache").glob("*.npy"):
        ids = np.load(cache_file)
        ids[::97] = 255
        cache_file.unlink()
        np.save(cache_file, ids)
    again = invoke("train", "tiny", "--data", small_corpus, "--out", "b", "--json",
                   *set_flags(*FAST, "train.max_iters=1"))
    assert again.exit_code == 0, again.stderr


@pytest.mark.parametrize("n, block_size, stride", [(2, 8, 8), (8, 8, 8), (9, 8, 8), (10, 8, 8), (100, 8, 8),
                                                    (100, 8, 4), (101, 8, 3), (57, 16, 1)])
def test_scoring_windows_score_every_character_after_the_first_once(n: int, block_size: int, stride: int):
    windows = batches.scoring_windows(n, block_size, stride)
    scored = np.zeros(n, dtype=int)
    for begins, skips, length in windows.batches(batch_size=3):
        assert length <= block_size
        for begin, skip in zip(begins, skips):
            scored[begin + 1 + skip:begin + 1 + length] += 1
            if begin > 0:  # every character after the first window has at least block_size - stride of context
                assert skip >= min(block_size - stride, length - 1)
    assert scored[0] == 0 and (scored[1:] == 1).all()
    assert windows.chars == n - 1 and not windows.sampled


def test_small_splits_are_scored_whole_and_large_ones_on_a_fixed_sample():
    assert not batches.scoring_windows(1_000, 16, 16, max_chars=1_000).sampled
    assert not batches.scoring_windows(10_000, 16, 16, max_chars=0).sampled  # 0: always the whole split
    sample = batches.scoring_windows(10_000, 16, 16, max_chars=1_000)
    assert sample.sampled and sample.chars == 63 * 16  # whole windows, about max_chars characters
    again = batches.scoring_windows(10_000, 16, 16, max_chars=1_000)
    assert np.array_equal(sample.chosen, again.chosen)  # reproducible
    begins = np.concatenate([b for b, _, _ in sample.batches(8)])
    assert len(set(begins.tolist())) == 63 and begins.max() + 16 < 10_000
    assert begins.max() > 5_000  # spread over the split, not its first part
    overlapping = batches.scoring_windows(10_000, 16, 4, max_chars=1_000)
    assert overlapping.chars == 250 * 4
    assert all((skips == 12).all() for _, skips, _ in overlapping.batches(8))  # each sees 12 characters or more


def test_a_vocabulary_of_thousands_of_characters_trains_samples_and_is_inspected(tmp_path: Path):
    rng = np.random.default_rng(0)
    chars = [chr(0x4E00 + i) for i in range(3_000)]  # CJK ideographs: uint16 ids
    text = "".join(chars) + "".join(rng.choice(chars, size=20_000)) + "\n"
    path = tmp_path / "cjk.txt"
    path.write_text(text, encoding="utf-8")
    trained = invoke("train", "tiny", "--data", path, "--out", "cjk", "--json", *set_flags(*FAST, "train.max_iters=2"))
    assert trained.exit_code == 0, trained.stderr
    assert np.load(tmp_path / "cjk" / "data.npy").dtype == np.uint16
    sampled = invoke("sample", "cjk", "--prompt", chars[7], "--max-new-tokens", "20", "--repetition-penalty", "1.3",
                     "--top-k", "50", "--seed", "1")
    assert sampled.exit_code == 0, sampled.stderr
    assert len(sampled.stdout.strip()) == 21 and set(sampled.stdout.strip()) <= set(chars)
    inspected = invoke("inspect", "cjk", "--json")
    assert inspected.exit_code == 0 and inspected.json()["run"]["vocab"]["size"] == 3_001
    assert "vocabulary 3001" in invoke("inspect", "cjk").stdout.replace(",", "")


def test_a_run_that_failed_before_its_first_checkpoint_leaves_no_encoded_copy(tmp_path: Path):
    from minigpt_cli import rundir

    path = tmp_path / "text.txt"
    path.write_text("to be or not to be\n" * 100, encoding="utf-8")
    corpus = corpus_module.load_corpus(path, 0.1)
    run = tmp_path / "run"
    run.mkdir()
    assert "hard link" in corpus_module.keep_in_run(run, corpus)
    rundir.remove_unused_run_dir(run)
    assert not run.exists() and corpus.ids_path.is_file()  # the cache's own link stays
