"""The report's first section: the verdict of the run's evaluation and its headline numbers.

The sentence is the one ``simclr run`` prints (:func:`~simclr_kit.evaluation.tables.result_verdict`);
the numbers are each encoder's top-1 accuracy under the kNN, linear and fine-tuning protocols,
side by side, then the training's wall time and speed. Without an evaluation the section says
so and gives the command that makes one.
"""

from __future__ import annotations

from simclr_kit.evaluation.tables import result_verdict, side_by_side
from simclr_kit.report.page import Section, esc, key_values, note, table
from simclr_kit.report.sections import ReportContext, images_per_second, wall_time

# The protocols whose top-1 makes the headline (label fractions stay in the evaluation table).
HEADLINE_PROTOCOLS = ("knn", "linear", "finetune")


def _verdict(ctx: ReportContext) -> str:
    result = ctx.eval_result
    command = ctx.evaluate_command()
    if not result:
        return note(f"Not evaluated yet: run  {command} --baseline random  for the verdict "
                    "against a random-init encoder of the same architecture.")
    sentence = result_verdict(result)
    if sentence is None:
        return note(f"Evaluated without a baseline to compare with: {command} --baseline "
                    "random  adds a random-init encoder of the same architecture.")
    return f'<p class="verdict">{esc(sentence)}.</p>'


def _accuracies(ctx: ReportContext) -> str:
    rows = [r for r in (ctx.eval_result or {}).get("results", [])
            if r.get("metric") == "top1" and r.get("protocol") in HEADLINE_PROTOCOLS]
    if not rows:
        return ""
    encoders, lines = side_by_side(rows)
    cells, knn_shown = [], False
    for (protocol, _, _, _, setting), values in lines:
        if protocol == "knn" and knn_shown:
            continue  # the first k only, as the verdict reads it
        knn_shown = knn_shown or protocol == "knn"
        cells.append([protocol, setting, *(values.get(e, "") for e in encoders)])
    return table(["top-1 accuracy", "setting", *encoders], cells,
                 numeric=range(2, 2 + len(encoders)))


def result_section(ctx: ReportContext) -> Section:
    facts = {"training wall time": wall_time(ctx) if ctx.records else "not recorded"}
    speed = images_per_second(ctx)
    if speed is not None:
        facts["images/s (median of logged intervals)"] = speed
    done = ctx.kind("done")
    if done:
        facts["epochs trained"] = done[-1].get("epoch")
    body = _verdict(ctx) + _accuracies(ctx) + key_values(facts)
    return Section("result", "Result", body)
