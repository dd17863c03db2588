"""`ray job submit --working-dir . -- python -m workflows.build ...` on a real local cluster (`ray start --head`
on 127.0.0.1) builds a workdir byte-identical to a local build; the example cluster YAML is valid for Ray's
cluster launcher."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from helpers import BUILD_OPTIONS, STAGES, build_corpus, env_without_ray_address, free_port, outputs, script
from retro_pipeline.config import RunOptions
from retro_pipeline.pipeline import run_stages
from retro_pipeline.tokenizers import load_gpt_tokenizer

REPO = Path(__file__).resolve().parents[1]
PORTS = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
         "runtime-env-agent-port", "metrics-export-port", "ray-client-server-port", "node-manager-port",
         "object-manager-port")


@pytest.fixture()
def job_cluster():
    """A one-node cluster of its own with the job server: its own ports and --temp-dir (so the machine's
    `ray start` record is left alone), stopped by killing its process group (`--block`)."""
    ports = {name: free_port() for name in PORTS}
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH_")}
    env["PATH"] = os.path.dirname(script("ray")) + os.pathsep + env.get("PATH", "")  # the job's `python`
    # token authentication on, with a token of its own (whatever ~/.ray/auth_token holds, or not): the head and
    # its workers check it, the job's driver inherits it, `ray job submit` sends it (RAY_AUTH_MODE=token)
    env["RAY_AUTH_MODE"], env["RAY_AUTH_TOKEN"] = "token", uuid.uuid4().hex
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # Ray 2.60 drains 30 s on SIGTERM by default
    cmd = [script("ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "2",
           "--object-store-memory", str(200 << 20), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
           "--temp-dir", temp, "--disable-usage-stats", "--min-worker-port", "0", "--max-worker-port", "0"]
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
                pytest.fail("the job server answered a request without the token")
            except urllib.error.HTTPError as e:  # answering, and refusing a request without the token: up
                assert e.code == 401, e
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, open(log.name).read()[-3000:]
                time.sleep(0.5)
        yield url, temp, env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        with contextlib.suppress(ProcessLookupError):  # anything of the group left behind
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.cluster
def test_ray_job_submit_builds_what_a_local_build_does(tmp_path, job_cluster, gpt_tokenizer_path, tiny_bert_dir,
                                                       corpus_texts):
    url, temp, env = job_cluster
    prefix = build_corpus(tmp_path / "corpus", load_gpt_tokenizer(gpt_tokenizer_path), corpus_texts)
    wd = tmp_path / "w"
    build = ["python", "-m", "workflows.build", "--workdir", str(wd), "--data-path", prefix,  # as the README says
             "--gpt-tokenizer", gpt_tokenizer_path, "--embedder", tiny_bert_dir, "--no-progress"]
    for k, v in BUILD_OPTIONS.items():
        build += [f"--{k.replace('_', '-')}", str(v)]
    # without RAY_AUTH_MODE=token `ray job submit` sends no token, even one it has: refused at once
    bare = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    r = subprocess.run([script("ray"), "job", "submit", "--address", url, "--", "true"], env=bare, cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "Missing authentication token" in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]
    # the repository root as the working dir (.gitignore keeps .venv out of the upload)
    job_id = f"retro-build-{os.getpid()}-{time.time_ns()}"
    submit = [script("ray"), "job", "submit", "--address", url, "--submission-id", job_id, "--working-dir", str(REPO),
              "--", *build]
    job = subprocess.Popen(submit, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ref = tmp_path / "ref"  # meanwhile, the same build locally (one process, no Ray)
        run_stages(str(ref), STAGES, {"data_path": ["1", prefix], "gpt_tokenizer": gpt_tokenizer_path,
                                      "embedder": tiny_bert_dir, **BUILD_OPTIONS},
                   RunOptions(executor="local", progress=False))
        out, _ = job.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("the submitted build did not finish in 240 s")
    finally:
        if job.poll() is None:  # the test failed first: stop the job (its driver is not in the cluster's group)
            job.kill()
            subprocess.run([script("ray"), "job", "stop", "--address", url, job_id], env=env, timeout=60,
                           capture_output=True)
    assert job.returncode == 0, out[-4000:]
    assert "succeeded" in out and "query-neighbors: done" in out and "chunks embedded:" in out, out[-4000:]
    # the stage workers ran as tasks of this cluster, not of a Ray the job started for itself
    logs = Path(temp, "session_latest", "logs")
    assert any("_task_process" in p.read_text(errors="replace") for p in logs.glob("worker-*.out")), "no worker here"
    mine, theirs = outputs(wd), outputs(ref)
    assert sorted(mine) == sorted(theirs) and any(k.startswith("query/") for k in mine)
    for k in theirs:
        assert mine[k] == theirs[k], k
    assert (wd / "config.json").read_bytes() == (ref / "config.json").read_bytes()  # no timings in it


def test_the_example_cluster_yaml_is_valid_for_the_cluster_launcher():
    """What `ray up` checks first: the config filled out with the provider's defaults, against ray-schema.json."""
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    text = (REPO / "examples" / "cluster.yaml").read_text()
    config = prepare_config(yaml.safe_load(text))
    validate_config(config)
    assert config["available_node_types"]["gpu_worker"]["worker_setup_commands"]
    assert "RAY_AUTH_MODE=token ray job submit" in text and "python -m workflows.build" in text


def test_outside_a_job_the_entry_point_joins_the_recorded_cluster(tmp_path, corpus, gpt_tokenizer_path, bert_dir):
    """No RAY_ADDRESS: --address auto, so no cluster recorded on this machine is the CLI's one-line error, exit 2."""
    env = env_without_ray_address()
    env["RAY_TMPDIR"] = str(tmp_path / "ray")  # where `ray start` would have recorded one: nothing there
    r = subprocess.run([sys.executable, "-m", "workflows.build", "--workdir", str(tmp_path / "w"), "--data-path",
                        corpus, "--gpt-tokenizer", gpt_tokenizer_path, "--embedder", bert_dir, "--no-progress"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "error: --address auto: no Ray cluster was started on this machine" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "w").exists()
