"""The report on a synthetic sweep whose curves have known shapes."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from unisteer.analysis.fits import fit_sweep
from unisteer.analysis.report import observations, write_report
from unisteer.analysis.sweep import FORMAT_VERSION, SweepConfig
from unisteer.config import to_dict
from unisteer.errors import ConfigError

GRID = [float(m) for m in range(-10, 11)]
TOKENS = 3


def decay(m, length, power=1.0):
    return (1.0 + np.asarray(m) ** 2 / length) ** -power


def nll_from_log_odds(pref, util):
    """L_p, L_n with L_n − L_p = pref and logit(e^{−L_p} + e^{−L_n}) = util (SPEC §3 inverted)."""
    log_s = -np.logaddexp(0.0, -util)
    L_p = np.logaddexp(0.0, -pref) - log_s
    return L_p, L_p + pref


SHAPES = {
    # The paper's shapes: saturating preference, utility peaking at 0 and falling.
    "shaped": (lambda m: 0.5 * m * decay(m, 25.0), lambda m: 3.0 * decay(m, 16.0) - 1.0),
    # Linear preference the wrong way round, utility flat: no saturation, no utility loss.
    "reversed": (lambda m: -0.1 * m, lambda m: 0.0 * m),
}


SPLIT_SIZES = {"train": 8, "test": 6}


def write_sweep(folder, n_examples=SPLIT_SIZES, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir()
    info = {
        "format": FORMAT_VERSION,
        "model": {"id": "synthetic", "config_hash": "0", "dtype": "float32", "num_layers": 8, "hidden_size": 16},
        "encoder": {"chat_template": True, "max_length": 512},
        "splits": {s: {"name": f"toy:{s}", "size": n, "hash": "ab" * 32, "sources": []} for s, n in n_examples.items()},
        "updates": {u: {"form": "vector", "layer": 3, "insertion": "block_output", "positions": "all", "rank": None,
                        "fingerprint": u, "spec": {}} for u in SHAPES},
        "grids": {u: GRID for u in SHAPES},
        "manifold": {"layers": [5], "variance": 0.9, "max_examples": 500, "seed": 0},
        "manifold_reference": {"train": {"5": {"rank": 4, "explained_variance": 0.91, "n_points": 40,
                                               "n_examples": 8}}},
        "config": to_dict(SweepConfig(n_boot=200, progress=False)),
        "settings": {"dataset": {"name": "toy", "splits": {"seed": 42, "sizes": n_examples}}},
    }
    (folder / "sweep.json").write_text(json.dumps(info))
    for update, (pref_of, util_of) in SHAPES.items():
        for split, n in n_examples.items():
            lines = []
            for m in GRID:
                pref = pref_of(m) + rng.normal(0, 0.1, n)
                util = util_of(m) + rng.normal(0, 0.1, n)
                L_p, L_n = nll_from_log_odds(pref, util)
                for e in range(n):
                    row = {"example": e, "m": m, "L_p": float(L_p[e]), "L_n": float(L_n[e]), "T_p": TOKENS,
                           "T_n": TOKENS}
                    if update == "shaped":
                        row["manifold"] = {"5": {"off_subspace": 1 + 0.05 * m * m + rng.normal(0, 0.01),
                                                 "nearest_neighbour": 1 + 0.03 * m * m + rng.normal(0, 0.01)}}
                    lines.append(json.dumps(row))
            path = folder / "scores" / update / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = write_sweep(tmp_path_factory.mktemp("report") / "sweep")
    fits = fit_sweep(folder)
    return folder, fits, write_report(folder, fits=fits)


def test_report_is_self_contained_html_and_markdown(report):
    folder, fits, html_path = report
    page = html_path.read_text()
    images = re.findall(r"<img [^>]*src='([^']*)'", page)
    assert len(images) >= 6 and all(src.startswith("data:image/png;base64,") for src in images)
    assert "http" not in " ".join(re.findall(r"(?:src|href)=['\"][^'\"]*", page))
    for text in ("Fits (sum variant)", "Fits (mean variant)", "Clamped points", "Manifold measurement",
                 "split seed 42", "-10 … 10 step 1 (21 points)"):
        assert text in page
    markdown = (folder / "report.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert len(linked) == len(images)
    for link in linked:
        data = (folder / link).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000


def test_fits_follow_the_designed_shapes(report):
    _, fits, _ = report
    shaped = fits.fits[("shaped", "sum")]
    assert shaped.preference.r2 > 0.95 and shaped.utility.r2 > 0.95
    assert shaped.r2["utility"]["test"] > 0.9
    assert shaped.utility.params["beta"] == pytest.approx(3.0, rel=0.15)


def test_account_states_agreements_and_differences(report):
    _, fits, _ = report
    notes = " ".join(observations(fits, "sum"))
    shaped_text = " ".join(n for n in notes.split("<b>") if n.startswith("shaped"))
    reversed_text = " ".join(n for n in notes.split("<b>") if n.startswith("reversed"))
    assert "preference on 'test': steers: PrefOdds rises by" in shaped_text  # verdicts on the held-out split
    assert "Its peak is at m = 0, as in the paper" in shaped_text and "UtilOdds falls by" in shaped_text
    assert "good (R²" in shaped_text and "it saturates" in shaped_text
    assert "distance grows where utility falls" in shaped_text
    assert "steers the wrong way round" in reversed_text and "opposite to the paper" in reversed_text
    assert "no saturation within the grid" in reversed_text
    assert "no utility cost measured" in reversed_text
    # Its flat utility is noise: the fit is said to mean nothing, and no shape is read from it.
    assert "not determined by the data" in reversed_text


def test_clamped_points_are_counted(report):
    _, fits, html_path = report
    clamped_mean = int(fits.rows[("shaped", "train")].log_odds["mean"].clamped.sum())
    assert clamped_mean > 0, "per-token means near the utility peak exceed S = 1 in this design"
    assert int(fits.rows[("shaped", "train")].log_odds["sum"].clamped.sum()) == 0
    assert f"<td>shaped</td><td>train</td><td>mean</td><td>{clamped_mean}</td>" in html_path.read_text()
    assert "were clamped" in " ".join(observations(fits, "mean"))


def test_report_rejects_unknown_variant(report):
    folder, fits, _ = report
    with pytest.raises(ConfigError, match="variant"):
        write_report(folder, fits=fits, variant="median")


def test_tradeoff_and_confounds_are_stated_and_written(report):
    folder, fits, html_path = report
    shaped = fits.tradeoff[("shaped", "test", "sum")]
    assert shaped.peak.m == 0.0 and shaped.peak.near_zero and shaped.peak.falls_both_sides
    by_metric = {t.metric: t for t in shaped.manifold}
    assert by_metric["off_subspace"].spearman_rho < -0.8 and by_metric["off_subspace"].spearman_ci[1] < -0.5
    flat = fits.tradeoff[("reversed", "test", "sum")]
    assert flat.manifold == []  # no manifold rows were written for it
    # Completions of equal length in every pair: the length balance check says so and flags nothing.
    confounds = fits.confounds[("shaped", "test", "sum")]
    assert confounds.balance[0].note == "equal in every pair" and not confounds.balance[0].flagged
    notes = " ".join(observations(fits, "sum"))
    assert "trade-off on 'test': utility peaks at m = 0" in notes and "near m = 0, as in the paper" in notes
    assert "utility falls where activations leave the manifold" in notes
    written = json.loads((folder / "tradeoff.json").read_text())
    assert written["shaped/test/sum"]["peak"]["falls_both_sides"] is True
    assert "shaped/test/sum" in json.loads((folder / "confounds.json").read_text())
    page = html_path.read_text()
    assert "The trade-off: where utility peaks, and what tracks it" in page
    assert "Length and perplexity: balance and orthogonality" in page


def test_run_report_finding_states_the_tradeoff_beside_its_plot(report, tmp_path):
    from unisteer.run_report import tradeoff_findings, write_run_report

    _, fits, _ = report
    summary = {"data": "toy", "model": "synthetic", "dtype": "float32", "layer": 3, "variant": "sum",
               "rows": [{"cell": "vanilla", "utility_m0": {"mean": 2.0, "ci_low": 1.9, "ci_high": 2.1}},
                        {"cell": "shaped"}, {"cell": "reversed"}]}
    lines = tradeoff_findings(summary, fits)
    shaped = [line for line in lines if line.startswith("<b>shaped</b>")]
    assert "(F3): utility peaks at m = 0" in shaped[0] and "falls on both sides" in shaped[0]
    assert "(F4)" in shaped[1] and "utility falls where activations leave the manifold" in shaped[1]
    assert "over 2 layer × metric pairs" in shaped[1]
    assert not any("(F4)" in line for line in lines if line.startswith("<b>reversed</b>"))
    assert "no cell's scores are explained by completion length" in lines[-1]
    page = write_run_report(tmp_path, summary, fits).read_text()
    finding = page.split("<h2>Finding</h2>", 1)[1].split("<h2>", 1)[0]
    assert "(F3)" in finding and "utility vs m on test" not in finding.split("<img", 1)[0]
    assert (tmp_path / "plots" / "utility_vs_m_test.png").read_bytes().startswith(b"\x89PNG")


def test_headline_says_when_a_chosen_multiplier_mostly_gives_one_answer():
    from unisteer.run_report import headline

    def side(m, accuracy, shares):
        return {"multiplier": m, "accuracy": accuracy, "ci_low": accuracy - 0.1, "ci_high": accuracy + 0.1,
                "answer_shares": shares, "change": {"change": accuracy - 0.5, "ci_low": -0.1, "ci_high": 0.1}}

    summary = {"rows": [{"cell": "split", "steers": {"toward": True, "away": False},
                         "toward": side(8, 0.85, {"No": 0.45, "Yes": 0.55}),
                         "away": side(-8, 0.58, {"No": 0.03, "Yes": 0.97})}]}
    line = headline(summary)[0]
    toward, away = line.split("away from it")
    assert "mostly a lean toward one answer" not in toward
    assert "answers 'Yes' to 97% of the items there: mostly a lean toward one answer" in away
