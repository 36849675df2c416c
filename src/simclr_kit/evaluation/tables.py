"""Markdown views of evaluation results: the table printed and written to ``eval.md``.

One line per (protocol, metric, split, seeds, setting), one column per encoder, so the
pretrained encoder and its baselines compare under exactly the same protocol. The complete
hyperparameters of every number are in ``eval.json``; the table keeps the ones that tell two
lines apart.
"""

from __future__ import annotations

from typing import Any, Callable


# How each protocol produced its numbers, a Markdown list item each (eval.md, model cards).
PROTOCOL_NOTES = (
    "- knn: cosine similarity, votes weighted by exp(sim / T), clean features of the whole "
    "train split (Wu et al. 2018).",
    "- linear: a linear layer on the frozen encoder's features (eval mode, cached), Adam with a "
    "per-step cosine; at least `min_steps` steps.",
    "- fractions: the same probe on class-stratified label fractions and k-shot subsets, "
    "mean ± std over the seeds.",
    "- finetune: the whole network on augmented images, backbone lr = lr x multiplier.",
)


def _setting(row: dict[str, Any]) -> str:
    """A short description of the hyperparameters that produced ``row``'s number."""
    hp = row.get("hyperparameters") or {}
    protocol = row.get("protocol")
    if protocol == "knn":
        capped = f" ({hp['k_asked']} asked; the train split has {hp['k']} images)" \
            if "k_asked" in hp else ""
        return f"k={hp.get('k')}{capped}, T={hp.get('temperature')}"
    if protocol in ("linear", "fractions"):
        text = (f"{hp.get('epochs_run', hp.get('epochs'))} ep / {hp.get('steps')} steps, "
                f"lr {hp.get('lr')}, batch {hp.get('batch_size')}")
        if "augmented" in str(hp.get("features", "")):
            text += ", augmented views"
        if protocol == "fractions":
            same = "".join(f" = {name}" for name in row.get("same_as", []))
            also = ", the same labels" if same else ""
            text = f"{row.get('subset')}{same} ({row.get('labels')} labels{also}), {text}"
        return text
    if protocol == "finetune":
        return (f"{hp.get('epochs')} ep, lr {hp.get('lr')} (backbone x"
                f"{hp.get('backbone_lr_mult')}), batch {hp.get('batch_size')}")
    return ", ".join(f"{k}={v}" for k, v in hp.items())


def _seeds(seed: Any) -> str:
    if seed is None:
        return "-"  # deterministic: kNN has no seed
    if isinstance(seed, (list, tuple)):
        return ",".join(str(s) for s in seed)
    return str(seed)


def value_text(row: dict[str, Any]) -> str:
    """``row``'s number as printed: ``93.50%``, ``71.20% ± 1.30`` over seeds."""
    value = row.get("value", row.get("mean"))
    if not isinstance(value, (int, float)):
        return str(value)
    text = f"{value:.2f}" + ("%" if str(row.get("metric", "top1")).startswith(("top", "acc"))
                             else "")
    if isinstance(row.get("std"), (int, float)):
        text += f" ± {row['std']:.2f}"
    return text


def _images(provenance: dict[str, Any]) -> Any:
    """The images a split gave (unreadable ones skipped); older results recorded only rows."""
    return provenance.get("images", provenance.get("rows"))


Line = tuple[tuple[str, str, str, str, str], dict[str, str]]


def side_by_side(rows: list[dict[str, Any]],
                 setting: Callable[[dict[str, Any]], str] = _setting) -> tuple[list[str],
                                                                               list[Line]]:
    """The encoders in order of appearance, and one line per (protocol, metric, split, seeds,
    setting) holding each encoder's value, so SimCLR and its baselines read across one line."""
    encoders = list(dict.fromkeys(str(r.get("encoder")) for r in rows))
    lines: dict[tuple[str, str, str, str, str], dict[str, str]] = {}
    for r in rows:
        key = (str(r.get("protocol")), str(r.get("metric")), str(r.get("split")),
               _seeds(r.get("seed")), setting(r))
        lines.setdefault(key, {})[str(r.get("encoder"))] = value_text(r)
    return encoders, list(lines.items())


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows of ``eval.json``'s ``results`` -> a Markdown table, one column per encoder."""
    encoders, by_line = side_by_side(rows)
    lines = ["| protocol | metric | split | seeds | setting | " + " | ".join(encoders) + " |",
             "| --- | --- | --- | --- | --- |" + " ---: |" * len(encoders)]
    for (protocol, metric, split, seeds, setting), values in by_line:
        cells = [values.get(e, "") for e in encoders]
        lines.append(f"| {protocol} | {metric} | {split} | {seeds} | {setting} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def verdict(rows: list[dict[str, Any]], architecture: str = "encoder",
            baseline: str = "random-init") -> str | None:
    """One plain sentence comparing the pretrained encoder with ``baseline`` on top-1 kNN (the
    first k) and the linear probe, e.g. "SimCLR beats a random-init resnet18 by +13.3 points
    (kNN) and +1.9 (linear)"; None when the rows hold no such pair."""
    top1 = {(r["encoder"], r["protocol"]): r["value"] for r in reversed(rows)
            if r["metric"] == "top1" and r["protocol"] in ("knn", "linear")}
    gaps = {p: top1[("simclr", p)] - top1[(baseline, p)] for p in ("knn", "linear")
            if ("simclr", p) in top1 and (baseline, p) in top1}
    if not gaps:
        return None
    parts = [f"{gap:+.1f}{' points' if i == 0 else ''} ({'kNN' if p == 'knn' else p})"
             for i, (p, gap) in enumerate(gaps.items())]
    if all(g > 0 for g in gaps.values()):
        head = "beats"
    elif all(g < 0 for g in gaps.values()):
        head = "trails"
    else:
        head = "differs from"
    return f"SimCLR {head} a {baseline} {architecture} by " + " and ".join(parts)


def result_verdict(result: dict[str, Any]) -> str | None:
    """The :func:`verdict` of an evaluation (what ``eval.json`` holds), naming the encoder's
    architecture: the sentence ``simclr run`` prints and the report opens with."""
    architecture = (result.get("encoder") or {}).get("backbone") or "encoder"
    return verdict(result.get("results") or [], architecture)


def markdown_report(result: dict[str, Any]) -> str:
    """``eval.md``: what was evaluated on what, the table, and how to read it."""
    enc = result.get("encoder") or {}
    train, val = result.get("train") or {}, result.get("eval") or {}
    head = [f"# Evaluation of `{result.get('checkpoint')}`", "",
            f"Encoder: {enc.get('backbone')} ({enc.get('stem')} stem), {enc.get('image_size')} px,"
            f" {enc.get('feature_dim')}-d features, pretrained for {enc.get('epoch')} epoch(s).",
            f"Train split: `{train.get('split')}` ({_images(train)} images); evaluated split: "
            f"`{val.get('split')}` ({_images(val)} images).", ""]
    notes = ["", *PROTOCOL_NOTES, "", "Every hyperparameter of every number: `eval.json`."]
    if result.get("label_efficiency_plot"):
        notes.append(f"Label-efficiency plot: `{result['label_efficiency_plot']}`.")
    return ("\n".join(head) + "\n" + markdown_table(result.get("results") or [])
            + "\n".join(notes) + "\n")
