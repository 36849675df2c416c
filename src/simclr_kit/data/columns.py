"""A dataset's image and label columns: found by their feature type, or the ones named checked;
a label column read as one array."""

from __future__ import annotations

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from simclr_kit.errors import UserError


def _checked_override(features: datasets.Features, name: str, role: str, fits: bool,
                      requirement: str) -> str:
    """``name`` when the user-named column exists and ``fits``; else a one-line error."""
    if name not in features:
        raise UserError(f"{role} column {name!r} not found; columns: {list(features)}")
    if not fits:
        raise UserError(f"{role} column {name!r} has type {features[name]}: it {requirement}")
    return name


def find_image_column(features: datasets.Features, override: str | None) -> str:
    if override is not None:
        feature = features.get(override)
        # An Image feature, or file paths / encoded bytes that cast to one.
        fits = isinstance(feature, datasets.Image) or (
            isinstance(feature, datasets.Value)
            and feature.dtype in ("string", "binary", "large_string"))
        return _checked_override(features, override, "image", fits,
                                 "must hold images (an Image feature, file paths or encoded bytes)")
    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            return name
    raise UserError(f"no image column found (no feature of type Image) among {list(features)}; "
                    "name one with --image-column")


def find_label_column(features: datasets.Features, override: str | None) -> str | None:
    if override is not None:
        feature = features.get(override)
        fits = isinstance(feature, datasets.ClassLabel) or (
            isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")))
        return _checked_override(features, override, "label", fits,
                                 "must be a ClassLabel or an integer column")
    for name, feature in features.items():
        if isinstance(feature, datasets.ClassLabel):
            return name
    return None


def label_values(ds: datasets.Dataset, column: str) -> np.ndarray:
    """``ds``'s integer ``column`` as ``(len(ds),)`` int64 in row order, a missing label (None)
    as -1: read as one Arrow column, then put in the order of ``ds``'s rows (a split carved
    or selected from a larger one is a list of rows of it). ``ds[column]`` would build a
    Python object per row (bench/RESULTS.md)."""
    column_values = ds.data.column(column).cast(pa.int64())  # unsigned ones have no -1
    values = pc.fill_null(column_values, -1).to_numpy()
    rows = getattr(ds, "_indices", None)  # the rows of ``ds.data`` that ``ds`` holds, if not all
    if rows is not None:
        values = values[rows.column(0).to_numpy()]
    return values
