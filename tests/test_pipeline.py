"""End-to-end Ray Data benchmark on a tiny synthetic suite, checked against a plain single-process loop.

The reference loop shares no code with the pipeline beyond the public contracts (dataset ``load``,
``model.predict``, ``create_scorer``, the metric classes): one scorer and one image at a time, no state
packing or merging, one metric object updated image by image. Equality of the numbers proves the distributed
read → score → merge → component pass → commit path is right.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from oodseg.data import create_dataset
from oodseg.models import create_model, save_safetensors
from oodseg.outputs import PixelLogits
from oodseg.platform.benchmark import BenchmarkConfig, ModelSpec, run_benchmark
from oodseg.platform.cache import ShardCache, output_nbytes
from oodseg.platform.results import ResultsStore
from oodseg.scoring import create_scorer
from oodseg.scoring.metrics import ComponentMetrics, ConfusionMatrix, PixelMetrics, S2MMetrics

SCORERS = ("msp", "energy", "rba")
TEMPERATURES = (1.0, 2.0)
DATASETS = ("road_anomaly_21", "road_obstacle_21", "fs_static", "cityscapes")
N_IMAGES = 4  # per dataset = batch_size, so pipeline and reference run the model on identical batches


@pytest.fixture(scope="session")
def pipeline_suite(suite_factory) -> Path:
    """This module's suite: 96×192 frames, ``N_IMAGES`` per set (conftest's ``tiny_suite`` is smaller)."""
    return suite_factory(seed=3, size=(96, 192), n_train=2, n_val=N_IMAGES, n_anomaly=N_IMAGES, n_coco=2)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = create_model("erfnet", channels=[4, 8, 16], input_size=None)
    return save_safetensors(model, tmp_path_factory.mktemp("model") / "tiny.safetensors")


def make_cfg(results: Path, data_root: Path, model: Path, **kw) -> BenchmarkConfig:
    base = dict(
        results=str(results), data_root=str(data_root), models=(ModelSpec(name="tiny", checkpoint=str(model)),),
        datasets=DATASETS, scorers=SCORERS, temperatures=TEMPERATURES, batch_size=N_IMAGES,
        actor_num_cpus=1.0, read_num_cpus=0.5, read_concurrency=1, heatmaps=1, progress=False, cache_outputs=True,
    )
    base.update(kw)
    return BenchmarkConfig(**base)


@pytest.fixture(scope="session")
def benchmark_run(ray_session, pipeline_suite, tiny_model, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    run_id = run_benchmark(make_cfg(results, pipeline_suite, tiny_model, run_id="e2e"))
    return ResultsStore(str(results)), run_id


def reference_metrics(data_root: Path, model_path: Path, dataset: str, skip: set[str] = frozenset()) -> dict:
    """Single-process loop: the same numbers computed the obvious way, one image after another."""
    torch.set_num_threads(1)
    model = create_model(checkpoint=model_path).eval()
    ds = create_dataset(dataset, root=str(data_root))
    refs = [r for r in ds.samples if r.id not in skip]
    samples = [ds.load(r) for r in refs]
    with torch.inference_mode():
        outputs = model.predict(torch.from_numpy(np.stack([s["image"] for s in samples])))
    logits = outputs.logits
    if ds.kind == "semantic":
        cm = ConfusionMatrix(19)
        for b, s in enumerate(samples):
            cm.update(logits[b].argmax(0).numpy(), s["label"])
        return {"miou": cm.compute()["miou"], "n_images": len(samples)}
    out = {}
    for name in SCORERS:
        for t in TEMPERATURES:
            scorer = create_scorer(name, temperature=t)
            maps = [scorer(PixelLogits(logits[b : b + 1]), size=s["label"].shape)[0].numpy()
                    for b, s in enumerate(samples)]
            pm = PixelMetrics()
            for m, s in zip(maps, samples):
                pm.update(m, s["label"])  # one frame per image, as the SMIYC leaderboard counts them
            px = pm.compute()
            comp = ComponentMetrics(px["threshold"], track=ds.track)
            smiyc = ComponentMetrics.at_threshold(pm, ds.track, rule="smiyc")
            s2m = S2MMetrics()
            for m, s in zip(maps, samples):
                m16 = m.astype(np.float16)  # components are defined on the fp16 score maps
                comp.update(m16, s["label"])
                smiyc.update(m16, s["label"])
                s2m.update((m16 > np.float32(px["threshold"])).astype(np.float32), s["label"])
            smiyc_row = {k.replace("_smiyc", "") + "_smiyc_comp": v for k, v in smiyc.row().items()}
            out[(name, t)] = {**px, **comp.compute(), **smiyc_row, **{f"s2m_{k}": v for k, v in s2m.compute().items()},
                              "n_images": len(samples)}
    return out


def same(a: float | None, b: float) -> bool:
    """Equal up to float rounding of the summation order; NaN (undefined metric) equals NaN / null."""
    a = math.nan if a is None else float(a)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == pytest.approx(b, rel=1e-9, abs=1e-12)


def test_pipeline_matches_single_process_loop(benchmark_run, pipeline_suite, tiny_model):
    store, run_id = benchmark_run
    df = store.read("metrics")
    df = df[df.run_id == run_id]
    assert set(df.dataset) == set(DATASETS)
    for dataset in DATASETS:
        ref = reference_metrics(pipeline_suite, tiny_model, dataset)
        rows = df[df.dataset == dataset]
        if dataset == "cityscapes":
            (row,) = rows.itertuples()
            assert row.n_images == ref["n_images"] == N_IMAGES
            assert row.miou == pytest.approx(ref["miou"], rel=1e-12)
            continue
        assert len(rows) == len(SCORERS) * len(TEMPERATURES)
        for row in rows.itertuples():
            r = ref[(row.scorer, row.temperature)]
            assert row.n_images == r["n_images"] == N_IMAGES
            assert row.n_pixels == r["n_pixels"] and row.n_anomaly_pixels == r["n_anomaly"] > 0
            for col, key in [("auprc", "auprc"), ("fpr95", "fpr95"), ("auroc", "auroc"),
                             ("best_threshold", "threshold"), ("siou", "siou"), ("ppv", "ppv"),
                             ("mean_f1", "mean_f1"), ("auprc_smiyc", "auprc_smiyc"), ("fpr95_smiyc", "fpr95_smiyc"),
                             ("auroc_smiyc", "auroc_smiyc"), ("fpr95_interp", "fpr95_interp"),
                             ("siou_smiyc", "siou_smiyc_comp"), ("mean_f1_smiyc", "mean_f1_smiyc_comp"),
                             ("s2m_iou", "s2m_iou"), ("s2m_mean_f1", "s2m_mean_f1")]:
                assert same(getattr(row, col), r[key]), (dataset, row.scorer, row.temperature, col,
                                                         getattr(row, col), r[key])
    # component metrics were actually computed for some unit (not all NaN)
    assert df[df.kind == "anomaly"]["siou"].notna().any()


def test_concurrent_actor_calls_give_the_same_rows(benchmark_run, pipeline_suite, tiny_model, tmp_path):
    """``actor_concurrency=2`` (a GPU actor's default: calls overlap, each call's rows and shards its own): the
    metric and per-image rows equal the one-call-at-a-time run's, component metrics (read from each call's shards)
    and the output cache included."""
    store, run_id = benchmark_run
    run_benchmark(make_cfg(tmp_path, pipeline_suite, tiny_model, run_id="concurrent", actor_concurrency=2))
    got = ResultsStore(str(tmp_path))
    for table, by in (("metrics", ["dataset", "scorer", "temperature"]),
                      ("per_image", ["dataset", "image_id", "scorer", "temperature"])):
        a = store.read(table).query("run_id == @run_id").sort_values(by).reset_index(drop=True)
        b = got.read(table).sort_values(by).reset_index(drop=True)
        numeric = [c for c in a.columns if a[c].dtype.kind in "fi" and c != "wall_s"]  # all but the timing
        assert len(a) == len(b) > 0 and a[by].equals(b[by])
        np.testing.assert_array_equal(a[numeric].to_numpy(), b[numeric].to_numpy(), err_msg=table)
    assert got.read("metrics")["siou"].notna().any()
    cache = ShardCache(str(tmp_path), "concurrent", "tiny", "fs_static", "outputs")
    assert len(list(cache.items())) == N_IMAGES


def test_temperature_changes_msp_but_not_maxlogit_ranking(benchmark_run):
    """Sanity of the sweep bookkeeping: MSP's ranking depends on T, energy/rba rows exist per T."""
    store, run_id = benchmark_run
    df = store.read("metrics")
    msp = df[(df.scorer == "msp") & (df.dataset == "fs_static")].set_index("temperature")["auprc"]
    assert set(msp.index) == set(TEMPERATURES)
    assert msp[1.0] != msp[2.0]


def test_per_image_and_output_cache(benchmark_run, pipeline_suite, tiny_model):
    store, run_id = benchmark_run
    per_image = store.read("per_image")
    fs = per_image[(per_image.dataset == "fs_static") & (per_image.scorer == "msp") & (per_image.temperature == 1.0)]
    assert len(fs) == N_IMAGES and (fs.n_anomaly > 0).all()
    # per-image summary against a direct computation for one image
    model = create_model(checkpoint=tiny_model).eval()
    ds = create_dataset("fs_static", root=str(pipeline_suite))
    samples = [ds.load(r) for r in ds.samples]
    sample = samples[0]
    with torch.inference_mode():  # the same 4-image batch the actor ran (conv results depend on the batch)
        batch_out = model.predict(torch.from_numpy(np.stack([s["image"] for s in samples])))
    out = PixelLogits(batch_out.logits[:1], size=batch_out.size)
    score = create_scorer("msp")(out, size=sample["label"].shape)[0].numpy().astype(np.float64)
    row = fs[fs.image_id == sample["id"]].iloc[0]
    assert row.score_mean_anomaly == pytest.approx(score[sample["label"] == 1].mean(), rel=1e-9)
    assert row.score_mean_inlier == pytest.approx(score[sample["label"] == 0].mean(), rel=1e-9)
    # the output cache holds the model's logits in fp16 with the label, one entry per image
    cache = ShardCache(store.root, run_id, "tiny", "fs_static", "outputs")
    items = {it.id: it for it in cache.items()}
    assert len(items) == N_IMAGES
    item = items[sample["id"]]
    np.testing.assert_array_equal(item.label, sample["label"])
    assert item.outputs.logits.dtype == torch.float16
    np.testing.assert_allclose(item.outputs.logits.float().numpy(), out.logits.half().float().numpy(), rtol=0, atol=0)
    c, h, w = out.logits.shape[1:]
    unpacked = 0
    for path in cache.shards():  # zstd frames holding at least every image's fp16 logits
        with cache.fs.open_input_stream(path, compression="zstd") as src:
            unpacked += len(src.read())
    assert unpacked >= N_IMAGES * output_nbytes("pixel", c, (h, w)) > 0
    assert cache.nbytes() < unpacked
    # scratch score maps are gone after commit; heatmaps were drawn
    assert not ShardCache(store.root, run_id, "tiny", "fs_static", "scores").shards()
    assert list(Path(store.root, "plots", run_id, "heatmaps").glob("tiny__fs_static__*.png"))


def test_bad_inputs_become_failures_and_the_rest_is_intact(ray_session, pipeline_suite, tiny_model, tmp_path):
    data = tmp_path / "data"
    src = pipeline_suite / "Validation_Dataset" / "fs_static"
    dst = data / "Validation_Dataset" / "fs_static"
    shutil.copytree(src, dst)
    ds = create_dataset("fs_static", root=str(data))
    corrupt, wrong = ds.samples[0], ds.samples[1]
    Path(corrupt.image_path).write_bytes(b"\xff\xd8\xff this is not a jpeg")
    from PIL import Image

    Image.fromarray(np.zeros((10, 20), np.uint8)).save(wrong.label_path)
    cfg = make_cfg(tmp_path / "results", data, tiny_model, datasets=("fs_static",), run_id="bad",
                   component_metrics=False, cache_outputs=False, batch_size=2)
    run_benchmark(cfg)
    store = ResultsStore(str(tmp_path / "results"))
    failures = store.read("failures").set_index("image_id")
    assert set(failures.index) == {corrupt.id, wrong.id}
    assert failures.loc[corrupt.id, "stage"] == "read"
    assert corrupt.image_path in failures.loc[corrupt.id, "error"] and "corrupt" in failures.loc[corrupt.id, "error"]
    assert wrong.label_path in failures.loc[wrong.id, "error"] and "size" in failures.loc[wrong.id, "error"]
    assert failures.loc[corrupt.id, "file"] == corrupt.image_path  # the file at fault: the image …
    assert failures.loc[wrong.id, "file"] == wrong.label_path  # … or its label
    metrics = store.read("metrics")
    assert (metrics.n_images == N_IMAGES - 2).all() and (metrics.n_failures == 2).all()
    # the other images' metrics are exactly those of a loop over the good images only
    ref = reference_metrics(data, tiny_model, "fs_static", skip={corrupt.id, wrong.id})
    for row in metrics.itertuples():
        assert row.auprc == pytest.approx(ref[(row.scorer, row.temperature)]["auprc"], rel=1e-9)


def test_resume_after_killed_run_skips_committed_units(ray_session, pipeline_suite, tiny_model, tmp_path, monkeypatch):
    results = tmp_path / "results"
    cfg = make_cfg(results, pipeline_suite, tiny_model, datasets=("fs_static", "road_anomaly_21"), run_id="resume",
                   scorers=("msp",), temperatures=(1.0,), component_metrics=False, cache_outputs=True, heatmaps=0)
    real_commit = ResultsStore.commit_tables
    done: list[str] = []  # the units commit in the order they finish, which varies from run to run

    def killed_at_second_unit(self, key, tables):
        if done:
            # the process dies after writing some parts of the unit but before its metrics part
            self.write_part("per_image", key, tables["per_image"])
            raise KeyboardInterrupt("SIGINT while committing")
        done.append(key)
        return real_commit(self, key, tables)

    monkeypatch.setattr(ResultsStore, "commit_tables", killed_at_second_unit)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(cfg)
    monkeypatch.undo()
    first = done[0].split("__")[-1]
    killed = ({"fs_static", "road_anomaly_21"} - {first}).pop()
    store = ResultsStore(str(results))
    assert store.completed_units("resume") == {("tiny", first, "score")}
    first_part = Path(store.part_path("metrics", f"resume__tiny__{first}"))
    stamp = first_part.stat().st_mtime_ns

    run_benchmark(cfg)
    assert store.completed_units("resume") == {("tiny", "fs_static", "score"), ("tiny", "road_anomaly_21", "score")}
    assert first_part.stat().st_mtime_ns == stamp  # the finished unit was skipped, not redone
    per_image = store.read("per_image")
    assert len(per_image[per_image.dataset == killed]) == N_IMAGES  # redone unit: no duplicate rows
    cache = ShardCache(store.root, "resume", "tiny", killed, "outputs")
    assert len(list(cache.items())) == N_IMAGES  # its cache was cleared before the redo
    runs = store.read("runs")
    assert sorted(runs.status) == ["finished", "interrupted"]


def test_report_reproduces_the_run_and_draws_from_the_cache(benchmark_run, pipeline_suite, capsys):
    from oodseg.__main__ import main as oodseg_main
    from oodseg.report import dataset_title, standard_table

    store, run_id = benchmark_run
    table, info = standard_table(store, [run_id])
    metrics = store.read("metrics")
    for r in metrics[(metrics.kind == "anomaly") & (metrics.temperature == 2.0)].itertuples():
        cell = table.loc[("tiny", f"{r.scorer} (cl, T=2)"), (dataset_title(r.dataset), "AuPRC")]
        assert cell == pytest.approx(100 * r.auprc, rel=1e-12)
    miou = metrics[metrics.dataset == "cityscapes"].miou.iloc[0]
    assert table[("Cityscapes mIoU", "mIoU")].tolist() == pytest.approx([100 * miou] * len(table))
    image_id = create_dataset("fs_static", root=str(pipeline_suite)).samples[2].id
    args = ["report", "--results", store.root, "--runs", run_id, "--no-plots", "--scorer", "energy"]
    assert oodseg_main([*args, "--heatmap", f"tiny:fs_static:{image_id}"]) == 0
    (path,) = Path(store.root, "plots", run_id, "heatmaps").glob(f"tiny__fs_static__{image_id}__energy.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert oodseg_main([*args, "--heatmap", "tiny:fs_static:no_such_image"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_image" in err[0] and image_id in err[0]  # names the cached ids


TINY_EOMT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=48, patch_size=8,
                 num_queries=6, num_blocks=1, num_register_tokens=1, num_labels=19, mlp_ratio=2)


def test_mask_model_placements_and_cache(ray_session, pipeline_suite, tmp_path):
    """EoMT-style mask outputs (sliding windows → crops): both temperature placements, the fp16 output cache,
    against a loop applying each scorer to the model's batch output."""
    torch.manual_seed(1)
    path = save_safetensors(create_model("eomt", config=TINY_EOMT), tmp_path / "eomt.safetensors")
    cfg = make_cfg(tmp_path / "results", pipeline_suite, path, models=(ModelSpec(name="mask", checkpoint=str(path)),),
                   datasets=("fs_static",), scorers=("msp", "energy"), temperatures=(0.5, 1.0),
                   placements=("cl", "pl"), run_id="mask", heatmaps=0, plots=False, cache_outputs=True)
    run_benchmark(cfg)
    store = ResultsStore(cfg.results)
    rows = store.read("metrics")
    assert len(rows) == 2 * 2 * 2 and set(rows.stage) == {"score"}
    model = create_model(checkpoint=path).eval()
    ds = create_dataset("fs_static", root=str(pipeline_suite))
    samples = [ds.load(r) for r in ds.samples]
    with torch.inference_mode():
        out = model.predict(torch.from_numpy(np.stack([s["image"] for s in samples])))
    assert out.crops is not None and out.crops.shape[0] > len(samples)  # several windows per image
    for row in rows.itertuples():
        maps = create_scorer(row.scorer, temperature=row.temperature, placement=row.placement)(out).numpy()
        pm = PixelMetrics()
        for m, s in zip(maps, samples):
            pm.update(m, s["label"])
        ref = pm.compute()
        assert same(row.auprc, ref["auprc"]) and same(row.fpr95, ref["fpr95"]), row
    cl = rows[(rows.scorer == "msp") & (rows.placement == "cl")].set_index("temperature").auprc
    pl = rows[(rows.scorer == "msp") & (rows.placement == "pl")].set_index("temperature").auprc
    assert cl[0.5] != pl[0.5] and cl[1.0] == pl[1.0]  # placements differ only when T != 1
    # cached class + mask logits rebuild single-image MaskOutputs whose scores match the batch scores (fp16 inputs)
    items = list(ShardCache(store.root, "mask", "mask", "fs_static", "outputs").items())
    assert len(items) == len(samples)
    by_id = {it.id: it for it in items}
    msp = create_scorer("msp")
    for b, s in enumerate(samples):
        cached = by_id[s["id"]].outputs
        assert cached.mask_logits.dtype == torch.float16 and cached.n_images == 1
        np.testing.assert_allclose(msp(cached.to(dtype=torch.float32))[0].numpy(), msp(out)[b].numpy(), atol=2e-3)


def reference_s2m(data_root: Path, model_path: Path, sam_path: Path, dataset: str, prompter_cfg: dict) -> dict:
    """Single-process S2M loop: score maps (fp16, as the score stage stores them) → components prompter at the set's
    own calibration → SAM masks → assembled map; then every metric on the refined maps image by image."""
    from oodseg.models.sam import create_sam
    from oodseg.refine import ScoreCalibration, create_prompter, refine_s2m

    torch.set_num_threads(1)
    model = create_model(checkpoint=model_path).eval()
    sam = create_sam(str(sam_path)).eval()
    ds = create_dataset(dataset, root=str(data_root))
    samples = [ds.load(r) for r in ds.samples]
    with torch.inference_mode():
        logits = model.predict(torch.from_numpy(np.stack([s["image"] for s in samples]))).logits
    maps = [create_scorer("msp")(PixelLogits(logits[b : b + 1]), size=s["label"].shape)[0].numpy()
            for b, s in enumerate(samples)]
    calibration = ScoreCalibration.from_pixel_metrics(
        PixelMetrics().update(np.stack(maps), np.stack([s["label"] for s in samples])))
    prompter = create_prompter("components", **prompter_cfg)
    with torch.inference_mode():
        refined = [refine_s2m(s["image"], m.astype(np.float16).astype(np.float32), prompter, sam, calibration)[0]
                   .numpy() for m, s in zip(maps, samples)]
    pm = PixelMetrics()
    for m, s in zip(refined, samples):
        pm.update(m, s["label"])
    px = pm.compute()
    comp, s2m = ComponentMetrics(px["threshold"], track=ds.track), S2MMetrics()
    for m, s in zip(refined, samples):
        comp.update(m.astype(np.float16), s["label"])
        s2m.update(m.astype(np.float16).astype(np.float32), s["label"])
    return {**px, **comp.compute(), **{f"s2m_{k}": v for k, v in s2m.compute().items()},
            "boxes": sum(int(m.max() > 0) for m in refined)}


def test_s2m_refine_stage_matches_single_process_loop(ray_session, pipeline_suite, tiny_model, tmp_path):
    """``refine: s2m`` (components prompter, a tiny SAM file) against :func:`reference_s2m`: same rows, and the
    plain rows of the same run are untouched by the extra stage."""
    from oodseg.models.sam import create_sam, save_sam
    from oodseg.platform.benchmark.config import RefineSpec

    torch.manual_seed(2)
    sam_path = save_sam(create_sam("tiny", image_size=64), tmp_path / "sam.safetensors")
    prompter_cfg = {"min_area": 4}
    datasets = ("road_anomaly_21", "fs_static")
    cfg = make_cfg(tmp_path / "results", pipeline_suite, tiny_model, datasets=datasets, scorers=("msp", "energy"),
                   temperatures=(1.0,), run_id="s2m", refine="s2m", heatmaps=0, plots=False, cache_outputs=False,
                   refine_cfg=RefineSpec(prompter="components", prompter_cfg=prompter_cfg, sam=str(sam_path),
                                         scorers=("msp",)))
    run_benchmark(cfg)
    store = ResultsStore(cfg.results)
    rows = store.read("metrics")
    assert sorted(rows.scorer.unique()) == ["energy", "msp", "msp+s2m"]
    assert set(map(tuple, rows[["scorer", "stage"]].drop_duplicates().values)) == {
        ("msp", "score"), ("energy", "score"), ("msp+s2m", "s2m")}
    assert store.completed_units("s2m") == {("tiny", d, st) for d in datasets for st in ("score", "s2m")}
    prompted = 0
    for dataset in datasets:
        ref = reference_s2m(pipeline_suite, tiny_model, sam_path, dataset, prompter_cfg)
        prompted += ref["boxes"]
        (row,) = rows[(rows.dataset == dataset) & (rows.scorer == "msp+s2m")].itertuples()
        assert row.n_images == N_IMAGES
        for col, key in [("auprc", "auprc"), ("fpr95", "fpr95"), ("siou", "siou"), ("ppv", "ppv"),
                         ("mean_f1", "mean_f1"), ("s2m_iou", "s2m_iou"), ("s2m_auiou", "s2m_auiou"),
                         ("s2m_mean_f1", "s2m_mean_f1")]:
            assert same(getattr(row, col), ref[key]), (dataset, col, getattr(row, col), ref[key])
    assert prompted > 0  # some image got a box, so SAM ran and the comparison covers the masks
    assert not ShardCache(store.root, "s2m", "tiny", "fs_static", "refined").shards()  # scratch maps cleaned up
