"""A node lost in the middle of a build costs time, never the build: on a simulated multi-node Ray cluster
(tests/cluster_ctl.py: a head without CPUs and 1-CPU worker nodes), nodes are killed while index-add's
blocks run, while its one-off merge runs and while query-neighbors' blocks run; the build finishes and every
output file equals an undisturbed local build's byte for byte. A cluster that loses every node that could
run a stage is a clear error within a bounded time.

Where the work runs is recorded by the test aid ``RETRO_PIPELINE_SLOW_AT`` (``retro_pipeline.io.slowpoint``):
it slows the named work down and says which node ran it, so a node is removed while it holds that work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from retro_pipeline.config import RunOptions
from retro_pipeline.pipeline import run_stages
from retro_pipeline.tokenizers import load_gpt_tokenizer
from helpers import BUILD_OPTIONS, STAGES, blocks_done, build_cli_args, build_corpus, outputs

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

HERE = Path(__file__).parent


class SimCluster:
    def __init__(self, n_nodes: int, env: dict[str, str], cpus: int = 1, memory: int | None = None):
        """``env``: the environment of the nodes' processes (Ray workers inherit their node's, not the driver's);
        ``memory``: bytes each node declares to Ray."""
        self.proc = subprocess.Popen([sys.executable, str(HERE / "cluster_ctl.py"), str(n_nodes), str(cpus),
                                      *([str(memory)] if memory else [])],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     start_new_session=True)
        self.address = self._line("address")
        self.nodes = [self._line("node") for _ in range(n_nodes)]
        self.removed: list[str] = []

    def _line(self, what: str) -> str:
        line = self.proc.stdout.readline().split()
        assert line and line[0] == what, (what, line)
        return line[1]

    def remove(self, node: str) -> None:
        self.proc.stdin.write(f"remove {node}\n")
        self.proc.stdin.flush()
        self._line("removed")
        self.nodes.remove(node)
        self.removed.append(node)

    def add(self) -> str:
        self.proc.stdin.write("add\n")
        self.proc.stdin.flush()
        node = self._line("node")
        self.nodes.append(node)
        return node

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture()
def sim_cluster():
    clusters = []

    def make(n_nodes: int, env: dict[str, str], memory: int | None = None) -> SimCluster:
        clusters.append(SimCluster(n_nodes, env, memory=memory))
        return clusters[-1]

    yield make
    for c in clusters:
        c.close()


def ran_on(slow_dir: Path, what: str, alive: list[str]) -> str | None:
    """An alive node on which ``what`` (e.g. 'index-add.block') ran, by the slowpoint's files."""
    for p in sorted(slow_dir.glob(f"{what}.*"), key=lambda p: -p.stat().st_mtime):
        node = p.name[len(what) + 1:].split(".")[0]
        if node in alive:
            return node
    return None


def wait_for(cond, proc, seconds: float, what: str):
    deadline = time.time() + seconds
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        assert proc.poll() is None, f"the build ended before {what}: {proc.stderr.read()[-3000:]}"
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("spare", [False, True], ids=["survivors-full", "room-to-spare"])
def test_nodes_lost_during_blocks_and_a_merge_cost_only_time(tmp_path, sim_cluster, gpt_tokenizer_path,
                                                             tiny_bert_dir, corpus_texts, spare):
    prefix = build_corpus(tmp_path / "corpus", load_gpt_tokenizer(gpt_tokenizer_path), corpus_texts)
    ref = tmp_path / "ref"
    done = run_stages(str(ref), STAGES, {"data_path": ["1", prefix], "gpt_tokenizer": gpt_tokenizer_path,
                                         "embedder": tiny_bert_dir, **BUILD_OPTIONS},
                      RunOptions(executor="local", progress=False))
    assert done["index-add"]["blocks"] >= 4 and done["query-neighbors"]["blocks"] >= 4, done

    slow = tmp_path / "slow"
    slow.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RETRO_PIPELINE_SLOW_AT="index-add:block:1.5,index-add:finalize:6,query-neighbors:block:1.5",
               RETRO_PIPELINE_SLOW_DIR=str(slow), RETRO_PIPELINE_NODE_WAIT_S="60")
    cluster = sim_cluster(3, env)
    wd = tmp_path / "w"
    # survivors full: a pool that fills the cluster (3 workers on 3 nodes); room to spare: 2 workers on 3 nodes
    args = build_cli_args(wd, prefix, gpt_tokenizer_path, tiny_bert_dir, 2 if spare else 0)
    args = [a for a in args if a not in ("--executor", "local")] + ["--address", cluster.address]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        # 1. a node that runs index-add blocks, once two blocks are done; a new node joins after (the pool
        #    grows back onto it)
        wait_for(lambda: blocks_done(wd, "index-add") >= 2, proc, 400, "two index-add blocks")
        node = wait_for(lambda: ran_on(slow, "index-add.block", cluster.nodes), proc, 30, "an index-add worker")
        cluster.remove(node)
        assert not (wd / "markers" / "index-add" / "_done.json").exists()  # removed while blocks ran
        if not spare:
            cluster.add()
        # 2. the node that runs index-add's merge (a one-off job of a whole node), while it runs
        node = wait_for(lambda: ran_on(slow, "index-add.finalize", cluster.nodes), proc, 400, "index-add's merge")
        cluster.remove(node)
        assert not (wd / "markers" / "index-add" / "_done.json").exists()
        cluster.add()
        # 3. a node that runs query-neighbors blocks
        wait_for(lambda: blocks_done(wd, "query-neighbors") >= 2, proc, 400, "two query-neighbors blocks")
        node = wait_for(lambda: ran_on(slow, "query-neighbors.block", cluster.nodes), proc, 30,
                        "a query-neighbors worker")
        cluster.remove(node)
        assert not (wd / "markers" / "query-neighbors" / "_done.json").exists()
        proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert proc.returncode == 0, err[-3000:]
    assert err.count("worker lost during block") >= 2, err[-3000:]  # both block removals landed mid-block
    assert "index-add] finalize: its worker was lost" in err, err[-3000:]
    mine, theirs = outputs(wd), outputs(ref)
    assert sorted(mine) == sorted(theirs)
    for k in theirs:
        assert mine[k] == theirs[k], k


def test_a_cluster_that_lost_every_node_is_an_error_in_bounded_time(tmp_path, sim_cluster, corpus,
                                                                     gpt_tokenizer_path, tiny_bert_dir):
    slow = tmp_path / "slow"
    slow.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RETRO_PIPELINE_SLOW_AT="db-build:block:2", RETRO_PIPELINE_SLOW_DIR=str(slow),
               RETRO_PIPELINE_NODE_WAIT_S="5")
    cluster = sim_cluster(2, env)
    wd = tmp_path / "w"
    proc = subprocess.Popen([sys.executable, "-m", "retro_pipeline.cli", "db-build", "--workdir", str(wd),
                             "--data-path", corpus, "--gpt-tokenizer", gpt_tokenizer_path, "--embedder",
                             tiny_bert_dir, "--chunk-length", "16", "--block-size", "32", "--no-progress",
                             "--address", cluster.address], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: len(list(slow.glob("db-build.block.*"))) >= 1, proc, 300, "a db-build block")
        t0 = time.time()
        for node in list(cluster.nodes):
            cluster.remove(node)
        proc.wait(timeout=120)
        waited = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert proc.returncode == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: [db-build]") and "no node of the Ray cluster could hold a worker" in last, err
    assert "Traceback" not in err
    assert waited < 90
    assert not (wd / "markers" / "db-build" / "_done.json").exists()


KILL_SERVICE = r"""
import sys
from embedder.ray_session import _send_token_if_we_have_one
_send_token_if_we_have_one()   # before ray is imported: it reads the auth mode then
import ray
ray.init(address=sys.argv[1], namespace=sys.argv[2], logging_level="error")
names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
               if a["namespace"] == sys.argv[2] and a["name"].startswith("query-neighbors-service-"))
assert len(names) == 4, names
ray.kill(ray.get_actor(names[1]), no_restart=False)   # as a lost process: Ray restarts it
print("killed", names[1], flush=True)
"""


def test_a_shard_searcher_killed_mid_query_costs_only_time(tmp_path, sim_cluster, gpt_tokenizer_path,
                                                           tiny_bert_dir, corpus_texts):
    """--index-shards 4 on a simulated 3-node cluster whose nodes declare their memory: query-neighbors runs one
    searcher actor per shard; one is killed while blocks are being searched; Ray restarts it and retries its
    requests, and the saved neighbors equal an unsharded local build's byte for byte."""
    from retro_pipeline.executor.ray import SERVICE_NAMESPACE

    prefix = build_corpus(tmp_path / "corpus", load_gpt_tokenizer(gpt_tokenizer_path), corpus_texts)
    ref = tmp_path / "ref"
    run_stages(str(ref), STAGES, {"data_path": ["1", prefix], "gpt_tokenizer": gpt_tokenizer_path,
                                  "embedder": tiny_bert_dir, **BUILD_OPTIONS},
               RunOptions(executor="local", progress=False))
    slow = tmp_path / "slow"
    slow.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RETRO_PIPELINE_SLOW_AT="query-neighbors:block:1.5", RETRO_PIPELINE_SLOW_DIR=str(slow))
    cluster = sim_cluster(3, env, memory=2 << 30)
    wd = tmp_path / "w"
    args = build_cli_args(wd, prefix, gpt_tokenizer_path, tiny_bert_dir, 2) + ["--address", cluster.address,
                                                                               "--index-shards", "4"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_for(lambda: blocks_done(wd, "query-neighbors") >= 1, proc, 400, "a query-neighbors block")
        k = subprocess.run([sys.executable, "-c", KILL_SERVICE, cluster.address, SERVICE_NAMESPACE], env=env,
                           capture_output=True, text=True, timeout=120)
        assert k.returncode == 0 and "killed" in k.stdout, k.stderr[-3000:]
        assert not (wd / "markers" / "query-neighbors" / "_done.json").exists()   # killed while blocks ran
        proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert proc.returncode == 0, err[-3000:]
    done = json.loads((wd / "markers" / "query-neighbors" / "_done.json").read_text())
    assert done["n_blocks_searched_by_shard_services"] == done["blocks"] >= 4, done
    mine, theirs = outputs(wd), outputs(ref)
    queried = [k for k in theirs if k.startswith(("query/", "megatron/"))]
    assert queried and all(k in mine for k in queried)
    for key in queried:
        assert mine[key] == theirs[key], key
