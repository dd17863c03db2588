"""The Ray executor: the same stage code on a pool of Ray workers, locally or on a cluster.

Pools without GPUs run each group of blocks as a Ray task; Ray hands tasks to idle worker processes it keeps,
and each process builds the stage's worker state (``Stage.setup``: tokenizers, a model, an index) once per
stage run, so the imports (torch, transformers) are paid once per process for the whole build, not once per
stage. Pools with GPUs are actors that build their state once (a reused process would keep the CUDA device it
started on). The driver keeps every worker busy with up to two groups (one running, one queued), writes a
block's completion marker when its result comes back, and retries blocks whose worker or node was lost.
A :class:`~retro_pipeline.errors.RetroError` raised by stage code (bad input data) stops the run at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import uuid
from collections import defaultdict, deque
from typing import Any

from embedder.ray_session import ensure_ray
from retro_pipeline.errors import RetroError, StageFailed, UserError
from retro_pipeline.executor.base import INFRA_RETRIES, OnResult, run_group, stage_failed
from retro_pipeline.logs import replay, run_capturing_logs
from retro_pipeline.stage import Block, Stage

log = logging.getLogger(__name__)


def worker_shape(ray, stage: Stage, once: bool = False) -> tuple[float, float, int | None]:
    """(CPUs, GPUs, memory) of one worker of ``stage`` (``once``: of its one-off job, ``Stage.once_resources``):
    the run's overrides, else the declaration; declared GPUs only where the cluster has GPUs. A whole-node
    worker takes every CPU of the largest alive node."""
    res = stage.once_resources if once else stage.resources
    cpus = res.cpus if once or stage.cpus is None else stage.cpus
    if res.whole_node and (once or stage.cpus is None):
        cpus = max([n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")] or [cpus]) or cpus
    if stage.gpus is not None and not (once and not res.gpus):
        gpus = stage.gpus
    else:
        gpus = res.gpus if res.gpus and ray.cluster_resources().get("GPU", 0) >= res.gpus else 0.0
    return cpus, gpus, res.memory


def check_feasible(ray, cpus: float, gpus: float, memory: int | None = None) -> None:
    """A worker that no node of the cluster could ever hold is an error now, not an endless autoscaler wait."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus and r.get("memory", 0) >= (memory or 0)
           for r in nodes):
        return
    best_cpu = max((r.get("CPU", 0) for r in nodes), default=0)
    best_gpu = max((r.get("GPU", 0) for r in nodes), default=0)
    best_mem = max((r.get("memory", 0) for r in nodes), default=0)
    if gpus > 0 and best_gpu < gpus:
        raise RetroError(f"--gpus-per-worker {gpus:g}: no node of the Ray cluster has {gpus:g} GPUs (the most "
                         f"on one node: {best_gpu:g}); use --device cpu or fewer GPUs per worker")
    if memory and best_mem < memory:
        raise RetroError(f"a worker needs {memory / 2**30:.1f} GiB of memory and no node of the Ray cluster has "
                         f"that much for Ray workers (the most on one node: {best_mem / 2**30:.1f} GiB); use "
                         f"larger nodes or lower the stage's memory need")
    raise RetroError(f"--cpus-per-worker {cpus:g}: no node of the Ray cluster has {cpus:g} CPUs{' and ' + format(gpus, 'g') + ' GPUs' if gpus else ''} "
                     f"(the most on one node: {best_cpu:g} CPUs); lower --cpus-per-worker")


def _stopped_by_signal() -> bool:
    """Whether the exception on its way out is a stop (SIGTERM, Ctrl-C: not an ``Exception``). The process is
    ending then, and Ray ends the run's workers with it: its tasks are not force-cancelled first, since a task
    that finishes while Ray cancels it can crash Ray 2.60's core worker ("Tried to complete task that was not
    pending", seen once in CI after a SIGTERM), turning the stop's exit code into 1."""
    e = sys.exc_info()[1]
    if isinstance(e, SystemError) and e.__cause__ is not None:   # a signal's exception raised inside ray.wait
        e = e.__cause__
    return e is not None and not isinstance(e, Exception)


def services_unplaced(ray, memory: list[int]) -> int:
    """How many of services declaring ``memory`` (bytes each) find no room when placed largest first, each on
    the first alive node with that much of its memory resource left (first-fit decreasing)."""
    room = [n.get("Resources", {}).get("memory", 0) for n in ray.nodes() if n.get("Alive")]
    unplaced = 0
    for need in sorted(memory, reverse=True):
        fit = next((i for i, r in enumerate(room) if r >= need), None)
        if fit is None:
            unplaced += 1
        else:
            room[fit] -= need
    return unplaced


def node_slots(ray, cpus: float, gpus: float, max_per_node: int) -> list[str]:
    """Node ids for the workers of a stage that allows at most ``max_per_node`` workers per node: each alive
    node repeated as often as it holds a worker (capped), nodes taking turns."""
    per_node = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        r = n.get("Resources", {})
        fit = int(min(r.get("CPU", 0) // cpus if cpus else max_per_node,
                      r.get("GPU", 0) // gpus if gpus else max_per_node, max_per_node))
        if fit > 0:
            per_node.append([n["NodeID"]] * fit)
    slots = []
    for k in range(max((len(x) for x in per_node), default=0)):
        slots += [x[k] for x in per_node if k < len(x)]
    return slots


def _worker_env(resources: dict[str, Any]) -> None:
    """Thread pools of a worker process sized to the CPUs its work holds."""
    ncpu = max(1, int(resources.get("num_cpus") or 1))
    os.environ.setdefault("RAYON_RS_NUM_CPUS", str(ncpu))  # Rust tokenizers' thread pool (fixed at first use)
    os.environ.setdefault("RAYON_NUM_THREADS", str(ncpu))
    if "torch" in sys.modules:  # a reused process may have run a whole-node job before
        sys.modules["torch"].set_num_threads(ncpu)
    if "faiss" in sys.modules:
        sys.modules["faiss"].omp_set_num_threads(ncpu)


class _StageWorker:
    """The body of one Ray actor (pools that hold GPUs): stage state built once, then one group per call."""

    def __init__(self, stage: Stage, resources: dict[str, Any]):
        _worker_env(resources)
        self.stage = stage
        self.setup_error: BaseException | None = None
        try:
            self.state = stage.setup(resources)
        except Exception as e:  # raised from process(), so a RetroError reaches the driver as itself
            self.setup_error = e

    def process(self, blocks: list[Block], todo: list[str]) -> tuple[list[dict[str, Any]], list]:
        if self.setup_error is not None:
            raise self.setup_error
        return run_capturing_logs(run_group, self.stage, blocks, self.state, todo)

    def pid(self) -> int:
        return os.getpid()


# This worker process's state for the stage run it served last (pools without GPUs run groups as Ray tasks).
_TASK_STATE: dict[str, Any] = {}


def _task_process(stage: Stage, blocks: list[Block], todo: list[str], resources: dict[str, Any],
                  run_key: str) -> tuple[list[dict[str, Any]], list]:
    """One group as a Ray task. Ray keeps idle worker processes and hands them the next tasks, so the stage's
    state (``Stage.setup``: the model, an index) is built once per process and stage run, and the imports
    (torch, transformers: seconds) once per process for the whole build, not once per stage."""
    _worker_env(resources)
    if _TASK_STATE.get("key") != run_key:
        _TASK_STATE.clear()  # the previous stage's model and index go first
        state = stage.setup(resources)
        _TASK_STATE.update(key=run_key, state=state)
    return run_capturing_logs(run_group, stage, blocks, _TASK_STATE["state"], todo)


SERVICE_NAMESPACE = "retro-pipeline"   # where a stage's service actors are named (ray.util.list_named_actors)


class _ServiceHost:
    """A stage's service in an actor: ``factory(*args)`` built once; ``call(method, *args)`` runs its method."""

    def __init__(self, factory, *args):
        self.obj = factory(*args)

    def ready(self) -> bool:
        return True

    def call(self, method: str, *args):
        return getattr(self.obj, method)(*args)


def _one_off(fn, *args):
    return run_capturing_logs(fn, *args)


def _code_error(stage: Stage, what: str, e) -> Exception:
    """The error to raise for stage code that raised on a worker (a RayTaskError): a user error as itself
    (one line), anything else as StageFailed; the worker's log records before it are replayed first."""
    cause = e.cause if getattr(e, "cause", None) is not None else e
    replay(getattr(cause, "retro_log_records", ()))
    if isinstance(cause, UserError):
        return RetroError(str(cause))
    log.debug("[%s] %s failed:\n%s", stage.name, what, e)
    return stage_failed(stage, what, cause)


# Seen on a simulated cluster: a driver that sends a token (RAY_AUTH_MODE=token, set where this machine has
# ~/.ray/auth_token) to a cluster that checks none has every actor it starts cancelled at once.
CHECK_CLUSTER = ("check the Ray cluster ('ray status', the raylet logs); a cluster started without token "
                 "authentication needs RAY_AUTH_MODE=disabled on a driver that has a Ray token")


class _Worker:
    """One worker of the pool as the driver tracks it: an actor, or (``actor`` None) a slot for tasks."""

    def __init__(self, actor, node: str | None):
        self.actor = actor
        self.node = node  # the node it was asked to run on (stages with max_per_node), else None
        self.ready = actor is None  # a task slot has nothing to start
        self.load = 0


def _infra_error_types():
    """The Ray errors that mean a worker, actor or node was lost (not an error of stage code)."""
    from ray.exceptions import RayError, RayTaskError

    return RayError, RayTaskError


class RayExecutor:
    """Blocks on a pool of Ray actors that follows the cluster: a lost actor's blocks go to live actors, the pool
    shrinks to what the alive nodes can hold and grows back when nodes join. Actors are never restarted in
    place (a restarted actor would wait for resources its lost node took with it); new ones are started
    where there is room. A cluster on which no node can hold one worker any more is an error after
    ``node_wait_s`` seconds (room for an autoscaler to add one), never an endless wait."""

    name = "ray"

    def __init__(self, address: str | None = None, num_workers: int | None = None, inflight_per_worker: int = 2,
                 node_wait_s: float | None = None, actors: bool | None = None):
        self.address = address
        self.actors = actors  # pools as actors (True) or tasks (False); None: actors where they hold GPUs
        self.num_workers = num_workers
        self.inflight_per_worker = inflight_per_worker
        self.node_wait_s = float(os.environ.get("RETRO_PIPELINE_NODE_WAIT_S", 120)) if node_wait_s is None \
            else node_wait_s
        self.stats: dict[str, int] = defaultdict(int)  # blocks run, retries, lost workers
        self.on_event = None  # (event, **fields) of a lost worker or a retry: run_stage records them

    def connect(self) -> None:
        """Join (or start) Ray now: a cluster that does not answer is an error before a stage begins."""
        ensure_ray(self.address)

    def _event(self, event: str, **fields) -> None:
        """A lost worker or a retry, for the workdir's timeline (``on_event``, set by ``run_stage``)."""
        on_event = getattr(self, "on_event", None)
        if on_event is not None:
            on_event(event, **fields)

    def pool_shape(self, stage: Stage, n_blocks: int) -> tuple[int, float, float, int | None, list[str] | None]:
        """(workers, CPUs, GPUs and memory per worker, node of each worker or None) for the cluster as it is now."""
        ray = ensure_ray(self.address)
        res = ray.cluster_resources()  # alive nodes only
        cpus, gpus, memory = worker_shape(ray, stage)
        check_feasible(ray, cpus, gpus, memory)
        if self.num_workers:
            n = self.num_workers
        elif gpus > 0:
            n = int(res.get("GPU", 0) // gpus)
        else:
            n = int(res.get("CPU", 1) // max(cpus, 1e-9))
        nodes = None
        if stage.resources.max_per_node:
            nodes = node_slots(ray, cpus, gpus, stage.resources.max_per_node)
            n = min(n, len(nodes))
        n = max(1, min(n, n_blocks))
        return n, cpus, gpus, memory, nodes[:n] if nodes else None

    def _options(self, cpus: float, gpus: float, memory: int | None, node: str | None = None) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus}
        if memory:
            opts["memory"] = memory
        if node is not None:  # soft: where the node is gone, anywhere else
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node, soft=True)
        return opts

    def _feasible(self, ray, cpus: float, gpus: float, memory: int | None) -> bool:
        try:
            check_feasible(ray, cpus, gpus, memory)
            return True
        except RetroError:
            return False

    def _no_node_error(self, ray, stage: Stage, what: str, cpus: float, gpus: float, memory: int | None) -> RetroError:
        try:
            check_feasible(ray, cpus, gpus, memory)
            why = ""
        except RetroError as e:
            why = f" ({e})"
        alive = sum(1 for n in ray.nodes() if n.get("Alive"))
        return RetroError(f"[{stage.name}] {what}: for {self.node_wait_s:.0f} s no node of the Ray cluster could "
                          f"hold a worker of {cpus:g} CPUs{f' and {gpus:g} GPUs' if gpus else ''} ({alive} node(s) "
                          f"alive: nodes were lost){why}; add nodes and run the same command again (finished work "
                          f"is kept)")

    @contextlib.contextmanager
    def serve(self, stage: Stage):
        """The stage's services (``Stage.services``) as actors while its blocks run: each placed on a node with
        the memory it declares (no CPUs reserved: it answers its callers' requests), restarted where it or its
        node is lost with its calls retried (results are a function of the request, so nothing is lost or
        doubled), and killed at the end. Services the alive nodes cannot hold (packed largest first) are an
        error before any block runs, or, where every one is ``optional``, skipped with a warning."""
        specs = stage.services()
        if not specs:
            yield
            return
        ray = ensure_ray(self.address)
        unplaced = services_unplaced(ray, [s.memory or 0 for s in specs])
        if unplaced and all(s.optional for s in specs):
            log.warning("[%s] its %d services need %.1f GiB of memory in all and the Ray cluster's nodes cannot "
                        "hold %d of them; the workers do that work themselves instead (slower)", stage.name,
                        len(specs), sum(s.memory or 0 for s in specs) / 2**30, unplaced)
            yield
            return
        for spec in specs:
            try:
                check_feasible(ray, 0, 0, spec.memory)
            except RetroError as e:
                raise RetroError(f"[{stage.name}] {spec.name}: {e}") from None
        if unplaced:
            raise RetroError(f"[{stage.name}] its {len(specs)} services need {sum(s.memory or 0 for s in specs) / 2**30:.1f} "
                             f"GiB of memory in all and the Ray cluster's nodes cannot hold {unplaced} of them; "
                             f"add nodes or use larger ones")
        host = ray.remote(_ServiceHost)
        handles = []
        try:
            for spec in specs:
                options: dict[str, Any] = {"num_cpus": 0, "max_restarts": INFRA_RETRIES,
                                           "max_task_retries": INFRA_RETRIES, "namespace": SERVICE_NAMESPACE,
                                           "name": f"{stage.name}-service-{len(handles)}-{uuid.uuid4().hex[:8]}"}
                if spec.memory:
                    options["memory"] = int(spec.memory)
                handles.append(host.options(**options).remote(spec.factory, *spec.args))
            try:
                ray.get([h.ready.remote() for h in handles], timeout=self.node_wait_s)
            except ray.exceptions.GetTimeoutError:
                raise RetroError(f"[{stage.name}] its {len(specs)} services did not start within "
                                 f"{self.node_wait_s:.0f} s (no node had room for them); {CHECK_CLUSTER}") from None
            log.info("[%s] %d services started: %s", stage.name, len(specs), ", ".join(s.name for s in specs))
            stage.service_handles = handles
            yield
        finally:
            stage.service_handles = None
            for h in handles:
                with contextlib.suppress(Exception):
                    ray.kill(h)

    def run_once(self, stage: Stage, what: str, fn, *args) -> Any:
        """A one-off job of ``stage`` (e.g. its finalize) as a Ray task with the stage's one-off resources
        (``Stage.once_resources``). A lost node reruns it elsewhere (a one-off job writes its outputs
        atomically, so a rerun is a resume), its shape following the nodes still alive."""
        return self.run_once_many(stage, [(what, fn, args)])[0]

    def run_once_many(self, stage: Stage, jobs: list[tuple[str, Any, tuple]]) -> list[Any]:
        """One-off jobs ``(what, fn, args)`` at once, each a task as :meth:`run_once` runs one: Ray places them
        on the nodes that have room, so on a cluster they run side by side. The first failure of stage code
        stops the run (the others are cancelled); a job whose worker or node is lost runs again."""
        ray = ensure_ray(self.address)
        RayError, RayTaskError = _infra_error_types()
        lost = 0
        results: dict[int, Any] = {}
        running: dict[Any, int] = {}   # ref -> job

        def submit(i: int, shape) -> None:
            what, fn, args = jobs[i]
            self._wait_for_room(ray, stage, what, *shape)
            task = ray.remote(_one_off).options(max_retries=0, retry_exceptions=False, **self._options(*shape))
            running[task.remote(fn, *args)] = i

        try:
            shape = worker_shape(ray, stage, once=True)
            for i in range(len(jobs)):
                submit(i, shape)
            gone_since = None
            while running:
                ready, _ = ray.wait(list(running), num_returns=1, timeout=2.0)
                if not ready:
                    # pending tasks whose shape no alive node can hold any more (the largest node was lost) are
                    # started again with the shape the cluster has now
                    if self._feasible(ray, *shape):
                        gone_since = None
                        continue
                    gone_since = gone_since or time.monotonic()
                    if time.monotonic() - gone_since > 5.0:
                        for ref in list(running):
                            ray.cancel(ref, force=True)
                        gone_since = None
                    continue
                ref = ready[0]
                i = running.pop(ref)
                what = jobs[i][0]
                try:
                    result, records = ray.get(ref)
                except RayTaskError as e:
                    raise _code_error(stage, what, e) from None
                except RayError as e:  # a lost worker or node, or cancelled for a new shape: run it again
                    lost += 1
                    self.stats["lost"] += 1
                    self.stats["retries"] += 1
                    self._event("worker_lost", what=what, error=type(e).__name__)
                    if lost > INFRA_RETRIES * len(jobs):
                        raise StageFailed(f"[{stage.name}] {what}: its workers kept being lost ({type(e).__name__}); "
                                          f"{CHECK_CLUSTER}") from None
                    log.warning("[%s] %s: its worker was lost (%s); running it again", stage.name, what,
                                type(e).__name__)
                    shape = worker_shape(ray, stage, once=True)
                    submit(i, shape)
                    continue
                replay(records)
                results[i] = result
        finally:
            for ref in running if not _stopped_by_signal() else ():   # a failure leaves no job running
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
        return [results[i] for i in range(len(jobs))]

    def _wait_for_room(self, ray, stage: Stage, what: str, cpus: float, gpus: float, memory: int | None) -> None:
        """Return once some alive node could hold a worker of this shape; raise after ``node_wait_s``."""
        t0 = time.monotonic()
        while not self._feasible(ray, cpus, gpus, memory):
            if time.monotonic() - t0 > self.node_wait_s:
                raise self._no_node_error(ray, stage, what, cpus, gpus, memory)
            time.sleep(1.0)

    def run(self, stage: Stage, groups: list[tuple[list[Block], list[str]]], on_result: OnResult) -> None:
        """Process ``groups`` ((blocks of a group, see ``Stage.groups``; the names of those to make)) on the
        pool; report each made block's result."""
        if not groups:
            return
        ray = ensure_ray(self.address)
        RayError, RayTaskError = _infra_error_types()

        n, cpus, gpus, memory, nodes = self.pool_shape(stage, len(groups))
        resources = {"num_cpus": cpus, "num_gpus": gpus}
        # Pools without GPUs run groups as tasks (Ray reuses their processes: imports and model once per build);
        # pools with GPUs as actors (a reused process keeps the CUDA device it started on, whatever GPU Ray
        # assigns its next task).
        as_tasks = not gpus if self.actors is None else not self.actors
        worker_cls = None if as_tasks else ray.remote(_StageWorker)
        task = ray.remote(max_calls=0)(_task_process) if as_tasks else None
        stage_ref = ray.put(stage) if as_tasks else None
        run_key = f"{stage.name}:{uuid.uuid4().hex}"
        # an actor runs one group at a time and queues the next. A task slot holds one task where the run caps
        # how many run at once (--num-workers, or a stage's workers per node): a second task queued on a slot
        # would run beside the first wherever a CPU is free. Where the cluster's CPUs alone size the pool, Ray
        # runs no more than they hold, and a queued task keeps each CPU busy between tasks.
        per_worker = 1 if as_tasks and (stage.resources.max_per_node or self.num_workers) else \
            self.inflight_per_worker
        workers: list[_Worker] = []
        probes: dict[Any, _Worker] = {}  # readiness of starting actors
        pending: deque[tuple[list[Block], list[str]]] = deque(groups)
        inflight: dict[Any, tuple[tuple[list[Block], list[str]], _Worker]] = {}
        infra_failures: dict[str, int] = defaultdict(int)
        lost_actors = 0

        def start(node: str | None) -> None:
            if as_tasks:
                workers.append(_Worker(None, node))
                return
            actor = worker_cls.options(max_restarts=0, max_concurrency=1,
                                       **self._options(cpus, gpus, memory, node)).remote(stage, resources)
            w = _Worker(actor, node)
            workers.append(w)
            probes[actor.pid.remote()] = w

        def submit(item: tuple[list[Block], list[str]], w: _Worker):
            if as_tasks:
                return task.options(max_retries=0, retry_exceptions=False,
                                    **self._options(cpus, gpus, memory, w.node)).remote(stage_ref, *item, resources,
                                                                                         run_key)
            return w.actor.process.remote(*item)

        def drop(w: _Worker) -> None:
            if w in workers:
                workers.remove(w)
                if w.actor is not None:
                    with contextlib.suppress(Exception):
                        ray.kill(w.actor)

        def resize() -> None:
            """Start actors up to what the cluster holds now (and the work left); stop starting ones beyond."""
            left = len(pending) + len(inflight)
            try:
                want, _, _, _, slots = self.pool_shape(stage, max(1, left))
            except RetroError:  # no alive node can hold a worker now
                want, slots = 0, None
            for w in [w for w in workers if not w.ready][max(0, want - sum(w.ready for w in workers)):]:
                drop(w)
                probes.pop(next((r for r, x in probes.items() if x is w), None), None)
            free = list(slots or [])
            for w in workers:
                if w.node in free:
                    free.remove(w.node)
            while len(workers) < want:
                start(free.pop(0) if free else None)

        for i in range(n):
            start(nodes[i] if nodes else None)
        last_resize = time.monotonic()
        no_room_since = None
        try:
            while pending or inflight:
                for w in workers:
                    while w.ready and pending and w.load < per_worker:
                        item = pending.popleft()
                        inflight[submit(item, w)] = (item, w)
                        w.load += 1
                ready, _ = ray.wait(list(inflight) + list(probes), num_returns=1, timeout=1.0)
                for ref in ready:
                    if ref in probes:
                        w = probes.pop(ref)
                        try:
                            ray.get(ref)
                            w.ready = True
                        except RayError as e:  # the actor could not start (its node went, or it crashed)
                            lost_actors += 1
                            self.stats["lost"] += 1
                            self._event("worker_lost", what="start", error=type(e).__name__)
                            log.debug("[%s] a worker did not start: %s", stage.name, e)
                            drop(w)
                        continue
                    item, w = inflight.pop(ref)
                    group, todo = item
                    block = group[0]
                    what = f"block {block.name}" if len(group) == 1 else \
                        f"blocks {block.name}..{group[-1].name}"
                    w.load -= 1
                    try:
                        result = ray.get(ref)
                    except RayTaskError as e:
                        raise _code_error(stage, what, e) from None
                    except RayError as e:  # a lost worker, actor or node: the block goes to a live worker
                        infra_failures[block.name] += 1
                        self.stats["retries"] += 1
                        self._event("worker_lost" if w in workers else "retry", what=what, error=type(e).__name__)
                        if w in workers:
                            self.stats["lost"] += 1
                            lost_actors += 1
                            log.warning("[%s] worker lost during %s (%s); its blocks go to the other "
                                        "workers", stage.name, what, type(e).__name__)
                            drop(w)
                        if infra_failures[block.name] > INFRA_RETRIES:
                            raise StageFailed(f"[{stage.name}] {what}: its workers kept being lost "
                                              f"({type(e).__name__}); {CHECK_CLUSTER}") from None
                        pending.appendleft(item)
                    else:
                        self.stats["blocks"] += 1
                        results, records = result
                        replay(records)
                        for b, r in zip([b for b in group if b.name in set(todo)], results):
                            on_result(b, r)
                if lost_actors > INFRA_RETRIES * max(1, n):
                    raise StageFailed(f"[{stage.name}] {lost_actors} workers were lost or could not start; "
                                      f"{CHECK_CLUSTER}")
                now = time.monotonic()
                if now - last_resize > 2.0 or not any(w.ready for w in workers):
                    last_resize = now
                    resize()
                if (not as_tasks and any(w.ready for w in workers)) or self._feasible(ray, cpus, gpus, memory):
                    no_room_since = None
                else:
                    no_room_since = no_room_since or now
                    if now - no_room_since > self.node_wait_s:
                        raise self._no_node_error(ray, stage, f"{sum(len(t) for _, t in pending)} blocks left", cpus, gpus,
                                                  memory)
        finally:
            if as_tasks and not _stopped_by_signal():  # stopped by an error: no task of this run goes on writing
                for ref in inflight:
                    with contextlib.suppress(Exception):
                        ray.cancel(ref, force=True)
            for w in list(workers):
                drop(w)
