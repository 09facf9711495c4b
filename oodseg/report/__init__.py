"""Results reporting: the standard tables (:mod:`.tables`) and plots (:mod:`.plots`), which ``python -m oodseg report``
(:mod:`oodseg.platform.jobs.report`) and the jobs draw from the Parquet results store."""

from oodseg.report.plots import curves_figure, heatmap_png, plot_curves
from oodseg.report.tables import (
    component_table,
    dataset_title,
    format_components,
    format_table,
    object_table,
    select_rows,
    standard_table,
)

__all__ = [
    "component_table",
    "curves_figure",
    "dataset_title",
    "format_components",
    "format_table",
    "heatmap_png",
    "object_table",
    "plot_curves",
    "select_rows",
    "standard_table",
]
