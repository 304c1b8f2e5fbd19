"""The report of a `unisteer run`: the finding first (which cells steer, how far, at what utility), the
steering-vs-utility plot, then the Table-3 comparison with intervals, the settings and the sweep's account.

Built from the pipeline's summary (`OUT/summary.json`), its choice evaluations (`OUT/eval/`) and the sweep's
fits; rendered with the sweep report's blocks (self-contained HTML with embedded PNGs, and Markdown).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .analysis.fits import SweepFits
from .analysis.plots import Curve, Reference, TradeoffCurve, plot_metric, plot_tradeoff
from .analysis.report import METRIC_LABELS, Block, format_number, observations, render_html, render_markdown
from .files import read_json, write_text
from .judged import judge_table


def write_run_report(out_dir: str | Path, summary: dict[str, Any], fits: SweepFits, *,
                     sweep_report: Path | None = None) -> Path:
    """`OUT/report.html` and `report.md` of a `unisteer run`: the finding and the trade-off plot first, then
    the Table-3 comparison with intervals, then the settings and the sweep's account."""
    out = Path(out_dir)
    plots = []
    for plot in (_run_tradeoff_plot(out, summary, fits), _utility_plot(out, summary, fits)):
        if plot is not None:
            plots.append(plot)
    header, rows = table3_rows(summary)
    blocks = [Block("h2", "Finding"),
              Block("ul", items=headline(summary) + tradeoff_findings(summary, fits) + _rendering_finding(out))]
    for caption, path in plots:
        blocks.append(Block("img", text=caption, path=path))
    proxy = (" (A/B proxy: choice questions standing in for open-ended behaviour)"
             if summary.get("choice_scores") == "A/B proxy" else "")
    blocks += [Block("h2", f"Table 3: test scores at the multipliers chosen on dev{proxy}"),
               Block("p", "+m maximises and −m minimises the dev balanced accuracy (the mean of the per-class "
                           "accuracies, exactly 0.5 for any constant answer); accuracy with its Wilson 95 % interval, "
                           "balanced accuracy and AUC with stratified bootstrap intervals, utility = mean test "
                           "UtilOdds from the sweep with its bootstrap interval. A cell steers when the paired change "
                           "of balanced accuracy from m = 0 has an interval excluding 0."),
               Block("table", header=header, rows=rows)]
    judged = judge_table(summary)
    if judged is not None:
        caption, judge_header, judge_rows = judged
        blocks += [Block("h2", "LLM judge: open-ended answers by m"), Block("p", caption),
                   Block("table", header=judge_header, rows=judge_rows)]
    blocks += [Block("h2", "Settings"), Block("table", header=["setting", "value"], rows=_run_settings(out, summary))]
    variant = summary.get("variant", "sum")
    blocks += [Block("h2", "What the preference–utility sweep shows"),
               Block("ul", items=observations(fits, variant))]
    if sweep_report is not None:
        blocks.append(Block("p", f"Curves, fits, clamped points and the manifold measurement: "
                                  f"{sweep_report.relative_to(out).as_posix()}"))
    title = f"unisteer run — {summary['data']}, {summary['model']}, layer {summary['layer']}"
    html_path = out / "report.html"
    write_text(html_path, render_html(title, blocks, out))
    write_text(out / "report.md", render_markdown(title, blocks, out))
    return html_path


def _interval(value: float | None, ci: Sequence[float] | None) -> str:
    if value is None:
        return "-"
    if not ci:
        return f"{value:.2f}"
    return f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def _accuracy_text(side: dict[str, Any] | None) -> str:
    if not side:
        return "-"
    return _interval(side.get("accuracy"), [side["ci_low"], side["ci_high"]] if "ci_low" in side else None)


def table3_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The Table-3-shaped comparison: vanilla and every cell with intervals."""
    header = ["cell", "+m", "accuracy (+m)", "balanced (+m)", "AUC (+m)", "utility (+m)", "−m", "accuracy (−m)",
              "balanced (−m)", "utility (−m)", "steers", "pref R² train / test", "util R² train / test", "train s"]
    rows = []
    for row in summary["rows"]:
        if row["cell"] == "vanilla":
            m0 = row.get("m0", {})
            utility = row.get("utility_m0")
            rows.append(["vanilla", "0", _accuracy_text(m0), _interval(m0.get("balanced_accuracy"), m0.get("balanced_ci")),
                         _interval(m0.get("auc"), m0.get("auc_ci")), _utility_text(utility), "0", _accuracy_text(m0),
                         _interval(m0.get("balanced_accuracy"), m0.get("balanced_ci")), _utility_text(utility), "-",
                         "-", "-", "-"])
            continue
        toward, away = row.get("toward") or {}, row.get("away") or {}
        steers = row.get("steers", {})
        verdict = " and ".join(w for w, on in (("toward", steers.get("toward")), ("away", steers.get("away"))) if on)
        fits = row.get("fits", {})
        rows.append([row["cell"], _m_text(toward), _accuracy_text(toward),
                     _interval(toward.get("balanced_accuracy"), toward.get("balanced_ci")),
                     _interval(toward.get("auc"), toward.get("auc_ci")), _utility_text(toward.get("utility")),
                     _m_text(away), _accuracy_text(away),
                     _interval(away.get("balanced_accuracy"), away.get("balanced_ci")),
                     _utility_text(away.get("utility")), verdict or "no",
                     _r2_pair(fits, "pref"), _r2_pair(fits, "util"), f"{row.get('train_seconds', 0):.0f}"])
    return header, rows


def _m_text(side: dict[str, Any]) -> str:
    return "-" if "multiplier" not in side else f"{side['multiplier']:g}"


def _utility_text(utility: dict[str, float] | None) -> str:
    if not utility:
        return "-"
    return _interval(utility["mean"], [utility["ci_low"], utility["ci_high"]])


def _r2_pair(fits: dict[str, Any], prefix: str) -> str:
    train, test = fits.get(f"{prefix}_r2_train"), fits.get(f"{prefix}_r2_test")
    text = f"{format_number(train)} / {format_number(test)}"
    return text + (" (noise)" if fits.get(f"{prefix}_determined") is False else "")


# At or above this share of one answer, a chosen multiplier mostly shifts the answer lean: say so beside its score.
ONE_ANSWER_SHARE = 0.9


def _one_answer_text(side: dict[str, Any]) -> str:
    shares = side.get("answer_shares") or {}
    answer, share = max(shares.items(), key=lambda kv: kv[1], default=(None, 0.0))
    if answer is None or share < ONE_ANSWER_SHARE:
        return ""
    return (f" (the model answers {answer!r} to {share:.0%} of the items there: mostly a lean toward one answer, "
            "whose accuracy is the share of items that answer matches)")


def headline(summary: dict[str, Any]) -> list[str]:
    """The finding in sentences, one per cell, from the summary's numbers and their intervals."""
    lines = []
    for row in summary["rows"]:
        if row["cell"] == "vanilla":
            m0 = row.get("m0", {})
            shares = ", ".join(f"{k} {v:.0%}" for k, v in m0.get("answer_shares", {}).items())
            lines.append(f"<b>vanilla</b>: test accuracy {_accuracy_text(m0)}, balanced "
                         f"{_interval(m0.get('balanced_accuracy'), m0.get('balanced_ci'))}, AUC "
                         f"{_interval(m0.get('auc'), m0.get('auc_ci'))} (answers: {shares}).")
            continue
        steers = row.get("steers")
        if steers is None:
            lines.append(f"<b>{row['cell']}</b>: not evaluated on choice items.")
            continue
        parts = []
        for side, word in (("toward", "toward the concept"), ("away", "away from it")):
            chosen = row.get(side) or {}
            change = chosen.get("change")
            if not chosen or chosen.get("multiplier", 0) == 0:
                parts.append(f"no multiplier moves it {word} on dev (m = 0 chosen)")
                continue
            verdict = "steers" if steers.get(side) else "does not steer measurably"
            delta = (f"; balanced accuracy {change['change']:+.2f} [{change['ci_low']:+.2f}, {change['ci_high']:+.2f}] "
                     "vs m = 0") if change else ""
            utility = chosen.get("utility")
            cost = f", utility {_utility_text(utility)}" if utility else ""
            parts.append(f"{verdict} {word}: at m = {chosen['multiplier']:g} test accuracy {_accuracy_text(chosen)}"
                         f"{_one_answer_text(chosen)}{delta}{cost}")
        lines.append(f"<b>{row['cell']}</b>: " + "; ".join(parts) + ".")
    matched = summary.get("matched_utility")
    if matched and len(matched.get("cells", {})) > 1:
        cells = ", ".join(f"{name} {v['balanced_accuracy']:.2f} (m = {v['multiplier']:g})"
                          for name, v in matched["cells"].items())
        lines.append(f"At matched utility (test UtilOdds ≥ {matched['utility_at_least']:.2f}, that of "
                     f"{matched['reference_cell']} at its chosen +m), the best test balanced accuracy at m ≥ 0 is: "
                     f"{cells}.")
    for form, within in summary.get("matched_utility_by_form", {}).items():
        cells = ", ".join(f"{name} {v['balanced_accuracy']:.2f} (m = {v['multiplier']:g})"
                          for name, v in within["cells"].items())
        lines.append(f"Within the {form} form, at matched utility (test UtilOdds ≥ {within['utility_at_least']:.2f}, "
                     f"that of {within['reference_cell']}): {cells}.")
    zero = next((r for r in summary["rows"] if r["cell"] == "vanilla"), {}).get("utility_m0")
    if zero:
        lines.append(f"Utility of the plain model on test: UtilOdds {_utility_text(zero)} ({summary.get('variant')} "
                     "variant).")
    return lines


def tradeoff_findings(summary: dict[str, Any], fits: SweepFits, split: str = "test") -> list[str]:
    """The paper's F3 and F4 per cell on held-out items, as sentences that follow from the sweep's intervals:
    where utility peaks and whether it falls on both sides; how the off-manifold distance tracks utility; and
    whether the scores are explained by completion length or plain-model NLL (a flagged dataset is said so)."""
    variant = summary.get("variant", "sum")
    lines, flagged = [], []
    for row in summary["rows"]:
        cell = row["cell"]
        tradeoff = fits.tradeoff.get((cell, split, variant))
        if cell == "vanilla" or tradeoff is None:
            continue
        peak = tradeoff.peak
        at_zero = "" if peak.value_at_zero is None else f"; at m = 0 it is {peak.value_at_zero:.2f}"
        lines.append(f"<b>{cell}</b> — utility on {split} (F3): {peak.sentence()}{at_zero}.")
        tracked = _manifold_summary(tradeoff.manifold)
        if tracked:
            lines.append(f"<b>{cell}</b> — off-manifold distance vs utility on {split} (F4): {tracked}.")
        confounds = fits.confounds.get((cell, split, variant))
        if confounds is not None and confounds.flagged:
            flagged.append(f"<b>{cell}</b>: {confounds.sentence()}")
    if flagged:
        lines.append("Length / perplexity checks FLAG this dataset — scores partly follow completion length or the "
                     "plain model's NLL: " + "; ".join(flagged) + ".")
    elif lines and any(key[1] == split for key in fits.confounds):
        lines.append(f"Length / perplexity checks on {split}: no cell's scores are explained by completion length or "
                     "plain-model NLL (balance and orthogonality intervals in the sweep report).")
    return lines


def _manifold_summary(tracked: Sequence[Any]) -> str:
    """One clause for every layer × metric: the range of Spearman ρ, its intervals' span and what it means."""
    defined = [t for t in tracked if t.spearman_rho is not None and t.spearman_ci is not None]
    if not defined:
        return ""
    if len(defined) == 1:
        t = defined[0]
        return t.sentence(METRIC_LABELS[t.metric])
    rho = [t.spearman_rho for t in defined]
    low, high = min(t.spearman_ci[0] for t in defined), max(t.spearman_ci[1] for t in defined)
    verdict = ("utility falls where activations leave the manifold, as the paper argues" if high < -0.5
               else "distance and utility rise together, against the manifold account" if low > 0.5
               else "no clear monotone relation")
    layers = sorted({t.layer for t in defined})
    return (f"Spearman ρ of the mean distance against mean utility across {defined[0].n_points} multipliers is "
            f"{min(rho):.2f} to {max(rho):.2f} over {len(defined)} layer × metric pairs (layers "
            f"{', '.join(map(str, layers))}; every 95 % interval within [{low:.2f}, {high:.2f}]): {verdict}")


def _utility_plot(out: Path, summary: dict[str, Any], fits: SweepFits, split: str = "test"
                  ) -> tuple[str, Path] | None:
    variant = summary.get("variant", "sum")
    curves = [Curve.from_aggregated(row["cell"], pair.utility) for row in summary["rows"]
              if (pair := fits.curves.get((row["cell"], split, variant))) is not None]
    if not curves:
        return None
    zero = next((r for r in summary["rows"] if r["cell"] == "vanilla"), {}).get("utility_m0")
    references = [Reference(zero["mean"], "plain model (m = 0)")] if zero else []
    path = plot_metric(out / "plots" / f"utility_vs_m_{split}.png", curves, ylabel=f"UtilOdds ({variant})",
                       references=references, title=f"utility vs m on {split}: the paper predicts a peak at m = 0")
    return (f"Utility (UtilOdds, {variant} variant) against m on {split} for every cell, with 95 % intervals: "
            "the paper's trade-off is a peak near m = 0 falling on both sides.", path)


def _run_tradeoff_plot(out: Path, summary: dict[str, Any], fits: SweepFits) -> tuple[str, Path] | None:
    curves, highlight = [], {}
    for row in summary["rows"]:
        pair = fits.curves.get((row["cell"], "test", summary.get("variant", "sum")))
        path = out / "eval" / f"{row['cell']}.json"
        if row["cell"] == "vanilla" or pair is None or not path.exists():
            continue
        evaluation = read_json(path)
        utility = dict(zip(pair.utility.m.tolist(), pair.utility.mean.tolist(), strict=True))
        points = [(r["multiplier"], r.get("balanced_accuracy"), utility.get(r["multiplier"]))
                  for r in evaluation["test_rows"]]
        points = [p for p in points if p[1] is not None and p[2] is not None]
        if len(points) < 2:
            continue
        m, y, x = (np.array(v, dtype=np.float64) for v in zip(*points, strict=True))
        curves.append(TradeoffCurve(row["cell"], m, y, x))
        highlight[row["cell"]] = [side["multiplier"] for side in (row.get("toward"), row.get("away")) if side]
    if not curves:
        return None
    vanilla = next((r for r in summary["rows"] if r["cell"] == "vanilla"), None)
    references = []
    if vanilla and vanilla.get("m0", {}).get("balanced_accuracy") is not None:
        references.append(Reference(vanilla["m0"]["balanced_accuracy"], "vanilla"))
    path = plot_tradeoff(out / "plots" / "tradeoff_accuracy_utility.png", curves, ylabel="test balanced accuracy",
                         xlabel="test UtilOdds", highlight=highlight, references=references,
                         title="steering vs utility on test (rings: multipliers chosen on dev)")
    return ("Each point is one multiplier: test balanced accuracy (up = more matching answers) against test "
            "utility (right = the completions stay likely). Rings mark the +m and −m chosen on dev.", path)


def _rendering_finding(out: Path) -> list[str]:
    """Why the pairs were rendered as they were, where the measurement changed the prompt (e.g. an instruction)."""
    path = out / "rendering.json"
    if not path.exists():
        return []
    record = read_json(path)
    instruction = record.get("rendering", {}).get("instruction")
    if instruction:
        return [f"Rendering ({record.get('chosen_by')}): every question ends with {instruction!r} — "
                + "; ".join(record.get("notes", [])) + ". Utility at m = 0 then measures a model that answers in "
                "format, as the paper's larger models do when asked."]
    skipped = [note for note in record.get("notes", []) if "not appended" in note]
    if not skipped:
        return []
    return [f"Rendering ({record.get('chosen_by')}): the questions as written — {skipped[0]}. Utility at m = 0 is "
            "therefore low: the plain model rarely answers in this format unasked."]


def _run_settings(out: Path, summary: dict[str, Any]) -> list[list[Any]]:
    rows = [["model", f"{summary['model']} ({summary['dtype']})"], ["layer", summary["layer"]],
            ["data", summary["data"]]]
    rendering_path = out / "rendering.json"
    if rendering_path.exists():
        record = read_json(rendering_path)
        chosen = record.get("rendering", {})
        instruction = chosen.get("instruction") or ""
        text = (f"{chosen.get('name') or 'custom'}: completion whitespace {chosen.get('completion_space')}, "
                f"end-of-turn {'appended' if chosen.get('end_of_turn') else 'not appended'}, "
                f"answer-format instruction {repr(instruction) if instruction else 'none'}, chosen by "
                f"{record.get('chosen_by')}")
        if record.get("in_format") is not None:
            text += (f"; the plain model puts {record['in_format']:.2f} of its mass on the two answers "
                     f"(UtilOdds at m = 0: {record['util_odds_at_zero']:+.2f})")
        for note in record.get("notes", []):
            text += f"; {note}"
        if "answer_nll" in record:
            text += (f" (mean answer NLL joined {record['answer_nll'].get('join', float('nan')):.2f} vs kept "
                     f"{record['answer_nll'].get('keep', float('nan')):.2f} nats; end-of-turn after the answer "
                     f"{record['end_of_turn_nll']:.2f} nats, appended only below ln 2)")
        rows.append(["rendering", text])
    recipe = summary.get("recipe")
    if recipe:  # runs summarised before the recipe was recorded show the rows above only
        seed = "" if recipe.get("seed") is None else f"; training seed {recipe['seed']}"
        rows.append(["sequences", f"max length {recipe.get('max_length')} tokens (prompt + completion; a longer "
                                  f"pair loses prompt tokens from the left of its user turn){seed}"])
    data_path = out / "data.json"
    if data_path.exists():
        record = read_json(data_path)
        splits = record.get("splits", {})
        rows.append(["split", f"seed {splits.get('seed')}, sizes {splits.get('sizes')}, spec {splits.get('spec')}"])
        if record.get("choice_dev"):
            rows.append(["choice items", f"dev {record['choice_dev']['size']} ({record['choice_dev']['name']}), "
                                         f"test {record['choice_test']['size']} ({record['choice_test']['name']})"])
    return rows
