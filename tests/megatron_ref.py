"""megatron-core 0.13.1's own dataset code, set up the way Megatron-LM's RETRO training sets it up: the
reference our pretraining samples and config.json are checked against (tests only).

megatron-core is installed for the test tier without its dependencies (it pins numpy < 2; its dataset code
runs on numpy 2), see the Makefile. Megatron-LM itself (``megatron.training``) is not a package: where a
test needs its ``load_retro_args`` it uses :func:`load_retro_args`, which does what that function does with a
workdir's config.json, line for line, and nothing more.
"""

from __future__ import annotations

import json
import os
import types
from collections import OrderedDict

import numpy as np
import pytest

core = pytest.importorskip("megatron.core", reason="megatron-core 0.13.1 is installed by 'make setup-dev'")


class Tokenizer:
    """The little of a MegatronTokenizer that the GPT datasets read (its EOD id and a hashable identity)."""

    def __init__(self, eod: int):
        self.eod = eod
        self.unique_identifiers = OrderedDict(cls="test-tokenizer", eod=eod)


def gpt_datasets(blend: list[str], split: str, seed: int, seq_length: int, sizes, eod: int = 0,
                 split_preprocessing: str | None = None, return_document_ids: bool = True, cache=None):
    """Megatron's train/valid/test datasets for a ``data_path`` list, as ``pretrain_retro.py``'s
    ``train_valid_test_datasets_provider`` builds them."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.retro.query.multi_split_gpt_dataset import (
        MultiSplitGPTDataset, MultiSplitGPTDatasetConfig)
    from megatron.core.datasets.utils import get_blend_from_list

    config = MultiSplitGPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=get_blend_from_list(blend),
        blend_per_split=[None, None, None], split=split, split_preprocessing=split_preprocessing or split,
        path_to_cache=cache, return_document_ids=return_document_ids, tokenizer=Tokenizer(eod),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        mid_level_dataset_surplus=0.005)
    return BlendedMegatronDatasetBuilder(MultiSplitGPTDataset, list(sizes), lambda: True, config).build()


def load_retro_args(args):
    """Megatron-LM's ``megatron/training/arguments.py:load_retro_args`` (core_v0.13.1), applied to ``args``."""
    from megatron.core.models.retro.utils import get_config_path, get_gpt_data_dir

    if args.retro_project_dir is None:
        return
    retro_config_path = get_config_path(args.retro_project_dir)
    assert os.path.exists(retro_config_path), "Retro project dir missing config.json."
    with open(retro_config_path) as f:
        retro_config = types.SimpleNamespace(**json.load(f))
    data_dir = get_gpt_data_dir(args.retro_project_dir)
    data_path = list(retro_config.retro_gpt_data_path)
    if len(data_path) % 2 == 0:
        for i in range(len(data_path) - 1, -1, -2):
            data_path[i] = os.path.join(data_dir, data_path[i])
    else:
        assert len(data_path) == 1
        data_path[0] = os.path.join(data_dir, data_path[0])
    args.data_cache_path = retro_config.retro_gpt_data_cache_path
    args.data_path = data_path if args.data_path is None else args.data_path
    args.eval_interval = retro_config.retro_gpt_eval_interval
    args.eval_iters = retro_config.retro_gpt_eval_iters
    args.global_batch_size = retro_config.retro_gpt_global_batch_size
    args.max_position_embeddings = retro_config.retro_gpt_seq_length
    args.merge_file = os.path.join(args.retro_project_dir, retro_config.retro_gpt_merge_file) \
        if retro_config.retro_gpt_merge_file is not None else None
    args.seed = retro_config.retro_gpt_seed
    args.seq_length = retro_config.retro_gpt_seq_length
    args.tokenizer_model = os.path.join(args.retro_project_dir, retro_config.retro_gpt_tokenizer_model) \
        if retro_config.retro_gpt_tokenizer_model is not None else None
    args.tokenizer_type = retro_config.retro_gpt_tokenizer_type
    args.train_samples = retro_config.retro_gpt_train_samples
    args.vocab_file = os.path.join(args.retro_project_dir, retro_config.retro_gpt_vocab_file) \
        if retro_config.retro_gpt_vocab_file is not None else None
    args.retro_block_size = retro_config.retro_block_size
    args.retro_chunk_length = retro_config.retro_gpt_chunk_length
    args.retro_neighbor_dirs = retro_config.retro_neighbor_dirs
    args.retro_split_preprocessing = retro_config.retro_gpt_split
    args.retro_bert_tokenizer_type = retro_config.retro_bert_tokenizer_type
    args.retro_bert_vocab_file = retro_config.retro_bert_vocab_file


def training_num_samples(args) -> tuple[int, int, int]:
    """Megatron-LM's ``update_train_iters`` (sample-based, no batch ramp-up) and
    ``get_train_valid_test_num_samples``."""
    train_iters = args.train_samples // args.global_batch_size
    eval_iters = (train_iters // args.eval_interval + 1) * args.eval_iters
    return args.train_samples, eval_iters * args.global_batch_size, args.eval_iters * args.global_batch_size


def sample_tokens(dataset, i: int) -> np.ndarray:
    return np.asarray(dataset[i]["text"], dtype=np.int64)


def tokenizer_eod(args) -> int:
    """The EOD id of the GPT tokenizer Megatron-LM's ``build_tokenizer`` makes from these args, for the two
    types a workdir names: GPT2BPETokenizer (vocab + merges; EOD = ``<|endoftext|>``) and HuggingFaceTokenizer
    (``AutoTokenizer.from_pretrained(tokenizer_model).eos_token_id``)."""
    if args.tokenizer_type == "GPT2BPETokenizer":
        from tokenizers import ByteLevelBPETokenizer

        assert args.vocab_file is not None and args.merge_file is not None
        ByteLevelBPETokenizer.from_file(args.vocab_file, args.merge_file)  # both files load as a GPT-2 BPE
        with open(args.vocab_file, encoding="utf-8") as f:
            return json.load(f)["<|endoftext|>"]
    assert args.tokenizer_type == "HuggingFaceTokenizer", args.tokenizer_type
    import transformers

    return transformers.AutoTokenizer.from_pretrained(args.tokenizer_model).eos_token_id


CONFIG_KEYS = ("retro_gpt_data_path", "retro_gpt_data_cache_path", "retro_gpt_eval_interval", "retro_gpt_eval_iters",
               "retro_gpt_global_batch_size", "retro_gpt_seq_length", "retro_gpt_merge_file", "retro_gpt_seed",
               "retro_gpt_tokenizer_model", "retro_gpt_tokenizer_type", "retro_gpt_train_samples",
               "retro_gpt_vocab_file", "retro_block_size", "retro_gpt_chunk_length", "retro_neighbor_dirs",
               "retro_gpt_split", "retro_bert_tokenizer_type", "retro_bert_vocab_file")


def megatron_retro_datasets(workdir, split: str, num_neighbors: int):
    """What Megatron's RETRO training reads from ``workdir``: ``pretrain_retro.py --retro-project-dir workdir
    --split split --retro-add-retriever --retro-num-neighbors num_neighbors`` (no --data-path), through
    load_retro_args, Megatron's sample counts, MultiSplitGPTDataset/BlendedDataset and megatron-core's own
    ``get_retro_datasets``. Returns ((train, valid, test) RetroDatasets, args, sample counts)."""
    import megatron.core.models.retro.config as retro_config_module
    from megatron.core.datasets.retro.query.retro_dataset import get_retro_datasets
    from megatron.core.models.retro import RetroConfig

    # RetroConfig asks Transformer Engine's version, which megatron-core 0.13.1 cannot compare when Transformer
    # Engine is not installed (None >= Version): without it, it is no TE >= 1.3.
    from megatron.core.utils import get_te_version

    if get_te_version() is None:
        retro_config_module.is_te_min_version = lambda *a, **k: False

    args = types.SimpleNamespace(retro_project_dir=str(workdir), data_path=None, split=split)
    load_retro_args(args)
    sizes = training_num_samples(args)
    eod = tokenizer_eod(args)
    built = gpt_datasets(args.data_path, args.split, args.seed, args.seq_length, sizes, eod=eod,
                         split_preprocessing=args.retro_split_preprocessing, return_document_ids=False,
                         cache=args.data_cache_path)
    config = RetroConfig(num_layers=2, hidden_size=8, num_attention_heads=2, retro_project_dir=str(workdir),
                         retro_block_size=args.retro_block_size, retro_chunk_length=args.retro_chunk_length,
                         retro_neighbor_dirs=args.retro_neighbor_dirs, retro_num_neighbors=num_neighbors,
                         retro_split_preprocessing=args.retro_split_preprocessing)
    gpt = {"train": (built[0], sizes[0]), "valid": (built[1], sizes[1]), "test": (built[2], sizes[2])}
    return get_retro_datasets(config=config, gpt_datasets=gpt, sample_length=args.seq_length, eod_token_id=eod), \
        args, sizes


def check_megatron_reads_workdir(workdir, split_arg: str, max_train: int | None = None) -> int:
    """Megatron's training path on ``workdir`` gives every checked sample our sample's text and the neighbor
    ids our RetroDataset gives; every config key is there. Returns the number of samples compared."""
    from retro_pipeline.dataset import RetroDataset

    with open(os.path.join(workdir, "config.json")) as f:
        stored = json.load(f)
    missing = [k for k in CONFIG_KEYS if k not in stored]
    assert not missing, missing
    k = stored["num_neighbors_save"]
    theirs, args, sizes = megatron_retro_datasets(workdir, split_arg, k)
    compared = 0
    for name, ds, n in zip(("train", "valid", "test"), theirs, sizes):
        if ds is None:
            assert stored["retro_neighbor_dirs"][name] is None
            continue
        ours = RetroDataset(workdir, name)
        assert len(ours) == n, (name, len(ours), n)
        idx = range(n) if max_train is None or name != "train" else np.linspace(0, n - 1, min(n, max_train)).astype(int)
        for i in idx:
            item, mine = ds[int(i)], ours[int(i)]
            assert np.array_equal(np.asarray(item["text"], np.int64), mine["text"]), (name, i)
            got = np.asarray(item["neighbor_chunks"])[:, :, 0]  # [L, k]: the neighbor ids Megatron trains with
            want = mine["neighbor_chunks"][:, :, 0]
            assert got.shape == want.shape
            assert np.array_equal(got[want >= 0], want[want >= 0]), (name, i)
            compared += 1
    return compared
