"""Our pretraining samples are megatron-core 0.13.1's, sample for sample: tokens, documents and corpus of every
sample of every split, for one corpus and for blends, checked against megatron-core's own
MultiSplitGPTDataset / BlendedDataset built as Megatron's RETRO training builds them."""

from __future__ import annotations

import types

import numpy as np
import pytest

from megatron_ref import gpt_datasets, sample_tokens
from retro_pipeline.corpus import write_indexed_dataset
from retro_pipeline.samples import SPLITS, GPTSamples, SampleSet, megatron_sample_counts, split_matrix


def make_corpus(path, n_docs: int, seed: int, max_len: int = 90) -> str:
    """Random tokens in documents of random lengths (some of 1 token, some of 0), EOD (0) at the end."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n_docs):
        n = int(rng.integers(0, max_len)) if i % 17 else int(rng.integers(0, 2))
        docs.append(np.append(rng.integers(1, 50000, n), 0) if n else np.zeros(0, np.int64))
    return write_indexed_dataset(str(path), docs, np.uint16)


def cfg(data_path, split, seq_length, seed=1234, chunk_length=16):
    return types.SimpleNamespace(data_path=data_path, split=split, seq_length=seq_length, seed=seed,
                                 chunk_length=chunk_length, gpt_tokenizer="t")


def compare(ours: SampleSet, theirs, blended: bool) -> int:
    n = ours.n_samples
    assert len(theirs) >= n
    tokens = ours.tokens(0, n)
    for i in range(n):
        item = theirs[i]
        assert np.array_equal(tokens[i], np.asarray(item["text"], np.int64)), (ours.split, i)
        docs = ours.doc_ids(i)
        assert np.array_equal(docs[:, 1], np.asarray(item["document_ids"], np.int64)), (ours.split, i)
        assert (docs[:, 0] == (int(item["dataset_id"]) if blended else 0)).all()
    return n


@pytest.mark.parametrize("split", ["98,2,0", "80,10,10", "969, 30, 1", "6,0,4"])
@pytest.mark.parametrize("blend", ["one", "two"])
def test_every_sample_of_every_split_equals_megatron_core(tmp_path, split, blend):
    a = make_corpus(tmp_path / "a", 1000, 1)
    b = make_corpus(tmp_path / "b", 700, 2, max_len=200)
    data_path = ["1.0", a] if blend == "one" else ["0.7", a, "0.3", b]
    megatron_path = [a] if blend == "one" else ["0.7", a, "0.3", b]
    seq = 32
    # valid asks several epochs (with the separate final epoch), test about one, train less than one
    sizes = megatron_sample_counts(1500, 2, 30, 40)
    theirs = gpt_datasets(megatron_path, split, 1234, seq, sizes)
    compared = 0
    for k, name in enumerate(SPLITS):
        ours = SampleSet(cfg(data_path, split, seq), name, sizes[k])
        if split_matrix(split)[k] is None:
            assert theirs[k] is None and ours.n_samples == 0 and not ours.exists
            continue
        assert ours.n_samples == sizes[k] > 0
        compared += compare(ours, theirs[k], blend == "two")
    assert compared >= sizes[0]


def test_mid_level_indices_equal_megatron_core_including_a_separate_final_epoch(tmp_path):
    from megatron.core.datasets.helpers import build_sample_idx  # noqa: F401  (the compiled helper loads)

    a = make_corpus(tmp_path / "a", 200, 3)
    theirs = gpt_datasets([a], "98,2,0", 77, 16, [50, 700, 0], cache=str(tmp_path / "cache"))
    from retro_pipeline.corpus import IndexedDataset

    lengths = IndexedDataset(a).sequence_lengths
    seen_separate = False
    for k, asked in enumerate([50, 700]):
        m = theirs[k]
        b, e = int(m.indices[0]), int(m.indices[-1]) + 1
        ours = GPTSamples(lengths, b, e, asked, 16, 77)
        assert np.array_equal(ours.document_index, m.document_index)
        assert np.array_equal(ours.sample_index(), m.sample_index)
        assert np.array_equal(ours.shuffle_index, m.shuffle_index)
        seen_separate |= ours.epochs > 1 and len(ours.shuffle_index) > 0
    assert seen_separate


def test_a_split_without_documents_has_no_samples_and_is_an_error_only_when_asked(tmp_path):
    from retro_pipeline.errors import RetroError

    a = make_corpus(tmp_path / "a", 20, 4)  # round(0.98 * 20) = 20: valid holds no document
    c = cfg(["1.0", a], "98,2,0", 32)
    assert SampleSet(c, "valid", 0).n_samples == 0
    with pytest.raises(RetroError, match="the valid split .* holds no documents .* asks 8 valid samples"):
        SampleSet(c, "valid", 8)
    assert SampleSet(c, "test", 8).n_samples == 0  # test has zero width: Megatron builds no test dataset
