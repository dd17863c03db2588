"""`ray job submit --working-dir . -- python -m workflows.build ...` on a real local cluster (`ray start --head`
on 127.0.0.1) builds a workdir byte-identical to a local build; the example cluster YAML is valid for Ray's
cluster launcher."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import script
from retro_pipeline.config import RunOptions
from retro_pipeline.pipeline import run_stages
from retro_pipeline.tokenizers import load_gpt_tokenizer
from test_build_kill import OPTIONS, STAGES, make_corpus, outputs

pytest.importorskip("faiss")
REPO = Path(__file__).resolve().parents[1]
PORTS = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
         "runtime-env-agent-port", "metrics-export-port", "ray-client-server-port", "node-manager-port",
         "object-manager-port")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def job_cluster(tmp_path_factory):
    """A one-node cluster of its own with the job server: its own ports and --temp-dir (so the machine's
    `ray start` record is left alone), stopped by killing its process group (`--block`)."""
    import tempfile

    ports = {name: free_port() for name in PORTS}
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = os.path.dirname(script("ray")) + os.pathsep + env.get("PATH", "")
    cmd = [script("ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "2",
           "--object-store-memory", str(200 << 20), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
           "--temp-dir", temp, "--disable-usage-stats"]
    for name, port in ports.items():
        cmd += [f"--{name}", str(port)]
    log = open(os.path.join(temp, "start.log"), "w")
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(url + "/api/version", timeout=2).read()
                break
            except urllib.error.HTTPError:  # answering (401 without a token): up
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, open(log.name).read()[-3000:]
                time.sleep(0.5)
        yield url, env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        import shutil

        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_builds_what_a_local_build_does(tmp_path, job_cluster, gpt_tokenizer_path, tiny_bert_dir,
                                                       corpus_texts):
    url, env = job_cluster
    prefix = make_corpus(tmp_path / "corpus", load_gpt_tokenizer(gpt_tokenizer_path), corpus_texts)
    ref = tmp_path / "ref"
    run_stages(str(ref), STAGES, {"data_path": ["1", prefix], "gpt_tokenizer": gpt_tokenizer_path,
                                  "embedder": tiny_bert_dir, **OPTIONS}, RunOptions(executor="local", progress=False))

    wd = tmp_path / "w"
    build = [sys.executable, "-m", "workflows.build", "--workdir", str(wd), "--data-path", prefix,
             "--gpt-tokenizer", gpt_tokenizer_path, "--embedder", tiny_bert_dir, "--no-progress"]
    for k, v in OPTIONS.items():
        build += [f"--{k.replace('_', '-')}", str(v)]
    submit = [script("ray"), "job", "submit", "--address", url, "--working-dir", str(REPO), "--", *build]
    try:
        r = subprocess.run(submit, cwd=REPO, env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True,
                           timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("the submitted build did not finish in 300 s")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "succeeded" in r.stdout + r.stderr and "query-neighbors: done" in r.stdout + r.stderr
    mine, theirs = outputs(wd), outputs(ref)
    assert sorted(mine) == sorted(theirs) and any(k.startswith("query/") for k in mine)
    for k in theirs:
        assert mine[k] == theirs[k], k


def test_the_example_cluster_yaml_is_valid_for_the_cluster_launcher():
    import json

    import jsonschema
    import ray
    import yaml

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((REPO / "examples" / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    assert "workflows.build" in (REPO / "examples" / "cluster.yaml").read_text()
