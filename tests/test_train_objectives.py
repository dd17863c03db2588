"""The pre-training objectives (retromae, retroar, custom, mlm) and their shared masking, on hand-built batches
checked against independent hand computation; tiny random-init BERTs (conftest) so each test takes seconds."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from embedder.errors import UserError
from embedder.masking import IGNORE, enhanced_decoding_mask, mask_tokens
from embedder.tasks import get_task
from embedder.tasks.base import TaskOptions

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "python lists are mutable sequences of objects",
    "a dictionary maps keys to values",
    "the for statement iterates over the items of a sequence",
    "exceptions are raised when errors occur",
    "strings are immutable sequences of unicode code points",
    "a function is defined with the def statement",
    "classes bundle data and functionality together",
]
TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
        "max_position_embeddings": 64}


def _bert(path, vocab_size: int, hidden: int = 32, tokenizer_from: str | None = None, seed: int = 1) -> str:
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(path)
    if tokenizer_from:
        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(path)
    return str(path)


def _rows(task, texts=TEXTS):
    return [task.check_row({"text": t}, f"t.jsonl:{i + 1}") for i, t in enumerate(texts)]


def _task(name, **kw):
    return get_task(name)(TaskOptions(max_length=32, **kw))


# ====================================================================== masking


def _hand_batch():
    # row 0: [CLS] 10 11 12 13 14 15 16 [SEP] pad pad; row 1: [CLS] 20 21 [SEP] pad...
    ids = np.array([[2, 10, 11, 12, 13, 14, 15, 16, 3, 0, 0],
                    [2, 20, 21, 3, 0, 0, 0, 0, 0, 0, 0]])
    special = np.array([[1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1],
                        [1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]])
    return ids, special


def test_mask_tokens_positions_labels_and_seed():
    ids, special = _hand_batch()
    inputs, labels = mask_tokens(ids, special, 0.3, np.random.default_rng(7), mask_id=4, vocab_size=50)
    chosen = labels != IGNORE
    assert not (chosen & special.astype(bool)).any()                  # never specials / padding
    assert (labels[chosen] == ids[chosen]).all()                        # labels: the original ids there
    assert (labels[~chosen] == IGNORE).all()                            # -100 exactly where not masked
    assert (inputs[~chosen] == ids[~chosen]).all()                      # nothing else changes
    # exactly round(0.3 * n) (at least 1) of each row's n maskable tokens: 7 -> 2, 2 -> 1
    assert chosen.sum(axis=1).tolist() == [2, 1]
    again = mask_tokens(ids, special, 0.3, np.random.default_rng(7), mask_id=4, vocab_size=50)
    assert np.array_equal(again[0], inputs) and np.array_equal(again[1], labels)
    other = [mask_tokens(ids, special, 0.3, np.random.default_rng(s), 4, 50)[1] for s in range(8, 14)]
    assert any(not np.array_equal(o, labels) for o in other)
    # only the rng passed in is drawn from: numpy's and torch's global states are untouched
    np.random.seed(123)
    torch.manual_seed(123)
    before = (np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    mask_tokens(ids, special, 0.3, np.random.default_rng(1), 4, 50)
    enhanced_decoding_mask(1 - special, special, 0.5, np.random.default_rng(1))
    assert np.array_equal(np.random.get_state()[1], before[0]) and torch.equal(torch.get_rng_state(), before[1])
    # random replacements avoid the excluded ids
    big = np.tile(ids, (200, 1))
    inp, lab = mask_tokens(big, np.tile(special, (200, 1)), 0.9, np.random.default_rng(2), 4, 8, exclude_ids=(0, 2, 3, 4))
    swapped = (lab != IGNORE) & (inp != 4) & (inp != big)
    assert swapped.any() and np.isin(inp[swapped], [1, 5, 6, 7]).all()


def test_mask_tokens_80_10_10_on_a_large_batch():
    rng = np.random.default_rng(0)
    vocab, mask_id = 1000, 4
    ids = rng.integers(10, vocab, size=(300, 400))
    special = np.zeros_like(ids)
    special[:, 0] = special[:, -1] = 1
    special[:, 350:] = 1                                                # padding
    inputs, labels = mask_tokens(ids, special, 0.3, np.random.default_rng(1), mask_id, vocab)
    chosen = labels != IGNORE
    n = chosen.sum()
    assert n == 300 * round(0.3 * 349)                                 # columns 1..349
    assert not chosen[:, 350:].any() and not chosen[:, 0].any() and not chosen[:, -1].any()
    to_mask = (inputs[chosen] == mask_id).mean()
    kept = (inputs[chosen] == ids[chosen]).mean()
    swapped = ((inputs[chosen] != mask_id) & (inputs[chosen] != ids[chosen])).mean()
    assert abs(to_mask - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 and abs(swapped - 0.1) < 0.01
    assert inputs.min() >= 0 and inputs.max() < vocab
    # positions are uniform: each text column is masked about 30% of the time
    col = chosen[:, 1:349].mean(axis=0)
    assert abs(col.mean() - 0.3) < 0.005 and col.min() > 0.15


def test_enhanced_decoding_mask_hand_row():
    attention = np.array([[1, 1, 1, 1, 1, 1, 0, 0]])                  # [CLS] a b c d [SEP] pad pad
    special = np.array([[1, 0, 0, 0, 0, 1, 1, 1]])
    vis = enhanced_decoding_mask(attention, special, 0.5, np.random.default_rng(3))[0]
    assert vis.shape == (8, 8) and vis.dtype == bool
    for i in range(1, 6):
        assert vis[i, 0]                                                # the sentence embedding
        assert not vis[i, i]                                            # never itself
        assert not vis[i, 6:].any()                                     # never padding
    for i in range(0, 5):
        assert vis[i, 5]                                                # [SEP] (a special) is always visible
    assert not vis[0, 0]
    for i in (6, 7):                                                    # padding rows: position 0 only
        assert vis[i].tolist() == [True] + [False] * 7
    again = enhanced_decoding_mask(attention, special, 0.5, np.random.default_rng(3))[0]
    assert np.array_equal(again, vis)
    # ratio 0: every row sees all real tokens but itself
    full = enhanced_decoding_mask(attention, special, 0.0, np.random.default_rng(3))[0]
    expect = np.zeros((8, 8), dtype=bool)
    expect[:6, :6] = True
    expect[np.arange(6), np.arange(6)] = False
    expect[6:, 0] = True
    assert np.array_equal(full, expect)


def test_enhanced_decoding_mask_hides_about_the_ratio():
    L = 402
    attention = np.ones((2, L), dtype=np.int64)
    special = np.zeros((2, L), dtype=np.int64)
    special[:, 0] = special[:, -1] = 1
    vis = enhanced_decoding_mask(attention, special, 0.5, np.random.default_rng(0))
    sub = vis[:, 1:L - 1, 1:L - 1]                                      # token rows x token columns
    off_diag = ~np.eye(L - 2, dtype=bool)[None]
    hidden_share = 1.0 - sub[np.broadcast_to(off_diag, sub.shape)].mean()
    assert abs(hidden_share - 0.5) < 0.01
    # each row draws its own subset
    assert not np.array_equal(vis[0, 5], vis[0, 6])
    for r in (0.2, 0.7):
        v = enhanced_decoding_mask(attention, special, r, np.random.default_rng(1))[:, 1:L - 1, 1:L - 1]
        assert abs(1.0 - v[np.broadcast_to(off_diag, v.shape)].mean() - r) < 0.01


# ====================================================================== rows, registry, options


def test_rows_registry_and_options():
    for name in ("retromae", "retroar", "custom", "mlm"):
        cls = get_task(name)
        assert cls.name == name and cls.row_kind == "text"
    task = _task("retromae")
    assert task.check_row({"text": "a b"}, "f:1") == {"text": "a b"}
    for key in ("document", "doc", "passage", "pos"):                   # a pairs file works for pre-training
        assert task.check_row({"query": "q", key: "the doc"}, "f:2") == {"text": "the doc"}
    assert task.check_row({"query": "q", "pos": ["first", "second"], "neg": ["n"]}, "f:2") == {"text": "first"}
    assert task.check_row({"text": "t", "pos": "p"}, "f:2") == {"text": "t"}   # 'text' wins
    with pytest.raises(UserError, match=r"^f:6: 'pos' must be a non-empty string, got an array"):
        task.check_row({"query": "q", "pos": []}, "f:6")
    with pytest.raises(UserError, match=r"^f:3: no 'text'"):
        task.check_row({"query": "q"}, "f:3")
    with pytest.raises(UserError, match=r"^f:4: 'text' must be a non-empty string, got an empty string"):
        task.check_row({"text": "  "}, "f:4")
    with pytest.raises(UserError, match=r"^f:5: 'text' must be a non-empty string, got an array"):
        task.check_row({"text": ["x"]}, "f:5")
    with pytest.raises(UserError, match="mask_ratio"):
        _task("retromae", mask_ratio=1.5)
    with pytest.raises(UserError, match="decoder_mask_ratio"):
        _task("retromae", decoder_mask_ratio=1.0)
    with pytest.raises(UserError, match="pooling must be 'cls'"):
        _task("retroar", pooling="mean")
    with pytest.raises(UserError, match="mlm_probability"):
        _task("mlm", mlm_probability=0)
    with pytest.raises(UserError, match="document encoder"):
        _task("custom")


HEAVY = ("torch", "transformers", "tokenizers", "ray", "faiss")


def test_task_modules_import_no_torch():
    """Every registered task module imports without torch, transformers, tokenizers, ray or faiss (``train
    --help`` imports them all to read the tasks' options): checked in a fresh interpreter."""
    code = ("import importlib, json, sys\n"
            "from embedder.tasks import TASK_MODULES\n"
            "for module in TASK_MODULES.values():\n"
            "    importlib.import_module(module).TASK\n"
            f"print(json.dumps({{'modules': list(TASK_MODULES.values()), 'heavy': [m for m in {HEAVY!r} "
            f"if m in sys.modules]}}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"embedder.tasks.contrastive", "embedder.tasks.retromae", "embedder.tasks.retroar",
            "embedder.tasks.custom", "embedder.tasks.mlm"} <= set(got["modules"])
    assert got["heavy"] == [], f"importing the task modules loaded {got['heavy']}"


def test_retromae_rejects_a_tokenizer_without_cls(tiny_bert_dir):
    task = _task("retromae", model=tiny_bert_dir)                       # conftest tokenizer: no [CLS] added
    with pytest.raises(UserError, match=r"does not start a text with a special token"):
        task.collate(_rows(task), np.random.default_rng(0))


# ====================================================================== retromae


def test_retromae_collate(cls_bert_dir):
    task = _task("retromae", model=cls_bert_dir)
    rows = _rows(task)
    b = task.collate(rows, np.random.default_rng(5))                    # before build: the tokenizer loads lazily
    tok = task.tokenizer_and_limit()[0]
    B, L = b["input_ids"].shape
    assert set(b) == {"input_ids", "attention_mask", "labels", "decoder_input_ids", "decoder_labels",
                      "decoder_attention"}
    assert b["decoder_attention"].shape == (B, L, L) and b["decoder_attention"].dtype == torch.bool
    for i, text in enumerate(TEXTS):
        ids = tok(text)["input_ids"]
        n = len(ids)
        assert b["decoder_input_ids"][i, :n].tolist() == ids            # the decoder reads the unmasked text
        assert (b["attention_mask"][i, :n] == 1).all() and (b["attention_mask"][i, n:] == 0).all()
        dec = b["decoder_labels"][i]
        assert dec[0] == IGNORE and dec[n - 1] == IGNORE and (dec[n:] == IGNORE).all()   # [CLS], [SEP], pad
        assert dec[1:n - 1].tolist() == ids[1:n - 1]                    # every text token is a label
        lab, inp = b["labels"][i], b["input_ids"][i]
        masked = lab != IGNORE
        assert masked.sum() == max(1, round(0.3 * (n - 2)))
        assert not masked[0] and not masked[n - 1:].any()
        assert (inp[~masked] == b["decoder_input_ids"][i][~masked]).all()
        assert (lab[masked] == b["decoder_input_ids"][i][masked]).all()
    again = task.collate(rows, np.random.default_rng(5))
    assert all(torch.equal(b[k], again[k]) for k in b)
    other = task.collate(rows, np.random.default_rng(6))
    assert not torch.equal(b["labels"], other["labels"])
    # build after collate: the same batch
    task.build(torch.device("cpu"))
    built = task.collate(rows, np.random.default_rng(5))
    assert all(torch.equal(b[k], built[k]) for k in b)


def test_retromae_streams_and_decoder_attention(cls_bert_dir):
    task = _task("retromae", model=cls_bert_dir)
    module = task.build(torch.device("cpu")).eval()
    emb = module.encoder.model.embeddings
    torch.manual_seed(0)
    ids = torch.tensor([[2, 40, 41, 42, 43, 3], [2, 50, 51, 3, 0, 0]])
    cls = torch.randn(2, 1, 32)
    h1, h2 = module.streams(cls, ids)
    pos = emb.position_embeddings.weight[:6]
    assert torch.allclose(h1, cls + pos[None], atol=1e-6)               # h1 = cls + position embeddings
    assert torch.equal(h2[:, 0], cls[:, 0])                             # h2[0] = the sentence embedding
    assert torch.allclose(h2[:, 1:], emb(input_ids=ids)[:, 1:], atol=1e-6)
    # the decoder's attention: a hand computation, and only visible positions matter
    visible = torch.from_numpy(enhanced_decoding_mask(np.array([[1] * 6, [1] * 4 + [0] * 2]),
                                                      np.array([[1, 0, 0, 0, 0, 1], [1, 0, 0, 1, 1, 1]]), 0.5,
                                                      np.random.default_rng(2)))
    dec = module.decoder
    out = dec(h1, h2, visible=visible)
    H, Dh = 2, 16
    q = dec.query(h1).view(2, 6, H, Dh).transpose(1, 2)
    k = dec.key(h2).view(2, 6, H, Dh).transpose(1, 2)
    v = dec.value(h2).view(2, 6, H, Dh).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(Dh)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 6, 32)
    hid = dec.attn_norm(dec.dense(att) + h1)
    hand = dec.out_norm(dec.output(dec.act(dec.intermediate(hid))) + hid)
    assert torch.allclose(out, hand, atol=1e-5)
    row = 2
    hidden_col = int(np.flatnonzero(~visible[0, row].numpy())[-1])      # a column row 2 cannot see (itself at least)
    seen_col = int(np.flatnonzero(visible[0, row].numpy())[-1])
    for col, same in ((hidden_col, True), (seen_col, False)):
        h2b = h2.clone()
        h2b[0, col] += 1.0
        changed = dec(h1, h2b, visible=visible)
        assert torch.allclose(changed[0, row], out[0, row], atol=1e-6) == same


def test_retromae_loss_is_encoder_mlm_plus_decoder(cls_bert_dir):
    import torch.nn.functional as F

    task = _task("retromae", model=cls_bert_dir)
    module = task.build(torch.device("cpu")).eval()
    b = task.collate(_rows(task), np.random.default_rng(0))
    loss, metrics = task.loss(module, b)
    with torch.no_grad():
        hidden = module.encoder.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        logits = module.head(hidden)
        enc = F.cross_entropy(logits.view(-1, logits.shape[-1]), b["labels"].view(-1), ignore_index=IGNORE)
        h1, h2 = module.streams(hidden[:, :1], b["decoder_input_ids"])
        dlog = module.head(module.decoder(h1, h2, visible=b["decoder_attention"]))
        dec = F.cross_entropy(dlog.view(-1, dlog.shape[-1]), b["decoder_labels"].view(-1), ignore_index=IGNORE)
    assert metrics["enc_mlm"] == pytest.approx(float(enc), rel=1e-5)
    assert metrics["dec"] == pytest.approx(float(dec), rel=1e-5)
    assert float(loss.detach()) == pytest.approx(float(enc + dec), rel=1e-5)
    # the head's output matrix is the encoder's word embeddings (tied), and gradients reach the encoder
    out = module.head.predictions.decoder
    assert out.weight is module.encoder.model.get_input_embeddings().weight
    loss.backward()
    assert module.encoder.model.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert module.decoder.query.weight.grad.abs().sum() > 0


def _train(task, steps: int, lr: float = 3e-3, rows=None):
    module = task.build(torch.device("cpu"))
    opt = torch.optim.AdamW(module.parameters(), lr=lr)
    batch = task.collate(rows or _rows(task), np.random.default_rng(0))
    losses = []
    for _ in range(steps):
        loss, _ = task.loss(module, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return module, losses


def _check_saved(task, module, out, atol=1e-5):
    """Saved -> Encoder.load gives the module's own encoder embeddings, and sentence-transformers agrees."""
    from sentence_transformers import SentenceTransformer

    from embedder.encoder import Encoder

    task.save(module, str(out))
    enc = module.encoder.eval()
    loaded = Encoder.load(str(out), device="cpu")
    assert loaded.pooling == enc.pooling
    tok = loaded.tokenizer
    batch = tok(TEXTS[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        own = enc(batch["input_ids"], batch["attention_mask"]).numpy()
    got = loaded.encode(TEXTS[:4])
    assert got.shape == own.shape
    np.testing.assert_allclose(got, own, atol=atol)
    st = SentenceTransformer(str(out), device="cpu").encode(TEXTS[:4], convert_to_numpy=True)
    np.testing.assert_allclose(st, own, atol=atol)
    return loaded


def test_retromae_trains_and_saves_a_plain_encoder(cls_bert_dir, tmp_path):
    task = _task("retromae", model=cls_bert_dir)
    module, losses = _train(task, 15)
    assert losses[-1] < 0.8 * losses[0]
    loaded = _check_saved(task, module, tmp_path / "out")
    assert loaded.pooling == "cls"
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == ["BertModel"]                       # only the encoder: no head, no decoder
    assert json.loads((tmp_path / "out" / "1_Pooling" / "config.json").read_text())["pooling_mode_cls_token"]


def test_retromae_reuses_the_head_of_a_masked_lm_checkpoint(cls_bert_dir, tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    vocab = json.loads(open(f"{cls_bert_dir}/config.json").read())["vocab_size"]
    torch.manual_seed(3)
    lm = BertForMaskedLM(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, max_position_embeddings=128))
    lm.save_pretrained(tmp_path / "lm")
    AutoTokenizer.from_pretrained(cls_bert_dir).save_pretrained(tmp_path / "lm")
    module = _task("retromae", model=str(tmp_path / "lm")).build(torch.device("cpu"))
    assert torch.equal(module.head.predictions.transform.dense.weight, lm.cls.predictions.transform.dense.weight)
    assert torch.equal(module.encoder.model.get_input_embeddings().weight, lm.get_input_embeddings().weight)
    assert module.head.predictions.decoder.weight is module.encoder.model.get_input_embeddings().weight


# ====================================================================== retroar


def test_retroar_prefix_labels_causality_and_shift(cls_bert_dir, tmp_path):
    import torch.nn.functional as F

    task = _task("retroar", model=cls_bert_dir)
    rows = _rows(task)
    b = task.collate(rows, np.random.default_rng(1))
    assert set(b) == {"input_ids", "attention_mask", "labels", "decoder_input_ids", "decoder_labels"}
    tok = task.tokenizer_and_limit()[0]
    for i, text in enumerate(TEXTS):
        ids = tok(text)["input_ids"]
        n = len(ids)
        lab = b["decoder_labels"][i]
        assert lab[0] == IGNORE                                          # the prefix
        assert lab[1:n - 1].tolist() == ids[1:n - 1]
        assert lab[n - 1] == IGNORE and (lab[n:] == IGNORE).all()        # [SEP], padding
    module = task.build(torch.device("cpu")).eval()
    ids = b["decoder_input_ids"][:2]
    torch.manual_seed(0)
    cls = torch.randn(2, 1, 32)
    with torch.no_grad():
        out = module.decoder_hidden(cls, ids)
        for t in (3, 5):                                                 # causal: a token changes only t and later
            changed = ids.clone()
            changed[:, t] = (changed[:, t] + 7) % 700
            out2 = module.decoder_hidden(cls, changed)
            assert torch.allclose(out2[:, :t], out[:, :t], atol=1e-6)
            assert not torch.allclose(out2[:, t], out[:, t], atol=1e-4)
        cls2 = torch.randn(2, 1, 32)                                     # every position sees the prefix
        assert not torch.allclose(module.decoder_hidden(cls2, ids)[:, 0], out[:, 0], atol=1e-4)
        # the prefix is the sentence embedding in place of the [CLS] token
        x = module.decoder_inputs(cls, ids)
        words = module.encoder.model.get_input_embeddings()(ids)
        pos = module.positions.weight[:ids.shape[1]]
        assert torch.allclose(x[:, 0], module.norm(cls[:, 0] + pos[0]), atol=1e-5)
        assert torch.allclose(x[:, 1:], module.norm(words[:, 1:] + pos[1:]), atol=1e-5)
        # shift: the output at t predicts the token at t + 1 (hand cross-entropy)
        loss, metrics = task.loss(module, b)
        hidden = module.encoder.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        logits = module.lm_head(module.decoder_hidden(hidden[:, :1], b["decoder_input_ids"]))
        lab = b["decoder_labels"]
        pairs = [(i, t) for i in range(lab.shape[0]) for t in range(lab.shape[1] - 1) if lab[i, t + 1] != IGNORE]
        hand = torch.stack([F.cross_entropy(logits[i, t][None], lab[i, t + 1][None]) for i, t in pairs]).mean()
    assert metrics["dec"] == pytest.approx(float(hand), rel=1e-5)
    assert (0, 0) in pairs                                               # the prefix predicts the first token
    assert module.lm_head.out.weight is module.encoder.model.get_input_embeddings().weight
    module, losses = _train(task, 15)
    assert losses[-1] < 0.8 * losses[0]
    assert _check_saved(task, module, tmp_path / "ar").pooling == "cls"


# ====================================================================== custom


def test_custom_vocab_mismatch_is_a_clear_error(cls_bert_dir, tmp_path):
    doc = _bert(tmp_path / "doc", vocab_size=900, tokenizer_from=cls_bert_dir)
    task = _task("custom", model=cls_bert_dir, document_model=doc)
    main_v = json.loads(open(f"{cls_bert_dir}/config.json").read())["vocab_size"]
    with pytest.raises(UserError) as e:
        task.build(torch.device("cpu"))
    msg = str(e.value)
    assert "900" in msg and str(main_v) in msg and doc in msg and cls_bert_dir in msg
    with pytest.raises(UserError, match="900"):                         # collate checks too
        _task("custom", model=cls_bert_dir, document_model=doc).collate(_rows(task), np.random.default_rng(0))


def test_custom_trains_and_saves_the_document_encoder(cls_bert_dir, tmp_path):
    main_v = json.loads(open(f"{cls_bert_dir}/config.json").read())["vocab_size"]
    doc = _bert(tmp_path / "doc", vocab_size=main_v, hidden=48)         # no tokenizer of its own; wider
    task = _task("custom", model=cls_bert_dir, document_model=doc)
    module, losses = _train(task, 15)
    assert losses[-1] < 0.8 * losses[0]
    assert isinstance(module.project, torch.nn.Linear)                  # 48 -> 32 into the main vocabulary side
    assert module.head.predictions.decoder.weight is module.vocab_embeddings.word_embeddings.weight
    loaded = _check_saved(task, module, tmp_path / "out")
    assert loaded.dim == 48 and loaded.pooling == "cls"                 # the document encoder is what is saved
    assert loaded.tokenizer.get_vocab() == task.tokenizer_and_limit()[0].get_vocab()


# ====================================================================== mlm


def _mlm_config(tmp_path, **cfg):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_mlm_from_bert_and_roformer_configs(bert_dir, tmp_path):
    from tokenizers import Tokenizer

    n_tok = Tokenizer.from_file(f"{bert_dir}/tokenizer.json").get_vocab_size(with_added_tokens=True)
    for model_type, extra in (("bert", {}), ("roformer", {"embedding_size": 32})):
        d = tmp_path / model_type
        d.mkdir()
        task = _task("mlm", model_config=_mlm_config(d, model_type=model_type, **TINY, **extra), tokenizer=bert_dir)
        rows = _rows(task) * 2
        module, losses = _train(task, 30, lr=3e-3, rows=rows)
        assert type(module.encoder.model).__name__ == {"bert": "BertModel", "roformer": "RoFormerModel"}[model_type]
        cfg = module.encoder.model.config
        assert cfg.vocab_size == n_tok                                  # left out: the tokenizer's size
        assert cfg.pad_token_id == task.tokenizer_and_limit()[0].pad_token_id
        assert losses[-1] < 0.6 * losses[0], losses
        assert module.encoder.pooling == "mean"
        _check_saved(task, module, d / "out")


def test_mlm_config_dict_modernbert_and_errors(bert_dir, gpt_tokenizer_path, tmp_path):
    task = _task("mlm", model_config={"model_type": "modernbert", **TINY}, tokenizer=bert_dir)
    b = task.collate(_rows(task), np.random.default_rng(0))
    assert set(b) == {"input_ids", "attention_mask", "labels"}
    module = task.build(torch.device("cpu"))
    assert type(module.encoder.model).__name__ == "ModernBertModel"
    loss, metrics = task.loss(module, b)
    assert math.isfinite(float(loss.detach())) and set(metrics) == {"loss", "enc_mlm"}
    with pytest.raises(UserError, match=r"vocab_size 100 does not cover the tokenizer's \d+ tokens"):
        _task("mlm", model_config={"model_type": "bert", "vocab_size": 100, **TINY}, tokenizer=bert_dir).build("cpu")
    with pytest.raises(UserError, match="no 'model_type'"):
        _task("mlm", model_config={**TINY}, tokenizer=bert_dir).build("cpu")
    with pytest.raises(UserError, match="has no mask token"):           # a GPT byte-level BPE: no [MASK]
        _task("mlm", model_config={"model_type": "bert", **TINY}, tokenizer=gpt_tokenizer_path).build("cpu")
    with pytest.raises(UserError, match="needs its tokenizer"):
        _task("mlm", model_config={"model_type": "bert", **TINY})


def test_retromae_and_retroar_from_a_random_init(bert_dir, cls_bert_dir, tmp_path):
    """--model-config + --tokenizer start RetroMAE / RetroAR from a random-init encoder, saved with cls pooling;
    a tokenizer that puts no [CLS] first is a clear error."""
    from tokenizers import Tokenizer

    n_tok = Tokenizer.from_file(f"{cls_bert_dir}/tokenizer.json").get_vocab_size(with_added_tokens=True)
    for name in ("retromae", "retroar"):
        task = _task(name, model_config={"model_type": "bert", **TINY}, tokenizer=cls_bert_dir)
        module, losses = _train(task, 30, lr=3e-3, rows=_rows(task) * 2)
        assert type(module.encoder.model).__name__ == "BertModel"
        assert module.encoder.model.config.vocab_size == n_tok and module.encoder.pooling == "cls"
        assert module.encoder.max_length == 32                          # max_length 32 < 64 positions
        assert losses[-1] < 0.6 * losses[0], losses
        _check_saved(task, module, tmp_path / name)
    with pytest.raises(UserError, match="does not start a text with a special token"):
        _task("retromae", model_config={"model_type": "bert", **TINY}, tokenizer=bert_dir).build("cpu")


def test_model_config_options_are_checked(bert_dir):
    cfg = {"model_type": "bert", **TINY}
    for name in ("contrastive", "custom"):                              # they start from trained encoders
        with pytest.raises(UserError, match=f"task {name} starts from a trained encoder"):
            _task(name, model_config=cfg, tokenizer=bert_dir, document_model=bert_dir)
    with pytest.raises(UserError, match="--tokenizer .* goes with --model-config"):
        _task("retromae", tokenizer=bert_dir)                           # would be ignored: the model's own is used
    with pytest.raises(UserError, match="both --model .* and --model-config"):
        _task("mlm", model=bert_dir, model_config=cfg, tokenizer=bert_dir)
    with pytest.raises(UserError, match="task retroar builds a new encoder from model_config and needs its tokenizer"):
        _task("retroar", model_config=cfg)


def test_mlm_sentencepiece_tokenizer_file(tmp_path):
    """train-tokenizer's sentencepiece kind (<unk> <s> </s>) has no mask token: a clear error; the same kind
    with <pad> and <mask> loads from its tokenizer.json with those special tokens found by name."""
    from tokenizers import SentencePieceBPETokenizer

    kinds = {"plain": ["<unk>", "<s>", "</s>"], "masked": ["<unk>", "<s>", "</s>", "<pad>", "<mask>"]}
    for name, specials in kinds.items():
        sp = SentencePieceBPETokenizer(unk_token="<unk>")
        sp.train_from_iterator(TEXTS * 3, vocab_size=300, min_frequency=1, special_tokens=specials,
                               show_progress=False)
        (tmp_path / name).mkdir()
        sp.save(str(tmp_path / name / "tokenizer.json"))
    cfg = {"model_type": "bert", **TINY}
    with pytest.raises(UserError, match=r"tokenizer of '.*plain' has no mask token \(\[MASK\] or <mask>\)"):
        _task("mlm", model_config=cfg, tokenizer=str(tmp_path / "plain")).build("cpu")
    task = _task("mlm", model_config=cfg, tokenizer=str(tmp_path / "masked" / "tokenizer.json"))
    tok = task.tokenizer_and_limit()[0]
    assert (tok.mask_token, tok.pad_token, tok.unk_token) == ("<mask>", "<pad>", "<unk>")
    b = task.collate(_rows(task), np.random.default_rng(0))
    assert (b["labels"] != IGNORE).any()
    assert not ((b["labels"] != IGNORE) & (b["attention_mask"] == 0)).any()
    module = task.build("cpu")
    assert module.encoder.model.config.pad_token_id == tok.pad_token_id
    loss, _ = task.loss(module, b)
    assert math.isfinite(float(loss.detach()))


# ====================================================================== through the one training loop


@pytest.mark.parametrize("name", ["retromae", "retroar"])
def test_trainer_resume_is_exact_for_masking_tasks(name, cls_bert_dir, tmp_path):
    """The masks are drawn only from the rng the trainer passes to collate: a run stopped at step 2 and
    resumed gives the uninterrupted run's per-step losses (and metrics) and final weights exactly."""
    from safetensors.torch import load_file

    from embedder.trainer import TrainConfig, train

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))

    def cfg(out, **kw):
        return TrainConfig(task=name, train_file=str(rows), output_dir=str(tmp_path / out), lr=1e-3,
                           batch_size=4, max_steps=4, progress=False, device="cpu",
                           options=TaskOptions(model=cls_bert_dir, max_length=32), **kw)

    whole = train(cfg("whole"))
    assert train(cfg("parts", stop_after=2))["step"] == 2
    second = train(cfg("parts", resume="latest"))
    assert second["finished"]

    def log(d):
        return [json.loads(x) for x in open(f"{d}/loss_log.jsonl")]

    la, lb = log(whole["output_dir"]), log(second["output_dir"])
    assert [r["step"] for r in lb] == [1, 2, 3, 4] and la == lb
    assert {"enc_mlm", "dec"} <= set(la[0])
    a = load_file(f"{whole['output_dir']}/model.safetensors")
    b = load_file(f"{second['output_dir']}/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
