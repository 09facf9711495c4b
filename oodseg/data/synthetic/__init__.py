"""Procedural road-scene suite in the real on-disk formats, deterministic from a seed.

``build_suite(out, seed)`` (or the cached ``ensure_suite``) writes, under ``out``:

* ``cityscapes/{leftImg8bit,gtFine}/{train,val}/<city>/<city>_<6d>_<6d>_{leftImg8bit,gtFine_labelIds,
  gtFine_instanceIds}.png`` with real Cityscapes labelIds (road 7, sidewalk 8, building 11,
  vegetation 21, terrain 22, sky 23, person 24, car 26, ego vehicle 1), so the reader's official table yields
  trainIds, and 16-bit instanceIds in the official encoding (``labelId·1000 + k`` per person / car, plain labelId
  elsewhere; ``oodseg.data.instances`` reads them).
* ``Validation_Dataset/{RoadAnomaly21 (png), RoadObsticle21 (webp), FS_LostFound_full (png), fs_static (jpg),
  RoadAnomaly (jpg, anomaly=2)}/{images,labels_masks}`` with 0/1/255 labels; the obstacle set marks everything off
  the road as 255 (SMIYC obstacle-track convention); in the two SMIYC sets every 5th frame has no anomaly; the
  ego-vehicle hood is void.
* ``coco/annotations/instances_train2017.json`` + ``coco/train2017/*.jpg``: Outlier-Exposure objects with polygon and
  RLE masks in categories both excluded (person, car, ...) and kept by ``oodseg.data.coco`` (real COCO ids/names).

The suite differs from real data in difficulty, not in format: in-distribution classes have distinct colour families
and textures (``scene``), the test anomalies are saturated, patterned objects no class resembles (``anomalies``), and
the OE objects come from a disjoint generator (``outliers``). Every image draws from its own
``SeedSequence([seed, stream, index])``, so outputs do not depend on counts, order or the number of workers.

Modules: ``canvas`` (noise, materials, painting), ``scene`` (street scenes), ``anomalies`` (test anomalies per set),
``outliers`` (COCO-format OE source), ``suite`` (files, caching, CLI: ``python -m oodseg.data.synthetic --out DIR``).
"""

from oodseg.data.synthetic.anomalies import STYLES, AnomalyStyle
from oodseg.data.synthetic.outliers import COCO_CATEGORIES
from oodseg.data.synthetic.scene import Scene, render_scene
from oodseg.data.synthetic.suite import (
    ANOMALY_SETS,
    CITIES,
    DEFAULTS,
    MARKER,
    SUITE_VERSION,
    build_suite,
    ensure_suite,
    main,
    suite_matches,
)

__all__ = ["ANOMALY_SETS", "CITIES", "COCO_CATEGORIES", "DEFAULTS", "MARKER", "STYLES", "SUITE_VERSION",
           "AnomalyStyle", "Scene", "build_suite", "ensure_suite", "main", "render_scene", "suite_matches"]
