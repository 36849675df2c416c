"""The run report's sections that look at the encoder's features of both splits.

Confusion matrix (the kNN protocol's predictions), a t-SNE map and nearest-neighbour retrieval.
Both splits are decoded and embedded once per report and shared by the three sections.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from simclr_kit.config import EvalConfig
from simclr_kit.data.store import ImageStore
from simclr_kit.errors import UserError
from simclr_kit.evaluation.knn import nearest_neighbours
from simclr_kit.report import analysis, plots
from simclr_kit.report.page import Missing, Section, caption, esc, image
from simclr_kit.report.sections import ReportContext

QUERIES, NEIGHBOURS = 6, 8
REPORT_SKIPPED = "report-skipped.txt"  # the images of both splits the report could not read


@dataclass
class Embedded:
    """Both splits decoded at the encoder's size and their backbone features ``(N, D)``."""

    train: ImageStore
    evaluation: ImageStore
    train_features: Tensor
    eval_features: Tensor


def _embedded(ctx: ReportContext, embeddings: bool) -> Embedded:
    """Decode both splits and embed them once; shared by the three sections below (a failure
    is remembered too, so it is reported once per section, not recomputed)."""
    if not embeddings:
        raise Missing("not computed at the end of pretraining (it embeds both splits): run  "
                      f"simclr report {ctx.run}  to add it")
    if "embedded" not in ctx._cache:
        try:
            ctx._cache["embedded"] = _embed_splits(ctx)
        except (Missing, UserError) as err:
            ctx._cache["embedded"] = Missing(str(err))
    if isinstance(ctx._cache["embedded"], Missing):
        raise ctx._cache["embedded"]
    return ctx._cache["embedded"]


def _embed_splits(ctx: ReportContext) -> Embedded:
    from simclr_kit.data.pixels import chosen_crop_fraction
    from simclr_kit.data.skip_reports import announce_skipped, list_skipped
    from simclr_kit.data.splits import open_splits
    from simclr_kit.data.store import decode_split
    from simclr_kit.devices import resolve_device
    from simclr_kit.embed import backbone_features
    from simclr_kit.evaluation.cache import read_cached_features
    from simclr_kit.evaluation.protocols import FEATURES_DIR

    enc, data = ctx.encoder(), ctx.data_config()
    try:
        train_split, eval_split = open_splits(data, need_eval=True)
    except UserError as err:
        hint = "" if ctx.eval_result else (
            f"; once  simclr evaluate {ctx.run} --data LABELLED_DATASET  has run, the report "
            "uses that dataset")
        raise Missing(f"needs a labelled evaluation split of {data.data}: {err}{hint}") from None
    crop_fraction = chosen_crop_fraction(data.crop_fraction, enc.meta)
    stores = [decode_split(s, enc.image_size, data.bad_images, ctx.progress,
                           workers=data.decode_workers, crop_fraction=crop_fraction)
              for s in (train_split, eval_split)]
    listed = list_skipped(ctx.run / REPORT_SKIPPED, *stores)
    if ctx.progress:  # the report command; at the end of `simclr run`, evaluate said it
        for store in stores:
            announce_skipped(store, listed)
    dev = resolve_device(ctx.device)
    feats = []
    for store, name in zip(stores, ("train", "eval")):
        # `simclr evaluate` (and so `simclr run`) has usually just cached these very features.
        cached = read_cached_features(enc, store, _split_name(store), ctx.run / FEATURES_DIR)
        feats.append(cached if cached is not None else backbone_features(
            enc, store.images, dev, progress=ctx.progress, desc=f"report: {name} features"))
    return Embedded(stores[0], stores[1], feats[0], feats[1])


def _split_name(store: ImageStore) -> str:
    return str(store.provenance.get("split"))


def confusion_section(ctx: ReportContext, embeddings: bool) -> Section:
    emb = _embedded(ctx, embeddings)
    if emb.train.labels is None or emb.evaluation.labels is None:
        raise Missing("the splits have no labels, so there is no confusion matrix")
    defaults = EvalConfig()
    cfg = (ctx.eval_result or {}).get("config") or {}
    k = int((cfg.get("knn_k") or defaults.knn_k)[0])
    temperature = float(cfg.get("knn_temperature", defaults.knn_temperature))
    names = emb.train.class_names or []
    c = max(len(names), int(emb.train.labels.max()) + 1, int(emb.evaluation.labels.max()) + 1)
    names = names + [str(i) for i in range(len(names), c)]
    result = analysis.knn_confusion(emb.train_features, emb.train.labels, emb.eval_features,
                                    emb.evaluation.labels, c, k, temperature)
    title = (f"kNN (k={result.k}, T={temperature:g}) on {_split_name(emb.evaluation)}: "
             f"top-1 {result.accuracy:.2f}%")
    return Section("confusion", "Confusion matrix",
                   image(plots.confusion_matrix(result.matrix, names, title), title)
                   + caption(f"Predictions of the weighted kNN protocol (cosine, train split as "
                             f"keys) for the {len(emb.evaluation)} evaluation images; cells count "
                             "images, colour is the percent of the true class."))


def map_section(ctx: ReportContext, embeddings: bool, max_points: int) -> Section:
    emb = _embedded(ctx, embeddings)
    labels = emb.evaluation.labels
    idx = analysis.stratified_subsample(labels, len(emb.evaluation), max_points)
    coords = analysis.tsne_map(emb.eval_features[idx])
    title = (f"t-SNE of backbone features: {len(idx)} of {len(emb.evaluation)} images of "
             f"{_split_name(emb.evaluation)}")
    png = plots.embedding_map(coords, None if labels is None else labels[idx].numpy(),
                              emb.evaluation.class_names, title)
    return Section("embedding-map", "Embedding map", image(png, title) + caption(
        "Features L2-normalised, reduced to 50 dimensions by PCA, then t-SNE (seed 0); "
        "coloured by the true class. Distances between far-apart clusters mean little."))


def _thumb_cell(img: Tensor, label: str, detail: str, css: str) -> str:
    return (f'<td class="{css}">{image(plots.thumbnail(img), label)}'
            f"<div>{esc(label)}</div><div>{esc(detail)}</div></td>")


def retrieval_section(ctx: ReportContext, embeddings: bool) -> Section:
    emb = _embedded(ctx, embeddings)
    queries = analysis.pick_queries(emb.evaluation.labels, len(emb.evaluation), QUERIES)
    idx, sims = nearest_neighbours(emb.train_features, emb.eval_features[queries], NEIGHBOURS)
    query_names = analysis.label_names(emb.evaluation, queries)
    rows = []
    for q, name in enumerate(query_names):
        cells = [_thumb_cell(emb.evaluation.images[queries[q]], name,
                             f"query #{int(emb.evaluation.row_ids[queries[q]])}", "query")]
        for j, neighbour in enumerate(idx[q].tolist()):
            other = analysis.label_names(emb.train, idx[q, j:j + 1])[0]
            same = "same" if emb.evaluation.labels is not None and other == name else "other"
            cells.append(_thumb_cell(emb.train.images[neighbour], other,
                                     f"cos {float(sims[q, j]):.2f}", same))
        rows.append(f"<tr>{''.join(cells)}</tr>")
    head = "<tr><th>query</th>" + "".join(f"<th>{i + 1}</th>" for i in range(idx.shape[1]))
    body = f'<table class="retrieval"><thead>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    return Section("retrieval", "Nearest-neighbour retrieval", body + caption(
        f"{len(queries)} images of {_split_name(emb.evaluation)} (first column) and their "
        f"{idx.shape[1]} most similar train images by cosine similarity of backbone features; "
        "green: same class as the query, red: another class."))
