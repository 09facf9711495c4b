"""A Ray cluster of three nodes on this machine (``ray.cluster_utils.Cluster``: a head without CPUs, so every task
and actor runs on the two worker nodes, each its own raylet and object store; results on a directory all nodes
share): the benchmark spread over the nodes gives the metrics of an uninterrupted run, also when the worker node
holding a scoring actor is killed mid-run (its tasks and actor are re-run on the other node, each image counted once);
a two-worker fine-tune whose worker node is killed resumes from its last checkpoint on the same loss curve.

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


FINETUNE_SCRIPT = '''
import json, os, sys, threading, time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from oodseg.data.synthetic import build_suite
from oodseg.platform.trainer import FinetuneConfig, run_finetune
from oodseg.training.config import TrainConfig

work = Path(sys.argv[1])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
workers = [cluster.add_node(num_cpus=1) for _ in range(3)]  # two for the workers, a spare for the restart
cluster.wait_for_nodes()
ray.init(address=cluster.address, log_to_driver=False)
suite = build_suite(work / "suite", seed=5, size=(32, 64), n_train=8, n_val=1, n_anomaly=1, n_coco=1)
marker = work / "stalled.json"


class StallAt:
    """Rank 1 at step 4 of the first attempt: wait until the step-2 checkpoint is committed, say which node it runs
    on, then hang until its node is removed."""

    def __call__(self, step, rank):
        import ray.train

        if step != 4 or rank != 1 or marker.exists():
            return
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED,
                                               timeout_s=120)
        marker.write_text(json.dumps({"node": ray.get_runtime_context().get_node_id()}))
        time.sleep(600)


def kill_the_stalled_node():
    """The node of the stalled worker dies (SIGKILL, no graceful exit); the restart lands on the spare node."""
    while not marker.exists():
        time.sleep(0.2)
    node_id = json.loads(marker.read_text())["node"]
    cluster.remove_node(next(w for w in workers if w.node_id == node_id), allow_graceful=False)
    print("killed node", node_id, flush=True)


def config(name):
    tc = TrainConfig(model_cfg={"width": 0.25, "input_size": None}, data_root=str(suite), val_split="",
                     anomaly_set=None, steps=6, global_batch=4, crop=(32, 64), scale=(1.0, 1.0), hflip=False,
                     frozen_stats=True, lr=5e-3, warmup=1, log_every=1)
    return FinetuneConfig(train=tc, name=name, storage_path=str(work / "shared"), strategy="ddp", num_workers=2,
                          checkpoint_every=2, max_failures=2, extensions_dir=str(work / "ext"))


histories = {"whole": run_finetune(config("whole")).history}
threading.Thread(target=kill_the_stalled_node, daemon=True).start()
histories["node-lost"] = run_finetune(config("node-lost"), step_hook=StallAt()).history
(work / "histories.json").write_text(json.dumps(histories))
print("both runs finished", flush=True)
ray.shutdown()
cluster.shutdown()
'''


def test_a_lost_worker_node_resumes_a_two_worker_finetune_on_the_same_curve(tmp_path):
    """Two DDP workers, one per worker node (1 CPU each), checkpoints on a directory every node shares: the node of
    rank 1 is killed at step 4; Ray Train restarts the group on the surviving node and a spare one, from the
    step-2 checkpoint, and the loss curve equals the uninterrupted run's (same seed) up to float rounding."""
    import json

    import numpy as np

    script = tmp_path / "finetune.py"
    script.write_text(textwrap.dedent(FINETUNE_SCRIPT))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert "both runs finished" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "killed node" in proc.stdout, proc.stdout[-2000:]
    runs = json.loads((tmp_path / "histories.json").read_text())
    whole, lost = ({r["step"]: r for r in runs[k]} for k in ("whole", "node-lost"))
    assert sorted(whole) == sorted(lost) == list(range(1, 7))
    assert all(lost[s]["start_step"] == 2 for s in range(3, 7))  # re-ran steps 3–6 from the step-2 checkpoint
    np.testing.assert_allclose([lost[s]["loss"] for s in range(1, 7)], [whole[s]["loss"] for s in range(1, 7)],
                               rtol=1e-5, atol=1e-6)
