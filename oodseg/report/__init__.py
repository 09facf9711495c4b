"""Results reporting: the standard tables (:mod:`.tables`), plots (:mod:`.plots`) and ``python -m oodseg report``
(:mod:`.cli`), all read from the Parquet results store with DuckDB."""

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
