"""Run-folder plots (hubkit.plots): Korean class names are drawn, never as missing-glyph boxes."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from hubkit import plots

LABELS = ["부정", "긍정"]


def _draw_all(out: Path) -> list[Path | None]:
    return [
        plots.plot_confusion(LABELS, [[3, 1], [2, 4]], out / "confusion.png", title="nsmc 감성, 0-shot"),
        plots.plot_scores(
            LABELS,
            [0, 1, 1, 0],
            [[-1.0, -2.0], [-2.5, -1.0], [-1.2, -1.1], [-0.5, -3.0]],
            out / "scores.png",
            title="nsmc 감성, 0-shot: score distribution",
        ),
        plots.plot_nshot({0: 0.5, 5: 0.6}, out / "nshot.png", metric="acc", title="nsmc 감성"),
        plots.plot_labels_predictions(LABELS, [0, 1, 1], [0, 0, 1], out / "labels.png", title="튜닝"),
    ]


def test_korean_labels_and_titles_draw_with_a_hangul_font(tmp_path: Path) -> None:
    if plots._hangul_font() is None:
        pytest.skip("no font with Hangul on this machine: labels fall back to their index (next test)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = _draw_all(tmp_path)
    assert all(p is not None and p.stat().st_size > 0 for p in written)
    missing = [str(w.message) for w in caught if "missing from font" in str(w.message)]
    assert not missing, missing


def test_card_plots_draw_korean_class_names_like_the_run_folder_plots(tmp_path: Path) -> None:
    if plots._hangul_font() is None:
        pytest.skip("no font with Hangul on this machine")
    import pandas as pd

    from hubkit import cards
    from hubkit.results import ShotResult

    shot = ShotResult(shots=0, n_rows=4, n_errors=0, metrics={"acc": 0.75}, labels=tuple(LABELS),
                      confusion=((1, 1), (0, 2)))  # fmt: skip
    predictions = tmp_path / "predictions.parquet"
    pd.DataFrame(
        {
            "shots": [0, 0, 0, 0],
            "label": ["부정", "긍정", "긍정", "부정"],
            "loglikelihoods": [[-1.0, -2.0], [-2.5, -1.0], [-1.2, -1.1], [-3.0, -0.5]],
            "error": [None] * 4,
        }
    ).to_parquet(predictions)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = [
            cards.plot_confusion(shot, tmp_path / "c.png", title="nsmc 감성"),
            cards.plot_scores(predictions, shot, tmp_path / "s.png", title="nsmc 감성"),
        ]
    assert all(p is not None and p.stat().st_size > 0 for p in written)
    missing = [str(w.message) for w in caught if "missing from font" in str(w.message)]
    assert not missing, missing


def test_without_a_hangul_font_korean_class_names_become_their_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plots, "_HANGUL_FONT", [None])
    assert plots.tick_labels(LABELS) == ["0", "1"]
    assert plots.tick_labels(["neg", "pos"]) == ["neg", "pos"]
