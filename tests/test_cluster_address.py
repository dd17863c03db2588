"""`--address` joins a running Ray cluster (a real `ray start --head` on 127.0.0.1) and gives the same bytes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers import env_without_ray_address, free_port, script, write_corpus
from retro_pipeline.config import RunOptions
from retro_pipeline.pipeline import run_stages
from retro_pipeline.tokenizers import load_gpt_tokenizer


@pytest.fixture()
def head_node(tmp_path):
    """A one-node Ray cluster of its own (`--block` keeps it ours: stopping it stops only its processes)."""
    from embedder.ray_session import cluster_file

    port = free_port()
    env = env_without_ray_address()
    before = open(cluster_file()).read() if os.path.exists(cluster_file()) else None
    proc = subprocess.Popen([script("ray"), "start", "--head", "--block", "--port", str(port), "--num-cpus", "2",
                             "--node-ip-address", "127.0.0.1", "--include-dashboard", "false",
                             "--disable-usage-stats"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.5)
    time.sleep(3)  # the raylet registers after the GCS port opens
    yield f"127.0.0.1:{port}"
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    # `ray start` recorded this cluster for `--address auto`; a dead address must not outlive the test
    if os.path.exists(cluster_file()) and open(cluster_file()).read().strip().endswith(f":{port}"):
        if before is None:
            os.unlink(cluster_file())
        else:
            with open(cluster_file(), "w") as f:
                f.write(before)


@pytest.mark.slow
@pytest.mark.cluster
def test_address_joins_a_cluster(tmp_path, head_node, gpt_tokenizer_path, bert_dir, corpus_texts):
    prefix = write_corpus(tmp_path / "c", load_gpt_tokenizer(gpt_tokenizer_path), corpus_texts[:50])
    args = ["--data-path", prefix, "--gpt-tokenizer", gpt_tokenizer_path, "--embedder", bert_dir,
            "--block-size", "8", "--no-progress"]
    env = env_without_ray_address()
    r = subprocess.run([sys.executable, "-m", "retro_pipeline.cli", "db-build", "--workdir", str(tmp_path / "w"),
                        "--address", head_node, *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run_stages(str(tmp_path / "ref"), ["db-build"], {"data_path": ["1", prefix], "gpt_tokenizer": gpt_tokenizer_path,
               "embedder": bert_dir, "block_size": 8}, RunOptions(executor="local", progress=False))
    for name in ("train", "sampled", "valid"):
        assert (tmp_path / "w" / "db" / "merged" / f"{name}.hdf5").read_bytes() == \
            (tmp_path / "ref" / "db" / "merged" / f"{name}.hdf5").read_bytes()


def test_unreachable_address_is_a_clear_error(tmp_path, gpt_tokenizer_path, bert_dir, corpus_texts):
    prefix = write_corpus(tmp_path / "c", load_gpt_tokenizer(gpt_tokenizer_path), corpus_texts[:5])
    r = subprocess.run([sys.executable, "-m", "retro_pipeline.cli", "db-build", "--workdir", str(tmp_path / "w"),
                        "--data-path", prefix, "--gpt-tokenizer", gpt_tokenizer_path, "--embedder", bert_dir,
                        "--address", f"127.0.0.1:{free_port()}", "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "error: --address 127.0.0.1:" in r.stderr and "Traceback" not in r.stderr
