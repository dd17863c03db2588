"""The one training loop (embedder.trainer): schedule, gradient accumulation, exact resume, 2 Ray Train workers
vs 1, and the `train` command as a user meets it. Tiny random-init BERTs, CPU only."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from embedder.errors import UserError
from embedder.tasks.base import Task, TaskOptions
from embedder.trainer import (CHECKPOINTS, LOSS_LOG, META_FILE, TRAINING_ARGS, TrainConfig, linear_warmup_decay,
                              list_checkpoints, train)
from retro_pipeline.cli import cli


# ---------------------------------------------------------------------- a small task of the test's own


class PairModule(torch.nn.Module):
    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def embed(self, ids, mask):
        h = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)

    def forward(self, q_ids, q_mask, d_ids, d_mask):
        return self.embed(q_ids, q_mask), self.embed(d_ids, d_mask)


class PairTask(Task):
    """Query/positive pairs on a mean-pooled tiny BERT. ``extra``: ``loss`` "row" (1 - cos per row: separable
    over rows) or "inbatch" (InfoNCE over the gathered positives), ``noise`` (share of tokens the collate
    masks, drawn from the rng it is given), ``dropout``."""

    name = "pairs-test"
    row_kind = "pairs"

    def build(self, device):
        from transformers import AutoModel

        p = float(self.options.extra.get("dropout", 0.0))
        bert = AutoModel.from_pretrained(self.options.model, hidden_dropout_prob=p, attention_probs_dropout_prob=p)
        return PairModule(bert).to(device)

    def _tok(self):
        if not hasattr(self, "_tokenizer"):
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.options.model)
        return self._tokenizer

    def check_row(self, row, where):
        if not isinstance(row.get("query"), str) or not isinstance(row.get("positive"), str):
            raise UserError(f"{where}: a row needs string fields 'query' and 'positive'")
        return {"query": row["query"], "positive": row["positive"]}

    def collate(self, rows, rng):
        tok = self._tok()
        out = {}
        for key, field in (("q", "query"), ("d", "positive")):
            enc = tok([r[field] for r in rows], padding=True, truncation=True, max_length=self.options.max_length,
                      return_tensors="np", return_special_tokens_mask=True)
            ids = enc["input_ids"].copy()
            noise = float(self.options.extra.get("noise", 0.0))
            if noise:
                hide = (rng.random(ids.shape) < noise) & (enc["special_tokens_mask"] == 0) & (enc["attention_mask"] == 1)
                ids[hide] = tok.mask_token_id
            out[f"{key}_ids"] = torch.from_numpy(ids)
            out[f"{key}_mask"] = torch.from_numpy(enc["attention_mask"])
        return out

    def loss(self, module, batch, gather=None):
        q, d = module(**batch)
        if self.options.extra.get("loss", "row") == "row":
            loss = (1 - F.cosine_similarity(q, d, dim=-1)).mean()
            return loss, {}
        q, d = F.normalize(q, dim=-1), F.normalize(d, dim=-1)
        offset = 0
        if gather is not None:
            d, offset = gather(d), gather.rank * q.shape[0]
        logits = q @ d.T / 0.1
        loss = F.cross_entropy(logits, torch.arange(q.shape[0]) + offset)
        return loss, {"acc": float((logits.argmax(-1) == torch.arange(q.shape[0]) + offset).float().mean())}

    def save(self, module, output_dir):
        from embedder.encoder import Encoder

        Encoder(getattr(module, "module", module).bert, self._tok(), pooling="mean",
                max_length=self.options.max_length).save(output_dir)


def _pairs(corpus_texts, n=32):
    words = " ".join(corpus_texts[:40]).split()
    rows = []
    for i in range(n):
        w = words[i * 17:(i * 17) + 24]
        rows.append({"query": " ".join(w[:6]), "positive": " ".join(w[4:20])})
    return rows


@pytest.fixture()
def pairs_file(tmp_path, corpus_texts):
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in _pairs(corpus_texts)))
    return str(p)


def _cfg(tmp_path, name, tiny_bert_dir, pairs_file, **kw):
    extra = kw.pop("extra", {})
    return TrainConfig(task=PairTask, train_file=pairs_file, output_dir=str(tmp_path / name),
                       options=TaskOptions(model=tiny_bert_dir, max_length=32, extra=extra),
                       lr=kw.pop("lr", 1e-3), progress=False, **kw)


def _weights(output_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(output_dir, "model.safetensors"))


def _losses(output_dir):
    with open(os.path.join(output_dir, LOSS_LOG)) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------- schedule


def test_warmup_then_linear_decay():
    f = linear_warmup_decay(4, 12)
    assert [f(s) for s in range(14)] == pytest.approx(
        [0, .25, .5, .75, 1, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0, 0])
    g = linear_warmup_decay(0, 5)
    assert [g(s) for s in range(6)] == pytest.approx([1, .8, .6, .4, .2, 0])
    # as the optimizer sees it: LambdaLR with these multipliers, one scheduler step per optimizer step
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=2.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_decay(2, 6))
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0, 1, 2, 1.5, 1, .5])


# ---------------------------------------------------------------------- accumulation, logs, outputs


def test_grad_accum_equals_one_big_batch(tmp_path, tiny_bert_dir, pairs_file):
    big = train(_cfg(tmp_path, "big", tiny_bert_dir, pairs_file, batch_size=8, max_steps=1, warmup_steps=0))
    acc = train(_cfg(tmp_path, "acc", tiny_bert_dir, pairs_file, batch_size=8, grad_accum=4, max_steps=1,
                     warmup_steps=0))
    assert big["step"] == acc["step"] == 1 and big["finished"]
    a, b = _weights(big["output_dir"]), _weights(acc["output_dir"])
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k] - b[k]).abs().reshape(-1) for k in a])
    # one AdamW step moves a weight by up to lr (1e-3) whatever its gradient's size (lr * g / (|g| + eps)), so
    # float32 summation order (batched vs accumulated, torch's threaded reductions run to run) shows on the few
    # weights whose gradient is near eps: up to 1.3e-5 measured on one in a clean-clone CI run. An accumulation
    # that dropped or mis-weighted a micro-batch changes every gradient: all but a few weights within 1e-6 (0.1%
    # of a step), none beyond 5% of a step.
    worst, off = float(diff.max()), float((diff > 1e-6).float().mean())
    assert worst <= 5e-5 and off <= 1e-3, (worst, off)
    start = _weights_start(tiny_bert_dir)
    assert any(not torch.equal(a[k], start[k]) for k in a)  # it did train
    assert _losses(big["output_dir"])[0]["loss"] == pytest.approx(_losses(acc["output_dir"])[0]["loss"], rel=1e-5)
    # what a finished run leaves: an encoder (plus its own logs) that Encoder.load takes
    out = big["output_dir"]
    args = json.load(open(os.path.join(out, TRAINING_ARGS)))
    assert args["batch_size"] == 8 and args["task"] == "pairs-test" and args["max_steps_resolved"] == 1
    from embedder.encoder import Encoder

    enc = Encoder.load(out, device="cpu")
    assert enc.encode(["hello world"]).shape == (1, 32)


def _weights_start(tiny_bert_dir):
    from safetensors.torch import load_file

    return {f"{k}" if k.startswith("bert.") else k: v for k, v in load_file(f"{tiny_bert_dir}/model.safetensors").items()}


# ---------------------------------------------------------------------- exact resume


def test_resume_continues_exactly(tmp_path, tiny_bert_dir, pairs_file):
    kw = dict(batch_size=8, max_steps=6, warmup_steps=2, extra={"noise": 0.2, "dropout": 0.1, "loss": "inbatch"})
    whole = train(_cfg(tmp_path, "whole", tiny_bert_dir, pairs_file, **kw))
    first = train(_cfg(tmp_path, "parts", tiny_bert_dir, pairs_file, stop_after=3, **kw))
    assert first["step"] == 3 and not first["finished"]
    parts = os.path.join(str(tmp_path), "parts")
    assert os.path.isdir(os.path.join(parts, CHECKPOINTS, "step-3"))
    assert not os.path.exists(os.path.join(parts, "model.safetensors"))  # no final model from a stopped run
    second = train(_cfg(tmp_path, "parts", tiny_bert_dir, pairs_file, resume="latest", **kw))
    assert second["resumed_from"].endswith("step-3") and second["finished"]
    a, b = _weights(whole["output_dir"]), _weights(second["output_dir"])
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run's"
    la, lb = _losses(whole["output_dir"]), _losses(second["output_dir"])
    assert [r["step"] for r in lb] == [1, 2, 3, 4, 5, 6]
    assert la == lb
    # the checkpoint itself loads with weights_only
    state = torch.load(os.path.join(parts, CHECKPOINTS, "step-3", "trainer_state.pt"), weights_only=True)
    assert state["step"] == 3 and {"model", "optimizer", "scheduler", "scaler", "rng"} <= state.keys()


def test_epochs_keep_checkpoints_and_resume_checks(tmp_path, tiny_bert_dir, pairs_file):
    cfg = _cfg(tmp_path, "ep", tiny_bert_dir, pairs_file, batch_size=8, epochs=1, save_every=1, keep_checkpoints=2)
    s = train(cfg)
    assert s["max_steps"] == 4 and s["step"] == 4  # 32 rows / 8 per batch
    ckpts = sorted(os.listdir(os.path.join(s["output_dir"], CHECKPOINTS)))
    assert ckpts == ["step-3", "step-4"]
    assert json.load(open(os.path.join(s["output_dir"], TRAINING_ARGS)))["steps_per_epoch"] == 4
    step3 = os.path.join(s["output_dir"], CHECKPOINTS, "step-3")
    with pytest.raises(UserError, match="seed"):
        train(_cfg(tmp_path, "ep", tiny_bert_dir, pairs_file, batch_size=8, epochs=1, seed=1, resume=step3))
    with pytest.raises(UserError, match="not a checkpoint directory"):
        train(_cfg(tmp_path, "ep", tiny_bert_dir, pairs_file, batch_size=8, epochs=1, resume=str(tmp_path)))
    again = train(dataclasses.replace(cfg, resume=step3, save_every=None))  # an explicit checkpoint path
    assert again["resumed_from"] == step3 and [r["step"] for r in _losses(again["output_dir"])] == [1, 2, 3, 4]


def test_resume_refuses_another_model(tmp_path, tiny_bert_dir, pairs_file):
    """A resume must build the model the checkpoint was trained from: another --model is refused by name, and
    the same path whose model files changed shape is a one-line error, not a state-dict traceback."""
    import shutil

    from transformers import BertConfig, BertModel

    model = tmp_path / "m"
    shutil.copytree(tiny_bert_dir, model)
    kw = dict(batch_size=8, max_steps=4, stop_after=2)
    train(_cfg(tmp_path, "run", str(model), pairs_file, **kw))
    with pytest.raises(UserError, match=r"written with model='.*m', this run has model='.*tiny_bert"):
        train(_cfg(tmp_path, "run", tiny_bert_dir, pairs_file, resume="latest", **kw))
    cfg = json.load(open(model / "config.json"))
    BertModel(BertConfig(**{**cfg, "hidden_size": 48, "intermediate_size": 96})).save_pretrained(model)
    with pytest.raises(UserError, match=r"--model .*m: its files changed since that checkpoint was written"):
        train(_cfg(tmp_path, "run", str(model), pairs_file, resume="latest", **kw))
    # a checkpoint without content digests (as older ones are): the changed shape is still a one-line error
    (_, ckpt), = list_checkpoints(str(tmp_path / "run"))
    meta = json.loads((ckpt / META_FILE).read_text())
    del meta["inputs"]
    (ckpt / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"checkpoint's weights do not fit the model this run builds \(size mismatch"):
        train(_cfg(tmp_path, "run", str(model), pairs_file, resume="latest", **kw))


def test_resume_refuses_changed_training_data_and_tokenizer_files(tmp_path, tiny_bert_dir, pairs_file):
    """Same paths, other contents: a resume would go on with other rows (or another vocabulary) than the run
    it continues, so it is refused naming the option; unchanged inputs resume, and the weights alone may
    differ (the checkpoint holds the trained ones)."""
    import shutil

    model, data = tmp_path / "m", tmp_path / "data" / "pairs.jsonl"
    shutil.copytree(tiny_bert_dir, model)
    data.parent.mkdir()
    shutil.copy(pairs_file, data)
    kw = dict(batch_size=8, max_steps=4, stop_after=2)
    train(_cfg(tmp_path, "run", str(model), str(data), **kw))
    rows = data.read_text().splitlines()
    data.write_text("\n".join(rows[1:] + rows[:1]) + "\n")          # same rows and size, another order
    with pytest.raises(UserError, match=r"--train-file .*pairs.jsonl: its file changed since that checkpoint"):
        train(_cfg(tmp_path, "run", str(model), str(data), resume="latest", **kw))
    other = tmp_path / "data" / "other.jsonl"
    shutil.copy(pairs_file, other)
    with pytest.raises(UserError, match=r"written with train_file='.*pairs.jsonl', this run has train_file='.*other"):
        train(_cfg(tmp_path, "run", str(model), str(other), resume="latest", **kw))
    shutil.copy(pairs_file, data)
    tok_file = model / "tokenizer.json"
    original = tok_file.read_bytes()
    tok = json.loads(original)
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]                           # two token ids swapped: same sizes
    tok_file.write_text(json.dumps(tok))
    with pytest.raises(UserError, match=r"--model .*m: its files changed since that checkpoint was written"):
        train(_cfg(tmp_path, "run", str(model), str(data), resume="latest", **kw))
    tok_file.write_bytes(original)
    weights = next(p for p in model.iterdir() if p.name.endswith((".safetensors", ".bin")))
    os.utime(weights)                                                  # touched weights alone: still resumable
    done = train(_cfg(tmp_path, "run", str(model), str(data), resume="latest", batch_size=8, max_steps=4))
    assert done["finished"] and done["step"] == 4, done


# ---------------------------------------------------------------------- 2 Ray Train workers vs 1

RTOL = 1e-4  # per-step losses of 2 workers vs 1, same global batch (measured ~1e-7)


@pytest.mark.slow  # two Ray Train runs (12-16 s)
def test_two_ray_workers_match_one(tmp_path, tiny_bert_dir, pairs_file, ray_session):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    kw = dict(batch_size=8, max_steps=4, warmup_steps=1, extra={"loss": "inbatch"})
    one = train(_cfg(tmp_path, "one", tiny_bert_dir, pairs_file, **kw))
    two = train(_cfg(tmp_path, "two", tiny_bert_dir, pairs_file, num_workers=2, save_every=2, **kw))
    assert two["num_workers"] == 2 and two["finished"]
    l1 = np.array([r["loss"] for r in _losses(one["output_dir"])])
    l2 = np.array([r["loss"] for r in _losses(two["output_dir"])])
    assert len(l1) == len(l2) == 4
    diff = float(np.max(np.abs(l1 - l2) / np.abs(l1)))
    print(f"1 vs 2 workers: losses {l1.tolist()} vs {l2.tolist()}, max rel. diff {diff:.2e}")
    assert diff <= RTOL, (l1, l2)
    assert l1[-1] < l1[0]  # it learns
    a, b = _weights(one["output_dir"]), _weights(two["output_dir"])
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    assert os.path.isdir(os.path.join(two["output_dir"], CHECKPOINTS, "step-2"))


@pytest.mark.slow  # two Ray Train workers (~10 s)
def test_contrastive_two_workers_with_grad_accum_match_one_big_batch(tmp_path, tiny_bert_dir, corpus_texts,
                                                                    ray_session):
    """Contrastive InfoNCE (in-batch negatives across workers through gather, whole-batch loss through gradient
    caching): 2 workers x --grad-accum 2 follow one worker's one big batch (no dropout)."""
    from transformers import AutoTokenizer, BertModel

    model = str(tmp_path / "nodrop")
    BertModel.from_pretrained(tiny_bert_dir, hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0).save_pretrained(model)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(model)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"query": r["query"], "pos": r["positive"]}) + "\n"
                            for r in _pairs(corpus_texts, 32)))
    runs = []
    for name, workers, accum in (("one", 1, 1), ("two", 2, 2)):
        runs.append(train(TrainConfig(task="contrastive", train_file=str(data), output_dir=str(tmp_path / name),
                                      options=TaskOptions(model=model, max_length=32), lr=1e-3, batch_size=16,
                                      grad_accum=accum, num_workers=workers, max_steps=3, warmup_steps=0,
                                      progress=False)))
    l1, l2 = (np.array([r["loss"] for r in _losses(x["output_dir"])]) for x in runs)
    assert len(l1) == len(l2) == 3 and l1[-1] < l1[0]
    np.testing.assert_allclose(l2, l1, rtol=RTOL)
    a, b = _weights(runs[0]["output_dir"]), _weights(runs[1]["output_dir"])
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


@pytest.mark.slow  # two Ray Train workers (~8 s)
def test_two_workers_take_relative_paths_where_the_user_typed_them(tmp_path, tiny_bert_dir, corpus_texts,
                                                                    ray_session, monkeypatch):
    """`train --num-workers 2` with the README's relative --train-file, --output-dir and --model: the workers
    read and the model lands where the command ran, not in Ray's session directory."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_bert_dir, "m")
    os.makedirs("pairs")
    with open("pairs/train.jsonl", "w") as f:
        f.write("".join(json.dumps({"query": r["query"], "pos": r["positive"]}) + "\n" for r in _pairs(corpus_texts, 8)))
    r = CliRunner().invoke(cli, ["train", "--task", "contrastive", "--model", "m", "--train-file", "pairs/train.jsonl",
                                 "--output-dir", "dp_rel", "--num-workers", "2", "--max-steps", "1",
                                 "--batch-size", "4", "--max-length", "32", "--no-progress"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert os.path.isfile(tmp_path / "dp_rel" / "model.safetensors"), os.listdir(tmp_path / "dp_rel")
    args = json.load(open(tmp_path / "dp_rel" / TRAINING_ARGS))
    assert args["train_file"] == str(tmp_path / "pairs" / "train.jsonl")
    assert args["options"]["model"] == str(tmp_path / "m")



def test_workers_check_they_see_the_drivers_paths(tmp_path, pairs_file, tiny_bert_dir):
    """On a cluster, a Ray Train worker on another node must see --output-dir (the driver's check file in it),
    --train-file and local models at the same paths: otherwise one line naming the node and the fix (a
    multi-node run without a shared filesystem saved nothing where the user looked)."""
    from embedder.train_ray import PROBE, check_shared_paths

    probe = PROBE.format("abc")
    out = tmp_path / "out"
    out.mkdir()
    cfg = TrainConfig(task="contrastive", train_file=pairs_file, output_dir=str(out),
                      options=TaskOptions(model=tiny_bert_dir))
    with pytest.raises(UserError) as e:
        check_shared_paths(cfg, probe, "10.0.0.9")
    assert "--output-dir" in str(e.value) and "10.0.0.9" in str(e.value) and "shared" in str(e.value) or \
        "every node mounts" in str(e.value)
    (out / probe).touch()
    check_shared_paths(cfg, probe, "10.0.0.9")               # all there: no error
    check_shared_paths(dataclasses.replace(cfg, options=TaskOptions(model="org/hub-model")), probe, "n")  # a hub id
    for bad, flag in ((dataclasses.replace(cfg, train_file=str(tmp_path / "gone.jsonl")), "--train-file"),
                      (dataclasses.replace(cfg, options=TaskOptions(model=str(tmp_path / "gone"))), "--model")):
        with pytest.raises(UserError, match=f"^{flag} .*gone.*not found on node 10.0.0.9; .*every node mounts"):
            check_shared_paths(bad, probe, "10.0.0.9")


# ---------------------------------------------------------------------- checks and the command line


def test_batch_that_does_not_divide_is_a_user_error(tmp_path, tiny_bert_dir, pairs_file):
    with pytest.raises(UserError, match="does not divide"):
        train(_cfg(tmp_path, "x", tiny_bert_dir, pairs_file, batch_size=6, grad_accum=4, max_steps=1))
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="pip install tensorboard"):
            train(_cfg(tmp_path, "x", tiny_bert_dir, pairs_file, batch_size=8, max_steps=1,
                       tensorboard=str(tmp_path / "tb")))


def test_train_help_explains_the_options():
    r = CliRunner().invoke(cli, ["train", "--help"])
    assert r.exit_code == 0, r.output
    for flag in ("--task", "--model", "--train-file", "--output-dir", "--max-steps", "--epochs", "--batch-size",
                 "--grad-accum", "--precision", "--save-every", "--resume", "--tensorboard", "--num-workers",
                 "--matryoshka-dims", "--mask-ratio", "--temperature"):
        assert flag in r.output, flag


RAY_FORWARDED = re.compile(r"^(\x1b\[\d+m)?\(\w+ pid=\d+(, ip=[\d.]+)?\)")


def test_train_bad_file_is_one_line(tmp_path, tiny_bert_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "fine", "pos": "also fine"}\n{not json\n')
    for path, words in ((tmp_path / "missing.jsonl", ["missing.jsonl"]), (bad, [f"{bad}:2"])):
        r = CliRunner().invoke(cli, ["train", "--task", "contrastive", "--model", tiny_bert_dir, "--train-file", str(path),
                                     "--output-dir", str(tmp_path / "out"), "--max-steps", "1", "--no-progress"])
        assert r.exit_code == 2, (r.output, r.exception)
        # Ray forwards lines of actors left from earlier tests in this session's Ray (Ray Train's
        # PlacementGroupCleaner) to whatever stderr is current: "(Name pid=N) ...", never this command's own
        lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not RAY_FORWARDED.match(ln)]
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.stderr
        for w in words:
            assert w in lines[0], (w, lines[0])


@pytest.mark.parametrize("task", ["contrastive", "retromae"])
def test_train_command_end_to_end(tmp_path, cls_bert_dir, corpus_texts, task):
    """The command as a user runs it, on a tiny JSONL: a few steps, an encoder that loads, `evaluate` on it."""
    pytest.importorskip(f"embedder.tasks.{task}")
    data = tmp_path / "rows.jsonl"
    if task == "contrastive":
        rows = [{"query": r["query"], "pos": r["positive"]} for r in _pairs(corpus_texts, 16)]
    else:
        rows = [{"text": t[:300]} for t in corpus_texts[:16]]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "enc"
    r = CliRunner().invoke(cli, ["train", "--task", task, "--model", cls_bert_dir, "--train-file", str(data),
                                 "--output-dir", str(out), "--max-steps", "3", "--batch-size", "4", "--lr", "1e-3",
                                 "--max-length", "32", "--save-every", "2", "--no-progress"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert "trained" in r.output and str(out) in r.output
    losses = _losses(str(out))
    assert [x["step"] for x in losses] == [1, 2, 3] and all(math.isfinite(x["loss"]) for x in losses)
    assert os.path.isdir(out / CHECKPOINTS / "step-2") and os.path.isfile(out / TRAINING_ARGS)
    from embedder.encoder import Encoder

    enc = Encoder.load(str(out), device="cpu")
    assert enc.encode(["a short text"]).shape == (1, 32)
    if task == "contrastive":
        e = CliRunner().invoke(cli, ["evaluate", "--model", str(out), "--eval-file", str(data), "--json"])
        assert e.exit_code == 0, (e.output, e.exception)
        metrics = json.loads(e.stdout.strip().splitlines()[-1])
        assert 0 <= metrics["mrr@10"] <= 1 and metrics["n_queries"] == 16


@pytest.mark.parametrize("task", ["retromae", "retroar", "mlm", "custom", "contrastive"])
def test_one_tiny_step_from_a_pretrained_encoder_keeps_its_weights(tmp_path, cls_bert_dir, corpus_texts, task):
    """One step at lr 1e-9 from a trained encoder moves each weight by about 1e-9 (AdamW's first step is lr
    times the gradient's sign): the saved encoder equals the one it started from within float noise, for every
    task. A task that re-initialised any encoder layer changes it by ~100%."""
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"query": r["query"], "pos": r["positive"]}) + "\n"
                            for r in _pairs(corpus_texts, 8)))
    start_dir = cls_bert_dir
    extra = []
    if task == "custom":   # the document encoder is the one trained and saved: a second pretrained model
        from transformers import BertModel

        torch.manual_seed(5)
        doc = BertModel.from_pretrained(cls_bert_dir)
        with torch.no_grad():
            for p in doc.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        start_dir = str(tmp_path / "doc")
        doc.save_pretrained(start_dir)
        extra = ["--document-model", start_dir]
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["train", "--task", task, "--model", cls_bert_dir, "--train-file", str(data),
                                 "--output-dir", str(out), "--max-steps", "1", "--batch-size", "4", "--lr", "1e-9",
                                 "--warmup-steps", "0", "--max-length", "32", "--no-progress", *extra])
    assert r.exit_code == 0, (r.output, r.exception)
    from safetensors.torch import load_file

    before = load_file(os.path.join(start_dir, "model.safetensors"))
    after = _weights(str(out))
    assert set(after) == set(before), set(after) ^ set(before)
    moved = {k: float((after[k] - before[k]).abs().max()) for k in before}
    worst = max(moved, key=moved.get)
    assert moved[worst] <= 1e-6, (worst, moved[worst])
    assert _losses(str(out))[0]["step"] == 1             # it did take its step


def test_train_unreachable_address_fails_fast(tmp_path, tiny_bert_dir, pairs_file):
    """`train --address` at a dead host:port is a one-line error in seconds, not a Ray connect retry loop."""
    import subprocess
    import time

    from helpers import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "retro_pipeline.cli", "train", "--task", "contrastive", "--model",
                        tiny_bert_dir, "--train-file", pairs_file, "--output-dir", str(tmp_path / "out"),
                        "--max-steps", "1", "--num-workers", "2", "--address", f"127.0.0.1:{port}", "--no-progress"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: --address 127.0.0.1:{port}"), r.stderr[-2000:]
    assert time.monotonic() - t0 < 60 and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- tasks declare their options


def test_a_registered_task_gets_its_flags_help_checkpoint_settings_and_resume_check(tmp_path, tiny_bert_dir,
                                                                                   pairs_file):
    """A task is one module: registering one (here a module made in the test) gives `train --task` its name,
    its declared option as a flag with its help, the option's value in checkpoints, and a resume that
    refuses another value; another task refuses the flag."""
    import types

    from embedder.options import Option
    from embedder.tasks import register_task, unregister_task

    class ToyTask(PairTask):
        name = "toy"
        summary = "a test's own task"
        OPTIONS = PairTask.OPTIONS + (Option("noise_level", float, 0.0, "Share of tokens the toy masks.",
                                             minimum=0, maximum=1),)

        def __init__(self, options=None):
            super().__init__(options)
            self.options.extra["noise"] = self.options.noise_level

    module = types.ModuleType("toy_task_module")
    module.TASK = ToyTask
    sys.modules[module.__name__] = module
    register_task("toy", module.__name__)
    try:
        h = CliRunner().invoke(cli, ["train", "--help"])
        assert h.exit_code == 0 and "--noise-level" in h.output and "toy: share of tokens the toy masks" in \
            " ".join(h.output.split()) and "a test's own task" in " ".join(h.output.split()), h.output
        out = str(tmp_path / "toy")
        args = ["train", "--task", "toy", "--model", tiny_bert_dir, "--train-file", pairs_file, "--output-dir", out,
                "--max-steps", "2", "--batch-size", "4", "--max-length", "32", "--save-every", "1", "--no-progress"]
        r = CliRunner().invoke(cli, [*args, "--noise-level", "0.2", "--stop-after", "1"])
        assert r.exit_code == 0, (r.output, r.exception)
        meta = json.load(open(os.path.join(out, CHECKPOINTS, "step-1", META_FILE)))
        assert meta["task_options"] == {"max_length": 32, "pooling": None, "noise_level": 0.2}
        r = CliRunner().invoke(cli, [*args, "--noise-level", "0.3", "--resume", "latest"])
        assert r.exit_code == 2 and "--noise-level 0.2" in r.output and "--noise-level 0.3" in r.output, r.output
        r = CliRunner().invoke(cli, [*args, "--noise-level", "0.2", "--resume", "latest"])
        assert r.exit_code == 0 and "trained toy for 2 steps" in r.output, (r.output, r.exception)
        assert json.load(open(os.path.join(out, TRAINING_ARGS)))["options"]["noise_level"] == 0.2
        r = CliRunner().invoke(cli, ["train", "--task", "contrastive", "--train-file", pairs_file, "--output-dir",
                                     str(tmp_path / "c"), "--noise-level", "0.1"])
        assert r.exit_code == 2 and "--noise-level: an option of task toy, not of task contrastive" in r.output
        with pytest.raises(UserError, match="must be at most 1"):           # the declaration checks values
            ToyTask(TaskOptions(noise_level=2.0))
    finally:
        unregister_task("toy")
        sys.modules.pop(module.__name__, None)
    assert "--noise-level" not in CliRunner().invoke(cli, ["train", "--help"]).output


@pytest.mark.slow  # a 2-worker Ray Train process, stopped
def test_sigterm_stops_a_two_worker_run_at_once(tmp_path, tiny_bert_dir, corpus_texts):
    """Ray Train's fit waits in a ray.get that never runs the command's SIGTERM handler: the wait is made
    interruptible, so SIGTERM stops a 2-worker run in seconds with the one-line resume hint (it went on to the
    end before)."""
    import signal
    import subprocess
    import time

    from helpers import env_without_ray_address

    out = tmp_path / "run"
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": r["query"], "pos": r["positive"]}) + "\n"
                             for r in _pairs(corpus_texts, 16)))
    proc = subprocess.Popen([sys.executable, "-m", "retro_pipeline", "train", "--task", "contrastive", "--model",
                             tiny_bert_dir, "--train-file", str(pairs), "--output-dir", str(out), "--max-steps",
                             "100000", "--batch-size", "4", "--max-length", "32", "--num-workers", "2",
                             "--save-every", "1", "--no-progress"], env=env_without_ray_address(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not list((out / CHECKPOINTS).glob("step-*")):
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.5)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        stopped_in = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = proc.stderr.read()
    assert proc.returncode == 143 and stopped_in < 30, (proc.returncode, stopped_in, err[-3000:])
    own = [ln for ln in err.splitlines() if ln.strip() and not RAY_FORWARDED.match(ln)]   # not Ray's forwarded
    assert len(own) == 1 and own[0].startswith("error: terminated") and "--resume latest" in own[0], err[-3000:]
