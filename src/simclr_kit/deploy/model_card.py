"""The model card (``README.md``) of a hub folder: provenance, recipe, evaluation, how to load.

Written from what the checkpoint records (its metadata and pretraining config) and, when the run
was evaluated, from ``RUN/eval.json``. The licence is left for the person who shares the model to
fill in: the weights are theirs to license, and the pretraining data's terms may limit it.
"""

from __future__ import annotations

import datetime
from typing import Any

import yaml

from simclr_kit.deploy.loading_code import LoadingCode
from simclr_kit.evaluation.tables import PROTOCOL_NOTES, markdown_table

# The pretraining settings the card's recipe table names (all of them follow in YAML).
RECIPE_KEYS = ("epochs", "batch_size", "optimizer", "lr", "lr_scaling", "weight_decay",
               "warmup_fraction", "temperature", "projection_dim", "precision", "seed")


def _front_matter(meta: dict[str, Any]) -> list[str]:
    lines = ["---"]
    if str(meta["backbone"]).startswith("timm/"):
        lines.append("library_name: timm")
    return lines + ["license:  # FILL IN before sharing, e.g. apache-2.0, mit, cc-by-4.0 (see "
                    "Licence below)",
                    "pipeline_tag: image-feature-extraction",
                    "tags:", "- simclr", "- self-supervised", "- image-feature-extraction",
                    "- simclr-kit", "---", ""]


def _provenance(meta: dict[str, Any], recipe: dict[str, Any] | None) -> list[str]:
    data = meta.get("dataset") or {}
    images = data.get("images", data.get("rows"))
    source = f"`{data.get('source')}`" if data.get("source") else "not recorded"
    if data.get("split"):
        source += f", split `{data['split']}` ({images} images"
        source += f", {data['skipped']} unreadable skipped)" if data.get("skipped") else ")"
    init = meta.get("init_from") or (recipe or {}).get("init") or "scratch"
    init = {"scratch": "random weights", "imagenet": "ImageNet weights (the library's default)"
            }.get(init, f"`{init}`")
    rows = [("pretraining data", source),
            ("data fingerprint", f"`{data['fingerprint']}`" if data.get("fingerprint") else "-"),
            ("initialised from", init),
            ("trained for", "not recorded" if meta.get("epoch") is None else
             f"{meta['epoch']} epoch(s)"
             + (f", {meta['global_step']} steps" if meta.get("global_step") else "")),
            ("produced by", f"simclr-kit {meta['package_version']}" if meta.get("package_version")
             else "not recorded (a weights file from elsewhere)"),
            ("exported", datetime.date.today().isoformat())]
    return ["## Data and provenance", "", "| | |", "| --- | --- |",
            *[f"| {k} | {v} |" for k, v in rows], ""]


def _input(meta: dict[str, Any], config: dict[str, Any]) -> list[str]:
    cfg = config["pretrained_cfg"]
    size, crop = int(meta["image_size"]), float(cfg["crop_pct"])
    transform = (f"resize the shorter side to {size} px and take the centre {size} x {size}"
                 if crop >= 1.0 else f"resize the shorter side to round({size} / {crop}) = "
                 f"{round(size / crop)} px and take the centre {size} x {size}")
    mean = ", ".join(f"{m:.4f}" for m in cfg["mean"])
    std = ", ".join(f"{s:.4f}" for s in cfg["std"])
    return ["## Input and output", "",
            f"RGB images, evaluated as simclr-kit evaluates them: {transform} (bilinear, "
            f"antialiased), scale to [0, 1], subtract the mean ({mean}) and divide by the "
            f"standard deviation ({std}) per channel: the statistics the encoder was trained "
            f"with, also in `config.json`. Output: {meta['feature_dim']}-dimensional "
            "pooled features (no classifier).", ""]


def _recipe(meta: dict[str, Any], recipe: dict[str, Any] | None) -> list[str]:
    lines = ["## Recipe", ""]
    if not recipe:
        return lines + ["Not recorded: the export was made from a weights file that does not "
                        "carry its pretraining config.", ""]
    rows = [(k, recipe[k]) for k in RECIPE_KEYS if k in recipe]
    lines += [f"SimCLR (Chen et al. 2020) with simclr-kit: {meta['backbone']} ({meta['stem']} "
              f"stem) at {meta['image_size']} px.", "", "| setting | value |", "| --- | --- |",
              *[f"| {k} | {v} |" for k, v in rows], "",
              "<details><summary>The whole pretraining config (what <code>simclr pretrain "
              "--config</code> reads)</summary>", "",
              "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```", "",
              "</details>", ""]
    return lines


def _evaluation(meta: dict[str, Any], evaluation: dict[str, Any] | None) -> list[str]:
    lines = ["## Evaluation", ""]
    if not evaluation or not evaluation.get("results"):
        return lines + ["No evaluation was recorded with this run (`simclr evaluate RUN` writes "
                        "one; an export made after it includes the table).", ""]
    train, val = evaluation.get("train") or {}, evaluation.get("eval") or {}
    epoch = (evaluation.get("encoder") or {}).get("epoch")
    when = "" if epoch in (None, meta.get("epoch")) else \
        f" These numbers are of epoch {epoch}, not of the exported epoch {meta.get('epoch')}."
    lines += [f"On `{val.get('source')}`: trained on split `{train.get('split')}` "
              f"({train.get('images', train.get('rows'))} images), scored on split "
              f"`{val.get('split')}` ({val.get('images', val.get('rows'))} images), with "
              f"simclr-kit {evaluation.get('package_version', '?')}.{when} Each column is an "
              "encoder under the same protocol (`random-init`: the same architecture with "
              "random weights).", "", markdown_table(evaluation["results"]).rstrip(), "",
              *PROTOCOL_NOTES, ""]
    return lines


def _loading(snippets: list[LoadingCode], plain_missing: bool) -> list[str]:
    lines = ["## How to load", "",
             "Each block runs from inside this folder; on the hub, the comment in it gives the "
             "name to use instead.", ""]
    for snippet in snippets:
        lines += [f"### {snippet.library}", ""]
        if snippet.note:
            lines += [snippet.note[0].upper() + snippet.note[1:] + ".", ""]
        lines += ["```python", snippet.code, "```", ""]
    if plain_missing:
        lines += ["No plain torchvision or timm code was found that reproduces this backbone; "
                  "load it with simclr-kit.", ""]
    return lines


def model_card(meta: dict[str, Any], config: dict[str, Any], recipe: dict[str, Any] | None,
               evaluation: dict[str, Any] | None, snippets: list[LoadingCode],
               plain_missing: bool) -> str:
    """The ``README.md`` of a hub folder. ``meta``: the export's metadata; ``config``: the
    folder's ``config.json``; ``recipe``: the pretraining config (None if not recorded);
    ``evaluation``: the run's ``eval.json`` (None if none); ``snippets``: the loading code."""
    size = meta["image_size"]
    title = [f"# SimCLR {meta['backbone']} encoder ({size} px)", "",
             f"A {meta['backbone']} backbone ({meta['stem']} stem) pretrained with SimCLR by "
             f"simclr-kit: {size} x {size} RGB images in, {meta['feature_dim']}-dimensional "
             "features out.", ""]
    licence = ["## Licence", "",
               "Not chosen yet. The person who shares this model fills in `license` at the top "
               "of this file; the licence of the pretraining data may restrict the choice.", ""]
    share = ["## Sharing", "", "```python",
             "from huggingface_hub import upload_folder", "",
             'upload_folder(repo_id="OWNER/NAME", folder_path=".")  # after `hf auth login`',
             "```", ""]
    parts = (_front_matter(meta) + title + _provenance(meta, recipe) + _input(meta, config)
             + _recipe(meta, recipe) + _evaluation(meta, evaluation)
             + _loading(snippets, plain_missing) + licence + share)
    return "\n".join(parts).rstrip() + "\n"
