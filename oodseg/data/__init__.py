"""Data layer: dataset readers (registry; S2M's validation release in :mod:`oodseg.data.s2m`), COCO outlier source +
paste transform, synthetic road suite. No Ray."""

from oodseg.data.base import (
    DataError,
    DatasetInfo,
    Sample,
    SampleRef,
    create_dataset,
    dataset_info,
    default_datasets,
    list_datasets,
    read_image,
    read_label,
    register_dataset,
)
from oodseg.data.coco import DEFAULT_EXCLUDE, CocoObject, CocoObjects
from oodseg.data.instances import (
    CityscapesInstances,
    CocoInstances,
    InstanceSample,
    decode_cityscapes_instances,
    read_cityscapes_instances,
    read_coco_instances,
)
from oodseg.data.paste import OutlierPaste
from oodseg.data.readers import CityscapesDataset, MaskFolderDataset, cityscapes_id_to_train_id
from oodseg.data.s2m import S2MValidationSet

__all__ = [
    "DEFAULT_EXCLUDE",
    "CityscapesDataset",
    "CityscapesInstances",
    "CocoInstances",
    "CocoObject",
    "CocoObjects",
    "DataError",
    "DatasetInfo",
    "InstanceSample",
    "MaskFolderDataset",
    "OutlierPaste",
    "S2MValidationSet",
    "Sample",
    "SampleRef",
    "cityscapes_id_to_train_id",
    "create_dataset",
    "dataset_info",
    "decode_cityscapes_instances",
    "default_datasets",
    "list_datasets",
    "read_cityscapes_instances",
    "read_coco_instances",
    "read_image",
    "read_label",
    "register_dataset",
]
