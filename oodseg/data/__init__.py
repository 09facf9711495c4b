"""Data layer: dataset readers (registry), COCO outlier source + paste transform, synthetic road suite. No Ray."""

from oodseg.data.base import (
    DataError,
    Sample,
    SampleRef,
    create_dataset,
    list_datasets,
    read_image,
    read_label,
    register_dataset,
)
from oodseg.data.coco import DEFAULT_EXCLUDE, CocoObject, CocoObjects
from oodseg.data.paste import OUTLIER_ID, OutlierPaste
from oodseg.data.readers import CityscapesDataset, MaskFolderDataset, cityscapes_id_to_train_id

__all__ = [
    "DEFAULT_EXCLUDE",
    "OUTLIER_ID",
    "CocoObject",
    "CocoObjects",
    "OutlierPaste",
    "CityscapesDataset",
    "DataError",
    "MaskFolderDataset",
    "Sample",
    "SampleRef",
    "cityscapes_id_to_train_id",
    "create_dataset",
    "list_datasets",
    "read_image",
    "read_label",
    "register_dataset",
]
