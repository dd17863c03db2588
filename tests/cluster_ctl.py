"""A simulated multi-node Ray cluster for tests, run as its own process: ``python cluster_ctl.py NODES CPUS
[MEMORY]`` (MEMORY: bytes of memory each worker node declares to Ray).

It starts a head with no CPUs (the driver's node) and NODES worker nodes of CPUS CPUs each, bound to this
machine's default node IP (Ray rewrites 127.0.0.1 to it when a driver connects), prints ``address <host:port>``
and then ``node <id>`` per worker node, and reads commands on stdin, answering each with one line:
``remove <node id>`` (kills that node's raylet, not gracefully: a lost machine), ``add`` (a new worker node;
answers ``node <id>``), ``quit``. It leaves ``ray_current_cluster`` as it found it.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    n_nodes, cpus = int(sys.argv[1]), int(sys.argv[2])
    node_args = {"num_cpus": cpus, **({"memory": int(sys.argv[3])} if len(sys.argv) > 3 else {})}
    # the driver sends this machine's Ray token when it has one (retro_pipeline.executor.ray); a cluster that
    # does not check it kills that driver's actors: check tokens where the driver sends one, as `ray start` does
    from embedder.ray_session import _send_token_if_we_have_one

    _send_token_if_we_have_one()
    from ray.cluster_utils import Cluster

    current = os.path.join(os.environ.get("RAY_TMPDIR") or "/tmp/ray", "ray_current_cluster")
    before = open(current).read() if os.path.exists(current) else None
    system = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
              "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": system})
    nodes = {}
    try:
        for _ in range(n_nodes):
            node = cluster.add_node(**node_args)
            nodes[node.node_id] = node
        cluster.wait_for_nodes()
        print("address", cluster.address, flush=True)
        for node_id in nodes:
            print("node", node_id, flush=True)
        for line in sys.stdin:
            cmd = line.split()
            if not cmd or cmd[0] == "quit":
                break
            if cmd[0] == "remove":
                cluster.remove_node(nodes.pop(cmd[1]), allow_graceful=False)
                print("removed", cmd[1], flush=True)
            elif cmd[0] == "add":
                node = cluster.add_node(**node_args)
                nodes[node.node_id] = node
                cluster.wait_for_nodes()
                print("node", node.node_id, flush=True)
    finally:
        cluster.shutdown()
        if before is None:
            if os.path.exists(current):
                os.unlink(current)
        else:
            with open(current, "w") as f:
                f.write(before)


if __name__ == "__main__":
    main()
