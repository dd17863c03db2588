"""`train` stopped and started again, as a user meets it (issue 23): Ctrl-C / SIGTERM say how to go on
(`--resume latest` from the newest checkpoint), a rerun without --resume never writes over an earlier run's
checkpoints or final model, `--resume latest` with nothing to resume says so, and `evaluate --model` names
what it was given and what to pass. Tiny random-init BERT (conftest), CPU, the command through CliRunner."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import time

import pytest
from click.testing import CliRunner

from retro_pipeline.cli import cli

RAY_FORWARDED = re.compile(r"^(\x1b\[\d+m)?\(\w+ pid=\d+(, ip=[\d.]+)?\)")   # lines of Ray actors of other tests


@pytest.fixture()
def data(tmp_path, corpus_texts):
    words = " ".join(corpus_texts[:40]).split()
    rows = [{"query": " ".join(words[i * 17:i * 17 + 6]), "pos": " ".join(words[i * 17 + 4:i * 17 + 20])}
            for i in range(16)]
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def _train(model, data, out, *args):
    return CliRunner().invoke(cli, ["train", "--task", "contrastive", "--model", model, "--train-file", data,
                                    "--output-dir", str(out), "--batch-size", "4", "--lr", "1e-3", "--max-length",
                                    "32", "--no-progress", *args])


def _error(r, code=2) -> str:
    """The one line a failed command prints (and that it failed with ``code``)."""
    assert r.exit_code == code, (r.output, r.exception)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not RAY_FORWARDED.match(ln)]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.stderr
    return lines[0]


def _snapshot(d) -> dict:
    """Every file under ``d``: its content digest and modification time."""
    return {os.path.relpath(os.path.join(root, f), d): (hashlib.sha256(open(os.path.join(root, f), "rb").read())
                                                        .hexdigest(), os.stat(os.path.join(root, f)).st_mtime_ns)
            for root, _, files in os.walk(d) for f in files}


def _steps(out):
    with open(os.path.join(out, "loss_log.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def _stop_at_step(monkeypatch, n, stop):
    """Call ``stop()`` as the training loop starts step n (when it seeds the step's dropout)."""
    import embedder.trainer as T

    real = T._step_seed

    def step_seed(seed, step, rank):
        if step == n:
            stop()
        return real(seed, step, rank)

    monkeypatch.setattr(T, "_step_seed", step_seed)


def _ctrl_c():
    raise KeyboardInterrupt


def _sigterm():
    os.kill(os.getpid(), signal.SIGTERM)   # RetroCLI.main's handler raises in this thread
    time.sleep(30)                         # the signal interrupts the sleep


def test_ctrl_c_names_resume_latest_which_continues(tmp_path, tiny_bert_dir, data, monkeypatch):
    out = tmp_path / "enc"
    _stop_at_step(monkeypatch, 3, _ctrl_c)                  # during step 3, after the checkpoint of step 2
    line = _error(_train(tiny_bert_dir, data, out, "--max-steps", "4", "--save-every", "2"), 130)
    assert line == (f"error: interrupted; run the same command with --resume latest to continue from the newest "
                    f"checkpoint, {out}/checkpoints/step-2 (step 2)"), line
    monkeypatch.undo()
    r = _train(tiny_bert_dir, data, out, "--max-steps", "4", "--save-every", "2", "--resume", "latest")
    assert r.exit_code == 0, (r.output, r.exception)
    assert "trained contrastive for 4 steps" in r.output and _steps(out) == [1, 2, 3, 4]
    assert sorted(os.listdir(out / "checkpoints")) == ["step-2", "step-4"]


def test_sigterm_before_any_checkpoint_says_start_over_which_works(tmp_path, tiny_bert_dir, data, monkeypatch):
    out = tmp_path / "enc"
    _stop_at_step(monkeypatch, 2, _sigterm)
    line = _error(_train(tiny_bert_dir, data, out, "--max-steps", "2"), 143)
    assert line == ("error: terminated (SIGTERM); no checkpoint was written yet (--save-every N writes one every N "
                    "steps); run the same command again to start over"), line
    assert _steps(out) == [1] and not (out / "checkpoints").exists()   # what the hint says: nothing to resume
    monkeypatch.undo()
    r = _train(tiny_bert_dir, data, out, "--max-steps", "2")          # the same command: not refused
    assert r.exit_code == 0, (r.output, r.exception)
    assert _steps(out) == [1, 2]


def test_other_commands_keep_the_build_hint(tmp_path, monkeypatch):
    import retro_pipeline.pipeline as P

    def interrupted(workdir):
        raise KeyboardInterrupt

    monkeypatch.setattr(P, "status", interrupted)
    line = _error(CliRunner().invoke(cli, ["status", "--workdir", str(tmp_path)]), 130)
    assert line == "error: interrupted; run the same command again (a build resumes where it stopped)"


def test_rerun_without_resume_never_writes_over_checkpoints(tmp_path, tiny_bert_dir, data):
    from embedder.errors import UserError
    from embedder.tasks.base import TaskOptions
    from embedder.trainer import TrainConfig, train

    out = tmp_path / "enc"
    r = _train(tiny_bert_dir, data, out, "--max-steps", "4", "--stop-after", "2")
    assert r.exit_code == 0 and "stopped contrastive at step 2 of 4" in r.output, (r.output, r.exception)
    before = _snapshot(out)
    assert "checkpoints/step-2/trainer_state.pt" in before
    line = _error(_train(tiny_bert_dir, data, out, "--max-steps", "4"))
    assert line == (f"error: --output-dir {out} already holds checkpoints of an earlier run (newest: "
                    f"{out}/checkpoints/step-2); continue that run with --resume latest, or pass another or an "
                    f"empty --output-dir to start a new one"), line
    assert _snapshot(out) == before
    with pytest.raises(UserError, match=r"already holds checkpoints .* --resume latest"):   # the Python API too
        train(TrainConfig(task="contrastive", train_file=data, output_dir=str(out), max_steps=4, batch_size=4,
                          options=TaskOptions(model=tiny_bert_dir), progress=False))
    assert _snapshot(out) == before
    # the unfinished run is no model yet: evaluate says which run it is and how to finish it
    line = _error(CliRunner().invoke(cli, ["evaluate", "--model", str(out), "--eval-file", data]))
    assert line == (f"error: --model '{out}' is a train --output-dir whose run has not finished: no final model "
                    f"yet (its newest checkpoint is {out}/checkpoints/step-2); run the same train command with "
                    f"--resume latest to finish it, or pass a finished one"), line

    r = _train(tiny_bert_dir, data, out, "--max-steps", "4", "--resume", "latest")
    assert r.exit_code == 0 and "trained contrastive for 4 steps" in r.output, (r.output, r.exception)
    finished = _snapshot(out)
    line = _error(_train(tiny_bert_dir, data, out, "--max-steps", "4"))
    assert f"--output-dir {out} already holds checkpoints of an earlier run" in line and "its final model" in line
    assert _snapshot(out) == finished


def test_finished_run_without_checkpoints_and_resume_latest_with_none(tmp_path, tiny_bert_dir, data):
    fresh = tmp_path / "fresh"
    line = _error(_train(tiny_bert_dir, data, fresh, "--max-steps", "2", "--resume", "latest"))
    assert line == (f"error: --resume latest: no checkpoint under {fresh}/checkpoints to continue from (checkpoints "
                    f"are written by --save-every N and --stop-after N); leave --resume out to start from step 0")
    assert not fresh.exists()

    out = tmp_path / "enc"
    r = _train(tiny_bert_dir, data, out, "--max-steps", "1")
    assert r.exit_code == 0 and not (out / "checkpoints").exists(), (r.output, r.exception)
    before = _snapshot(out)
    assert "model.safetensors" in before
    line = _error(_train(tiny_bert_dir, data, out, "--max-steps", "1"))
    assert line == (f"error: --output-dir {out} already holds the final model of a finished run (and no checkpoint "
                    f"to resume from); pass another or an empty --output-dir (to train that model further: --model "
                    f"{out} and a new --output-dir)"), line
    line = _error(_train(tiny_bert_dir, data, out, "--max-steps", "2", "--resume", "latest"))
    assert line == (f"error: --resume latest: no checkpoint under {out}/checkpoints (the run there finished without "
                    f"--save-every); to train its model further pass --model {out} and a new --output-dir, without "
                    f"--resume"), line
    assert _snapshot(out) == before
    # the finished model evaluates, without transformers' "Loading weights" bar on stderr
    e = CliRunner().invoke(cli, ["evaluate", "--model", str(out), "--eval-file", data, "--json"])
    assert e.exit_code == 0, (e.output, e.exception)
    assert json.loads(e.stdout.strip().splitlines()[-1])["n_queries"] == 16
    assert "Loading weights" not in e.stderr and "%|" not in e.stderr, e.stderr


def test_bad_model_names_it_and_what_to_pass(tmp_path, data, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")        # no hub: the answer is the same everywhere, and at once
    for model, start in (("no-such-model", "error: --model 'no-such-model' is not a file or directory, and the "
                                           "Hugging Face hub cannot be reached to fetch it (HF_HUB_OFFLINE=1 is set)"),
                         (data, f"error: --model '{data}' is a file, not a model directory"),
                         (str(tmp_path), f"error: --model directory '{tmp_path}' holds no Hugging Face model")):
        line = _error(CliRunner().invoke(cli, ["evaluate", "--model", model, "--eval-file", data]))
        assert line.startswith(start), line
        assert line.endswith("; pass a train --output-dir, a model directory (config.json, weights, tokenizer) or "
                             "a hub id, or leave --model out for the packaged all-MiniLM-L6-v2"), line
        assert "--embedder" not in line
    line = _error(_train("no-such-model", data, tmp_path / "enc", "--max-steps", "1"))   # train's --model alike
    assert line.startswith("error: --model 'no-such-model' is not a file or directory") and "--embedder" not in line
