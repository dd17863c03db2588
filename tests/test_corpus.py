"""Megatron indexed datasets: byte layout, round trips, validation errors, blends."""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest

from retro_pipeline.corpus import (DTYPES, IndexedDataset, IndexedDatasetWriter, best_dtype, blend_to_list,
                                   parse_blend, write_indexed_dataset)
from retro_pipeline.errors import RetroError


def hand_made_idx(code, lengths, itemsize, doc_idx=None, magic=b"MMIDIDX\x00\x00", version=1):
    """The .idx bytes of formats.md §1, packed field by field (independent of our writer)."""
    n = len(lengths)
    doc_idx = list(range(n + 1)) if doc_idx is None else doc_idx
    pointers, p = [], 0
    for ln in lengths:
        pointers.append(p)
        p += ln * itemsize
    out = magic + struct.pack("<Q", version) + struct.pack("<B", code)
    out += struct.pack("<Q", n) + struct.pack("<Q", len(doc_idx))
    out += struct.pack(f"<{n}i", *lengths) + struct.pack(f"<{n}q", *pointers)
    out += struct.pack(f"<{len(doc_idx)}q", *doc_idx)
    return out


def test_idx_bytes_match_hand_packed_fixture(tmp_path):
    docs = [[1, 2, 3], [], [7], [65000, 0]]
    prefix = write_indexed_dataset(tmp_path / "c", docs, np.uint16)
    assert (tmp_path / "c.idx").read_bytes() == hand_made_idx(8, [3, 0, 1, 2], 2)
    assert (tmp_path / "c.bin").read_bytes() == struct.pack("<6H", 1, 2, 3, 7, 65000, 0)
    assert prefix == str(tmp_path / "c")


def test_reads_hand_packed_files(tmp_path):
    (tmp_path / "h.idx").write_bytes(hand_made_idx(4, [2, 1], 4, doc_idx=[0, 2]))
    (tmp_path / "h.bin").write_bytes(struct.pack("<3i", -5, 70000, 9))
    ds = IndexedDataset(tmp_path / "h")
    assert ds.dtype == np.int32 and len(ds) == 2 and ds.num_documents == 1
    assert ds[0].tolist() == [-5, 70000] and ds[1].tolist() == [9]


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.int64, np.float32, np.float64,
                                   np.uint16])
def test_round_trip_dtypes(tmp_path, dtype):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 100, size=n).astype(dtype) for n in (5, 0, 1, 17, 0, 3)]
    write_indexed_dataset(tmp_path / "c", docs, dtype)
    ds = IndexedDataset(tmp_path / "c")
    assert ds.dtype == np.dtype(dtype) and len(ds) == 6 and ds.num_tokens == 26
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
    assert ds.sequence_lengths.dtype == np.int32 and ds.sequence_pointers.dtype == np.int64
    np.testing.assert_array_equal(ds.document_indices, np.arange(7))
    off = ds.sequence_offsets
    np.testing.assert_array_equal(np.diff(off), [len(d) for d in docs])
    np.testing.assert_array_equal(ds.tokens[off[3]:off[4]], docs[3])
    assert ds.get(3, 2, 4).tolist() == docs[3][2:6].tolist()
    assert [x.tolist() for x in ds[1:4]] == [d.tolist() for d in docs[1:4]]
    assert ds[-1].tolist() == docs[-1].tolist()


def test_writer_streaming_api_and_bounds(tmp_path):
    with IndexedDatasetWriter(tmp_path / "c", np.uint16) as w:
        w.add_document([1, 2])
        w.add_documents([np.array([3]), []])
        w.add_flat(np.array([4, 5, 6]), [1, 2])
        assert len(w) == 5
    ds = IndexedDataset(tmp_path / "c.bin")  # a .bin/.idx suffix is forgiven
    assert [ds[i].tolist() for i in range(5)] == [[1, 2], [3], [], [4], [5, 6]]
    with pytest.raises(IndexError):
        ds.get(5)
    with pytest.raises(IndexError):
        ds.get(0, 1, 2)
    with pytest.raises(RetroError, match="do not fit uint16"):
        write_indexed_dataset(tmp_path / "d", [np.array([70000])], np.uint16)


def test_empty_corpus(tmp_path):
    write_indexed_dataset(tmp_path / "e", [], np.uint16)
    assert (tmp_path / "e.bin").stat().st_size == 0
    ds = IndexedDataset(tmp_path / "e")
    assert len(ds) == 0 and ds.num_tokens == 0 and ds.tokens.size == 0
    assert ds.sequence_offsets.tolist() == [0]


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with IndexedDatasetWriter(tmp_path / "c", np.uint16) as w:
            w.add_document([1, 2, 3])
            1 / 0
    assert os.listdir(tmp_path) == []


def test_unwritable_target_is_one_clear_error(tmp_path):
    import errno

    (tmp_path / "afile").write_text("x")
    with pytest.raises(RetroError, match=r"afile/c: cannot write c.bin and c.idx there \(a file is in the way, not a directory: "):
        IndexedDatasetWriter(tmp_path / "afile" / "c")
    with pytest.raises(RetroError, match="names a directory"):
        IndexedDatasetWriter(f"{tmp_path}/")

    class Full:
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    with pytest.raises(RetroError, match=r"cannot write c.bin and c.idx there \(No space left on device\)"):
        with IndexedDatasetWriter(tmp_path / "c", np.uint16) as w:
            w._bin.close()
            w._bin = Full()
            w.add_documents([[1, 2, 3]])
    assert sorted(os.listdir(tmp_path)) == ["afile"]  # temporaries removed, nothing that looks done


def test_pickle_reopens(tmp_path):
    write_indexed_dataset(tmp_path / "c", [[1, 2], [3]], np.uint16)
    ds = pickle.loads(pickle.dumps(IndexedDataset(tmp_path / "c")))
    assert ds[1].tolist() == [3] and len(pickle.dumps(ds)) < 500


def test_validation_streams_in_blocks(tmp_path, monkeypatch):
    import retro_pipeline.corpus as corpus

    monkeypatch.setattr(corpus, "_BLOCK", 3)
    docs = [np.arange(i, i + i % 4) for i in range(10)]  # lengths 0..3, some empty, across block edges
    write_indexed_dataset(tmp_path / "c", docs, np.int32)
    assert (tmp_path / "c.idx").read_bytes() == hand_made_idx(4, [len(d) for d in docs], 4)
    ds = IndexedDataset(tmp_path / "c")
    assert [ds[i].tolist() for i in range(10)] == [d.tolist() for d in docs]
    raw = bytearray((tmp_path / "c.idx").read_bytes())
    struct.pack_into("<q", raw, 34 + 4 * 10 + 8 * 7, 999)  # pointer of sequence 7 (third block)
    (tmp_path / "c.idx").write_bytes(bytes(raw))
    with pytest.raises(RetroError, match=r"sequence 7: pointer 999, expected 36\)"):
        IndexedDataset(tmp_path / "c")


def test_float32_code_7_and_legacy_float64(tmp_path):
    (tmp_path / "f.idx").write_bytes(hand_made_idx(7, [2], 8))
    (tmp_path / "f.bin").write_bytes(struct.pack("<2d", 1.5, 2.5))
    ds = IndexedDataset(tmp_path / "f")
    assert ds.dtype == np.float64 and ds[0].tolist() == [1.5, 2.5]
    assert DTYPES[7] is np.float32


# -- validation --------------------------------------------------------------------------------------
def _corpus(tmp_path):
    write_indexed_dataset(tmp_path / "c", [[1, 2, 3], [4], [5, 6]], np.uint16)
    return tmp_path / "c.idx", tmp_path / "c.bin"


def _expect_error(tmp_path, filename, match):
    with pytest.raises(RetroError, match=match) as e:
        IndexedDataset(tmp_path / "c")
    assert filename in str(e.value) and "\n" not in str(e.value)


def test_truncated_bin(tmp_path):
    idx, bin_ = _corpus(tmp_path)
    bin_.write_bytes(bin_.read_bytes()[:-2])
    _expect_error(tmp_path, "c.bin", "truncated")


def test_truncated_idx(tmp_path):
    idx, bin_ = _corpus(tmp_path)
    idx.write_bytes(idx.read_bytes()[:-4])
    _expect_error(tmp_path, "c.idx", "truncated")


def test_wrong_magic(tmp_path):
    idx, bin_ = _corpus(tmp_path)
    idx.write_bytes(b"NOTANIDX\x00" + idx.read_bytes()[9:])
    _expect_error(tmp_path, "c.idx", "magic")


def test_legacy_magic(tmp_path):
    idx, bin_ = _corpus(tmp_path)
    idx.write_bytes(b"TNTIDX\x00\x00" + idx.read_bytes()[8:])
    _expect_error(tmp_path, "c.idx", "legacy non-mmap")


def test_wrong_version(tmp_path):
    idx, bin_ = _corpus(tmp_path)
    data = bytearray(idx.read_bytes())
    data[9:17] = struct.pack("<Q", 2)
    idx.write_bytes(bytes(data))
    _expect_error(tmp_path, "c.idx", "version 2")


def test_unknown_dtype(tmp_path):
    idx, bin_ = _corpus(tmp_path)
    data = bytearray(idx.read_bytes())
    data[17] = 9
    idx.write_bytes(bytes(data))
    _expect_error(tmp_path, "c.idx", "dtype code 9")


def test_pointer_length_mismatch(tmp_path):
    (tmp_path / "c.idx").write_bytes(hand_made_idx(8, [3, 1, 2], 2)[:-40] + struct.pack("<q", 4)
                                     + hand_made_idx(8, [3, 1, 2], 2)[-32:])
    (tmp_path / "c.bin").write_bytes(b"\0" * 12)
    _expect_error(tmp_path, "c.idx", "pointers do not match")


@pytest.mark.parametrize("doc_idx, match", [([1, 3], "start at 0"), ([0, 2], "end at N=3"),
                                            ([0, 2, 1, 3], "non-decreasing")])
def test_bad_document_indices(tmp_path, doc_idx, match):
    (tmp_path / "c.idx").write_bytes(hand_made_idx(8, [3, 1, 2], 2, doc_idx=doc_idx))
    (tmp_path / "c.bin").write_bytes(b"\0" * 12)
    _expect_error(tmp_path, "c.idx", match)


def test_missing_files(tmp_path):
    idx, bin_ = _corpus(tmp_path)
    bin_.unlink()
    _expect_error(tmp_path, "c.bin", "not found")


def test_best_dtype():
    assert best_dtype(50257) is np.uint16 and best_dtype(65499) is np.uint16
    assert best_dtype(65500) is np.int32 and best_dtype(128256) is np.int32


def test_import_is_light():
    code = "import sys, retro_pipeline.corpus; print(any(m in sys.modules for m in " \
           "('torch', 'ray', 'transformers', 'pyarrow', 'tokenizers')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- blends ------------------------------------------------------------------------------------------
def test_parse_blend(tmp_path):
    for name in ("a", "b"):
        write_indexed_dataset(tmp_path / name, [[1]], np.uint16)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert parse_blend(a) == [(1.0, a)]
    assert parse_blend(f"0.3 {a} 0.7 {b}.bin") == [(0.3, a), (0.7, b)]
    assert parse_blend(["0.3", a, "0.7", b]) == [(0.3, a), (0.7, b)]
    assert parse_blend([a]) == [(1.0, a)]
    assert parse_blend([(2, a)]) == [(2.0, a)]
    assert blend_to_list(parse_blend(f"0.3 {a} 0.7 {b}")) == ["0.3", a, "0.7", b]
    assert parse_blend("1 nowhere", check_files=False) == [(1.0, "nowhere")]


@pytest.mark.parametrize("spec, match", [
    ("0.3 a 0.7", "odd number"), ("x a", "not a number"), ("0 a", "positive"), ("-1 a", "positive"),
    ("", "empty"), ("1 nowhere", r"nowhere\.idx and .*nowhere\.bin missing"),
])
def test_parse_blend_errors(spec, match):
    with pytest.raises(RetroError, match=match):
        parse_blend(spec)


def test_parse_blend_names_the_missing_file(tmp_path):
    write_indexed_dataset(tmp_path / "a", [[1]], np.uint16)
    (tmp_path / "a.bin").unlink()
    with pytest.raises(RetroError, match=r"a\.bin missing") as e:
        parse_blend(f"1 {tmp_path / 'a'}")
    assert "a.idx" not in str(e.value)
