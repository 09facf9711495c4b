"""Training pieces without Ray: LR schedule, parameter selection (incl. LoRA), data order, OE data path, step."""

from __future__ import annotations

import json
import math
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from oodseg.models import create_model
from oodseg.training.config import TrainConfig
from oodseg.training.data import SegAugment, StepBatches, TrainSamples, collate, step_items
from oodseg.training.params import (
    apply_lora,
    lora_target_names,
    merge_lora,
    select_parameters,
    train_mode,
)
from oodseg.training.schedule import build_scheduler, lr_factor
from oodseg.training.step import forward_loss, torch_step

TINY = {"width": 0.25, "input_size": None}


def tiny_erfnet(seed: int = 0, **cfg) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("erfnet", **{**TINY, **cfg})


# --- LR schedule ------------------------------------------------------------------------------------------------
def test_lr_factor_matches_hand_computed_values():
    kw = dict(total=110, warmup=10)
    assert lr_factor(0, **kw) == pytest.approx(0.1)  # (0 + 1) / 10
    assert lr_factor(9, **kw) == pytest.approx(1.0)
    assert lr_factor(10, **kw) == pytest.approx(1.0)  # cosine at p = 0
    assert lr_factor(60, **kw) == pytest.approx(0.5)  # cos(pi/2) = 0 -> 0.5
    assert lr_factor(35, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_factor(110, **kw) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(60, kind="poly", power=0.9, **kw) == pytest.approx(0.5**0.9)
    assert lr_factor(110, min_ratio=0.1, **kw) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unknown LR schedule"):
        lr_factor(0, total=10, kind="step")


def test_scheduler_drives_optimizer_lr():
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=0.02)
    sched = build_scheduler(opt, total=20, warmup=4, kind="poly")
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.02 * lr_factor(s, total=20, warmup=4, kind="poly") for s in range(20)]
    np.testing.assert_allclose(seen, expected, rtol=1e-12)


# --- parameter selection ------------------------------------------------------------------------------------------
def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_head_only_updates_only_the_head():
    model = tiny_erfnet()
    params = select_parameters(model, "head")
    assert _trainable(model) == {"decoder.output_conv.weight", "decoder.output_conv.bias"}
    assert len(params) == 2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(params, lr=1.0)
    x = torch.rand(2, 3, 32, 64)
    model.train()
    model(x).logits.square().mean().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"decoder.output_conv.weight", "decoder.output_conv.bias"}


def test_full_keeps_parameters_the_model_freezes_itself():
    model = tiny_erfnet()
    params = select_parameters(model, "full")
    unused = {"encoder.output_conv.weight", "encoder.output_conv.bias"}  # ERFNet's encoder-pretraining head
    assert _trainable(model) == {n for n, _ in model.named_parameters()} - unused
    assert len(params) == len(_trainable(model))


def test_groups_that_do_not_partition_the_model_are_refused():
    model = tiny_erfnet()
    groups = model.param_groups()
    head = groups.pop("head")
    model.param_groups = lambda: groups  # the classifier in no group: `full` would never train it
    with pytest.raises(ValueError, match=r"ERFNet.param_groups\(\): trainable parameters in no group: \['decoder"):
        select_parameters(model, "full")
    model.param_groups = lambda: {**groups, "head": head, "also": head[:1]}
    with pytest.raises(ValueError, match="in both 'head' and 'also'"):
        select_parameters(model, "head")


def test_last_k_selects_head_and_last_blocks():
    model = tiny_erfnet()
    select_parameters(model, "last_k:2")
    expected = {"decoder.output_conv.weight", "decoder.output_conv.bias"}
    expected |= {f"decoder.layers.{i}.{n}" for i in (4, 5) for n, _ in model.decoder.layers[i].named_parameters()}
    assert _trainable(model) == expected
    with pytest.raises(ValueError, match="blocks"):
        select_parameters(tiny_erfnet(), "last_k:99")
    with pytest.raises(ValueError, match="queries"):
        select_parameters(tiny_erfnet(), "queries")  # ERFNet has no query embeddings
    with pytest.raises(ValueError, match="unknown params spec"):
        select_parameters(tiny_erfnet(), "everything")


def test_lora_trains_only_adapters_and_merges_back_exactly():
    base = tiny_erfnet(seed=3)
    base.eval()
    x = torch.rand(2, 3, 32, 64)
    reference = base(x).logits
    model = tiny_erfnet(seed=3)
    targets = lora_target_names(model)
    dilated = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and max(m.dilation) > 1]
    assert targets and dilated and not set(targets) & set(dilated)
    params = select_parameters(model, "lora", lora_rank=2, lora_alpha=4)
    names = _trainable(model)
    assert names and all("lora_" in n for n in names)
    assert len(params) == len(names) == 2 * len(targets)  # one A and one B per adapted layer
    model.eval()
    torch.testing.assert_close(model(x).logits, reference)  # B starts at zero: the adapter is a no-op
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    adapted = model(x).logits
    assert (adapted - reference).abs().max() > 1e-3
    merged = merge_lora(model)
    assert set(merged.state_dict()) == set(base.state_dict())  # plain layers again: loads into an un-adapted model
    torch.testing.assert_close(merged(x).logits, adapted, atol=1e-5, rtol=1e-4)
    fresh = tiny_erfnet(seed=7)
    fresh.load_state_dict(merged.state_dict())
    fresh.eval()
    torch.testing.assert_close(fresh(x).logits, adapted, atol=1e-5, rtol=1e-4)


def test_apply_lora_rejects_model_without_targets():
    with pytest.raises(ValueError, match="no Linear"):
        apply_lora(nn.Sequential(nn.ReLU()))


def test_train_mode_freezes_stats_of_frozen_or_all_norms():
    model = tiny_erfnet()
    select_parameters(model, "head")
    train_mode(model)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)  # all BN params frozen -> running stats kept
    assert model.decoder.output_conv.training
    model = tiny_erfnet()
    select_parameters(model, "full")
    train_mode(model)
    assert all(m.training for m in model.modules())
    train_mode(model, frozen_stats=True)
    assert not any(m.training for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.Dropout2d)))
    assert model.training


# --- data order ---------------------------------------------------------------------------------------------------
def test_global_batch_is_independent_of_worker_count_and_covers_each_epoch():
    kw = dict(n=10, global_batch=4, seed=5)
    for step in range(7):
        one = [it for mb in step_items(step, **kw) for it in mb]
        two = [it for r in range(2) for mb in step_items(step, rank=r, world=2, **kw) for it in mb]
        acc = step_items(step, accum=2, **kw)
        assert one == two == acc[0] + acc[1] and len(acc) == 2 and len(acc[0]) == 2
    stream = [it for s in range(5) for it in step_items(s, **kw)[0]]  # 20 positions = 2 epochs
    for epoch in (0, 1):
        assert sorted(i for i, e in stream if e == epoch) == list(range(10))
    assert [i for i, e in stream if e == 0] != [i for i, e in stream if e == 1]  # reshuffled per epoch
    with pytest.raises(ValueError, match="divisible"):
        step_items(0, n=10, global_batch=6, seed=0, world=4)


class _ArrayDataset:
    name = "arrays"

    def __init__(self, n: int, h: int = 40, w: int = 60) -> None:
        rng = np.random.default_rng(0)
        self.items = [{"image": rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
                       "label": rng.integers(0, 19, (h, w), dtype=np.uint8)} for _ in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def test_augment_is_deterministic_per_index_and_epoch():
    samples = TrainSamples(_ArrayDataset(3), SegAugment(crop=(32, 48), scale=(0.8, 1.2)), seed=1)
    a, b, c = samples.get(2, 0), samples.get(2, 0), samples.get(2, 1)
    assert a["image"].shape == (32, 48, 3) and a["target"].shape == (32, 48)
    np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(a["image"], c["image"])
    # labels stay labels: nearest resizing introduces no new values (255 only from padding)
    assert set(np.unique(a["target"])) <= set(range(19)) | {255}
    np.testing.assert_array_equal(a["outlier_mask"], np.where(a["target"] == 255, 255, 0))


def test_outlier_paste_pixels_reach_the_oe_loss(train_suite):
    """Pasted COCO objects show up as 254 / mask 1 and drive the OE loss gradient; CE ignores exactly them."""
    from oodseg.data import create_dataset
    from oodseg.data.coco import CocoObjects
    from oodseg.data.paste import OutlierPaste
    from oodseg.losses import create_loss

    ds = create_dataset("cityscapes", root=train_suite, split="train")
    paste = OutlierPaste(CocoObjects(train_suite / "coco"), ood_prob=1.0, road_only=False, seed=0)
    samples = TrainSamples(ds, SegAugment(crop=(48, 96), scale=(0.9, 1.1)), seed=0, paste=paste)
    batch = collate([samples.get(i, 0) for i in range(4)])
    out = batch["outlier_mask"] == 1
    assert out.any()
    torch.testing.assert_close(out, batch["target"] == 254)
    logits = torch.randn(4, 19, 48, 96, requires_grad=True)
    create_loss("oe")(logits, batch["target"], batch["outlier_mask"]).backward()
    grad_oe = logits.grad.abs().sum(1)
    assert (grad_oe[out] > 0).float().mean() > 0.5
    logits.grad = None
    create_loss("ce")(logits, batch["target"], batch["outlier_mask"]).backward()
    assert torch.all(logits.grad.abs().sum(1)[out] == 0)
    assert (logits.grad.abs().sum(1)[batch["target"] < 19] > 0).all()


# --- step -----------------------------------------------------------------------------------------------------------
def test_gradient_accumulation_equals_one_big_batch():
    """accum=2 over halves == one step on the whole batch (BN on running stats; no ignore pixels, so the mean
    over pixels of each half weighs equally)."""
    from oodseg.losses import create_loss

    samples = TrainSamples(_ArrayDataset(8), SegAugment(crop=(32, 48), scale=(1.0, 1.0), hflip=False), seed=0)
    full = StepBatches(samples, start=0, stop=2, global_batch=4, seed=0)
    halves = StepBatches(samples, start=0, stop=2, global_batch=4, seed=0, accum=2)
    loss_fn = create_loss("ce")
    finals = []
    for data in (full, halves):
        model = tiny_erfnet(seed=1)
        params = select_parameters(model, "full")
        opt = torch.optim.AdamW(params, lr=1e-2)
        train_mode(model, frozen_stats=True)
        compute = partial(forward_loss, model, loss_fn=loss_fn)
        losses = [torch_step(model, opt, None, data[k], compute) for k in range(len(data))]
        finals.append((losses, {n: p.detach().clone() for n, p in model.named_parameters()}))
    np.testing.assert_allclose(finals[0][0], finals[1][0], rtol=1e-5)
    for n, p in finals[0][1].items():
        torch.testing.assert_close(p, finals[1][1][n], atol=1e-5, rtol=1e-4)


# --- demo model -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_checkpoint_is_cached_reproducible_and_self_describing(train_suite, tmp_path):
    from safetensors.torch import load_file

    from oodseg.models import create_model
    from oodseg.models.checkpoint import read_safetensors_metadata
    from oodseg.training.demo import DEMO_MODEL_CFG, get_demo_checkpoint

    a = get_demo_checkpoint(train_suite, tmp_path / "a", seed=0, steps=2, progress=None)
    stamp = a.stat().st_mtime_ns
    assert get_demo_checkpoint(train_suite, tmp_path / "a", seed=0, steps=2, progress=None) == a
    assert a.stat().st_mtime_ns == stamp  # cache hit: not retrained
    b = get_demo_checkpoint(train_suite, tmp_path / "b", seed=0, steps=2, progress=None)
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)  # same seed -> same weights
    c = get_demo_checkpoint(train_suite, tmp_path / "a", seed=1, steps=2, progress=None)
    assert c != a and not torch.equal(load_file(c)["decoder.output_conv.weight"], ta["decoder.output_conv.weight"])
    meta = read_safetensors_metadata(a)
    assert json.loads(meta["oodseg.demo.train_config"])["steps"] == 2 and float(meta["oodseg.demo.train_seconds"]) > 0
    assert "oodseg.demo.metrics" not in meta  # not validated: the benchmark measures the same splits
    model = create_model(checkpoint=a)
    assert model.cfg["input_size"] == DEMO_MODEL_CFG["input_size"]
    out = model.eval().predict(torch.zeros(1, 64, 128, 3, dtype=torch.uint8))
    assert out.size == (64, 128) and out.logits.shape[1] == 19
    assert not list(a.parent.glob("*.tmp"))  # atomic write left no temp file
    # the demo trains with denormals flushed; the process is left in the default mode afterwards
    assert torch.tensor([1e-40]).mul(1.0).item() != 0.0


# --- validation -----------------------------------------------------------------------------------------------------
def test_every_task_validates_on_the_same_evenly_spaced_subset(train_suite):
    from oodseg.training.evaluate import val_indices
    from oodseg.training.tasks import create_task

    assert val_indices(10, 4) == [0, 3, 6, 9] and val_indices(5, 0) == val_indices(5, 7) == [0, 1, 2, 3, 4]
    seg = create_task(TrainConfig(data_root=str(train_suite), val_images=3))
    data = seg.eval_data()
    assert {k: list(v.indices) for k, v in data.items()} == {"semantic": [0, 2, 3], "anomaly": [0, 2, 3]}
    saom = create_task(TrainConfig(task="saom", data_root=str(train_suite), val_images=3))
    frames = saom.samples(split="val")
    picked = saom.eval_data()["saom"]
    for i, s in zip([0, 2, 3], picked, strict=True):
        np.testing.assert_array_equal(s["image"], frames.get(i, 0)["image"])


def test_evaluation_split_over_ranks_merges_to_the_whole(train_suite):
    from oodseg.training.tasks import create_task

    task = create_task(TrainConfig(data_root=str(train_suite), scorer="msp"))
    model = tiny_erfnet()
    model.train()
    data = task.eval_data()
    whole = task.summarize(task.evaluate(model, data))
    parts = [task.evaluate(model, data, rank=r, world=3) for r in range(3)]
    for part in parts[1:]:
        for name in ("confusion", "pixel"):
            parts[0][name].merge(part[name])
    assert task.summarize(parts[0]) == pytest.approx(whole)
    assert model.training  # the model's mode is restored
