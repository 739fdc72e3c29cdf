"""The report's arithmetic and wording: gains paired by seed, against their spread; regressions."""

from __future__ import annotations

import pytest

from simclrv2.training.report import aggregate_seeds, compare_methods, format_table


def per_seed(values: dict[str, list[float]], key: str = "0.02") -> dict:
    return {m: {key: {str(i): {"top1": v, "top5": min(1.0, v + 0.1)} for i, v in enumerate(vs)}}
            for m, vs in values.items()}


def test_gains_are_paired_by_seed_and_compared_with_their_spread():
    runs = per_seed({"finetune": [0.84, 0.85, 0.86], "supervised": [0.21, 0.22, 0.22],
                     "distill": [0.83, 0.86, 0.84], "linear_eval": [0.85, 0.86, 0.86]})
    by_pair = {(c.a, c.b): c for c in compare_methods(runs)}
    ft = by_pair[("finetune", "supervised")]
    assert ft.gains == pytest.approx([63.0, 63.0, 64.0])
    assert ft.beyond_spread and not ft.regression
    assert ft.sentence().startswith("Pretraining + fine-tuning beats the supervised baseline by 63.3 ± 0.6 points "
                                    "at 2% labels (3 seeds)")
    dist = by_pair[("distill", "finetune")]
    assert dist.mean == pytest.approx(-0.667, abs=1e-3)
    assert "within the noise" in dist.sentence() and not dist.regression


def test_a_stage_below_the_one_it_should_improve_is_a_regression():
    runs = per_seed({"finetune": [0.30, 0.31, 0.32], "linear_eval": [0.40, 0.41, 0.40],
                     "distill": [0.20, 0.21, 0.22]})
    regressions = {(c.a, c.b) for c in compare_methods(runs) if c.regression}
    assert regressions == {("finetune", "linear_eval"), ("distill", "finetune")}
    one_seed = per_seed({"finetune": [0.5], "supervised": [0.52]})
    (c,) = compare_methods(one_seed)
    assert c.regression and "one seed" in c.sentence()


def test_results_keep_every_seed_mean_and_std_and_the_table_shows_them():
    table = aggregate_seeds(per_seed({"finetune": [0.80, 0.82, 0.84]}))
    cell = table["finetune"]["0.02"]
    assert cell["top1"] == pytest.approx(0.82) and cell["top1_std"] == pytest.approx(0.02)
    assert cell["seeds"]["2"]["top1"] == 0.84 and cell["num_seeds"] == 3
    assert "82.0 ± 2.0 (92.0)" in format_table(table)
    assert "mean ± std over 3 seeds" in format_table(table)
