"""A Ray cluster of three nodes on this machine (``ray.cluster_utils.Cluster``: a head without CPUs, so every task
and actor runs on the two worker nodes, each its own raylet and object store; results on a directory all nodes
share): the benchmark spread over the nodes gives the metrics of an uninterrupted run, also when the worker node
holding a scoring actor is killed mid-run (its tasks and actor are re-run on the other node, each image counted once).

The cluster needs a process of its own (a pytest process already joined the session's Ray), so the test runs
:data:`SCRIPT` in a subprocess and compares the two runs' rows here.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from oodseg.platform.results import ResultsStore

pytestmark = pytest.mark.slow
SCRIPT = '''
import sys, threading, time
import ray
import torch
from ray.cluster_utils import Cluster

from oodseg.data.synthetic import build_suite
from oodseg.models import create_model, save_safetensors
from oodseg.platform.jobs import benchmark
from oodseg.platform.results import ResultsStore

work = sys.argv[1]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
cluster.wait_for_nodes()
ray.init(address=cluster.address, log_to_driver=False)
suite = build_suite(f"{work}/suite", seed=5, size=(64, 128), n_train=2, n_val=2, n_anomaly=6, n_coco=2)
torch.manual_seed(0)
model = save_safetensors(create_model("erfnet", channels=[4, 8, 16], input_size=None), f"{work}/m.safetensors")
store = ResultsStore(f"{work}/results")


def kill_an_actor_node(run_id):
    """After the run's first committed unit: remove (SIGKILL) the worker node that hosts a scoring actor."""
    while not store.completed_units(run_id):
        time.sleep(0.2)
    actors = [a for a in ray._private.state.actors().values()
              if "ScoreActor" in a["ActorClassName"] and a["State"] == "ALIVE"]
    node = next(w for w in workers if w.node_id == actors[0]["Address"]["NodeID"])
    cluster.remove_node(node, allow_graceful=False)
    print("killed node", node.node_id, flush=True)


for run_id in ("whole", "node-lost"):
    if run_id == "node-lost":
        threading.Thread(target=kill_an_actor_node, args=(run_id,), daemon=True).start()
    code = benchmark.main(["--data-root", str(suite), "--results", f"{work}/results", "--run-id", run_id,
                           "--batch-size", "1", "--plots", "false", "--num-actors", "2",
                           "--datasets", "fs_static,fs_lost_found,road_anomaly,cityscapes", "--scorers", "msp,energy",
                           "--set", f"models=[{{name: tiny, checkpoint: {model}}}]"])
    assert code == 0, (run_id, code)
print("both runs finished", flush=True)
ray.shutdown()
cluster.shutdown()
'''
COMPARED = {"metrics": ["dataset", "scorer"], "per_image": ["dataset", "image_id", "scorer"]}


def test_a_lost_worker_node_changes_no_metric(tmp_path):
    script = tmp_path / "cluster.py"
    script.write_text(textwrap.dedent(SCRIPT))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert "both runs finished" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "killed node" in proc.stdout, proc.stdout[-2000:]
    store = ResultsStore(str(tmp_path / "results"))
    for table, keys in COMPARED.items():
        df = store.read(table).drop(columns=["committed_at", "wall_s"], errors="ignore")
        frames = [df[df.run_id == r].drop(columns="run_id").sort_values(keys).reset_index(drop=True)
                  for r in ("whole", "node-lost")]
        assert len(frames[0]) and not frames[1].duplicated(keys).any()
        import pandas.testing as pdt

        pdt.assert_frame_equal(*frames, check_exact=True)
    assert store.read("failures").empty  # nothing spurious
    assert sorted(store.read("runs").status) == ["finished", "finished"]
