"""What a run reads and how it sees it: :class:`DataConfig` (the dataset, its columns, sizes and
decoding) and :class:`AugmentConfig` (the SimCLR views).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from simclr_kit.config.fields import (ensure, from_dict, merge, normalize_keys, one_of, probability,
                                      setting, unflagged)


@dataclass(frozen=True)
class AugmentConfig:
    """SimCLR view augmentation (Chen et al. 2020, appendix A); ``None`` means size-dependent.

    Colour jitter strength s gives brightness/contrast/saturation 0.8 s and hue 0.2 s; the paper
    uses s=0.5 for CIFAR-10 and s=1.0 for ImageNet, so ``None`` picks 0.5 at <= 64 px, else 1.0.
    Blur is off at <= 32 px (it destroys tiny images) and p=0.5 above.
    """

    crop_scale_min: float = setting(0.08, "smallest crop area, a fraction of the image's")
    crop_scale_max: float = setting(1.0, "largest crop area, a fraction of the image's")
    crop_ratio_min: float = setting(3 / 4, "smallest crop aspect ratio, width / height")
    crop_ratio_max: float = setting(4 / 3, "largest crop aspect ratio, width / height")
    flip_p: float = setting(0.5, "horizontal flip probability")
    jitter_p: float = setting(0.8, "colour jitter probability")
    jitter_strength: float | None = setting(
        None, "colour strength s: brightness, contrast, saturation 0.8 s, hue 0.2 s",
        shown="0.5 at <= 64 px, 1.0 above")
    grayscale_p: float = setting(0.2, "grayscale probability")
    blur_p: float | None = setting(None, "Gaussian blur probability",
                                   shown="0 at <= 32 px, 0.5 above")
    blur_sigma_min: float = setting(0.1, "smallest blur sigma, in pixels")
    blur_sigma_max: float = setting(2.0, "largest blur sigma, in pixels")
    solarize_p: float = setting(0.0, "solarize probability")
    solarize_threshold: float = setting(0.5, "solarize inverts pixels >= this, on a 0-1 scale")

    def __post_init__(self) -> None:
        ensure(0 < self.crop_scale_min <= self.crop_scale_max <= 1, "augment.crop_scale_min/max",
               "0 < min <= max <= 1", (self.crop_scale_min, self.crop_scale_max))
        ensure(0 < self.crop_ratio_min <= self.crop_ratio_max, "augment.crop_ratio_min/max",
               "0 < min <= max", (self.crop_ratio_min, self.crop_ratio_max))
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            probability(f"augment.{name}", getattr(self, name))
        if self.jitter_strength is not None:
            ensure(0 <= self.jitter_strength <= 1.25, "augment.jitter_strength", "in [0, 1.25]",
                   self.jitter_strength)
        ensure(0 < self.blur_sigma_min <= self.blur_sigma_max, "augment.blur_sigma_min/max",
               "0 < min <= max", (self.blur_sigma_min, self.blur_sigma_max))
        ensure(0 <= self.solarize_threshold <= 1, "augment.solarize_threshold", "in [0, 1]",
               self.solarize_threshold)

    def resolved(self, image_size: int) -> AugmentConfig:
        """The same config with the size-dependent ``None`` defaults filled in."""
        strength = self.jitter_strength
        if strength is None:
            strength = 0.5 if image_size <= 64 else 1.0
        blur_p = self.blur_p
        if blur_p is None:
            blur_p = 0.0 if image_size <= 32 else 0.5
        return dataclasses.replace(self, jitter_strength=strength, blur_p=blur_p)

    @property
    def jitter(self) -> tuple[float, float, float, float]:
        """(brightness, contrast, saturation, hue) from the strength s: 0.8s, 0.8s, 0.8s, 0.2s."""
        s = 0.5 if self.jitter_strength is None else self.jitter_strength
        return 0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are read."""

    data: str = setting("digits", "images: 'digits' (embedded), a hub id, a save_to_disk folder, "
                        "a Parquet folder or glob, or an image folder", shown="",
                        pinned_by_recipe=False)
    data_config: str | None = setting(None, "hub dataset configuration name", shown="none")
    revision: str | None = setting(None, "hub dataset revision: branch, tag or commit",
                                   shown="the main branch")
    train_split: str | None = setting(None, "split to train on",
                                      shown="'train' or the only split")
    eval_split: str | None = setting(None, "split to evaluate on", shown="'validation', else "
                                     "'test', else a stratified part of train")
    image_column: str | None = setting(None, "image column", shown="the Image feature")
    label_column: str | None = setting(None, "label column", shown="the ClassLabel feature")
    image_size: int | None = setting(None, "working size in pixels", shown="the images' own "
                                     "size when they share one, up to 224")
    val_fraction: float = setting(0.2, "part split off for validation when there is a single "
                                       "split")
    split_seed: int = setting(0, "seed of that split")
    bad_images: str = setting("skip", "unreadable images: 'skip' (counted and listed) or 'error'")
    store_size: int | None = setting(
        None, "pretraining: the longer side, in pixels, of the stored training images (whole "
        "images, aspect ratio kept, never enlarged); the random resized crops are drawn over "
        "each whole image, so a larger side gives sharper views and a larger decoded file",
        shown="2 x --image-size up to a multiple of 8 (448 for 224), or the largest image's "
        "longer side when smaller")
    crop_fraction: float | None = setting(
        None, "evaluation crop above 64 px: resize the shorter side to --image-size / this, "
        "then keep the centre --image-size square (0.875: 256 -> 224); 1 keeps the whole "
        "shorter side. Used by the kNN monitor, evaluate, embed, train-classifier and predict",
        shown="the run's recorded value, else 0.875")
    decode_workers: int | None = setting(None, "processes that decode the images, once per "
                                               "machine, into the shared cache file",
                                         shown="the machine's cores", resumable=True)
    cache_dir: str | None = unflagged(None, "not read by anything; accepted so that config "
                                            "files that name it still load")

    def __post_init__(self) -> None:
        if self.image_size is not None:
            ensure(8 <= self.image_size <= 1024, "image_size", "an integer in [8, 1024] pixels",
                   self.image_size)
        ensure(0 < self.val_fraction < 1, "val_fraction", "in (0, 1)", self.val_fraction)
        one_of(self, "bad_images", ("skip", "error"), "bad-images policy")
        if self.store_size is not None:
            ensure(8 <= self.store_size <= 2048, "store_size", "an integer in [8, 2048] pixels",
                   self.store_size)
        if self.crop_fraction is not None:
            ensure(0.5 <= self.crop_fraction <= 1, "crop_fraction", "in [0.5, 1]",
                   self.crop_fraction)
        if self.decode_workers is not None:
            ensure(self.decode_workers >= 1, "decode_workers", "at least 1", self.decode_workers)


def layered_data(recorded: dict[str, Any] | None,
                 given: DataConfig | str | dict[str, Any] | None) -> DataConfig | None:
    """The data config from ``given`` (a DataConfig, a ``--data`` string, or a dict of
    DataConfig fields) laid over ``recorded`` (the fields a run recorded); None when neither
    names a dataset. A ``given`` that names another dataset starts from the defaults instead:
    the recorded columns and splits belong to the recorded dataset."""
    if isinstance(given, DataConfig):
        return given
    overrides = normalize_keys(DataConfig, {"data": given} if isinstance(given, str) else
                               dict(given or {}), "data")
    base = normalize_keys(DataConfig, dict(recorded or {}), "data")
    if "data" in overrides and overrides["data"] != base.get("data"):
        base = {}
    if "data" not in base and "data" not in overrides:
        return None
    return from_dict(DataConfig, merge(base, overrides), "data")
