"""PNG plots of a scoring run: confusion matrix, score distribution by class, n-shot curve.

Matplotlib's object-oriented API on the Agg canvas (no pyplot, no GUI, no global state), imported inside
the functions. Matplotlib's bundled font has no Hangul: unless the system has a font that does, class names that
are not ASCII are drawn as their index, and ``report.md`` prints which index is which class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_HANGUL_FONT: list[str | None] = []


def figure(width: float = 6.4, height: float = 4.0) -> Any:
    """A matplotlib Figure on the Agg canvas (no pyplot: no global state, no GUI, safe in threads)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="tight")


def _hangul_font() -> str | None:
    # Looked up once: a font family that can draw Hangul, if the system has one.
    if not _HANGUL_FONT:
        from matplotlib import font_manager

        found = None
        for font in font_manager.fontManager.ttflist:
            if any(
                key in font.name
                for key in ("Nanum", "Noto Sans CJK", "Noto Sans KR", "Malgun", "AppleGothic")
            ):
                found = font.name
                break
        _HANGUL_FONT.append(found)
    return _HANGUL_FONT[0]


def tick_labels(labels: Sequence[str]) -> list[str]:
    """Labels as they can be drawn: as they are when ASCII or a Hangul font exists, else their index."""
    if all(label.isascii() for label in labels) or _hangul_font():
        return list(labels)
    return [label if label.isascii() else str(i) for i, label in enumerate(labels)]


def font_kwargs() -> dict[str, Any]:
    """Text options that draw Hangul (``fontfamily`` of a Hangul font) when the system has one, else {}."""
    font = _hangul_font()
    return {"fontfamily": font} if font else {}


def legend_outside(ax: Any) -> None:
    """The axes' legend right of the plot, where it hides no bar or dot, in a font that draws Hangul."""
    font = _hangul_font()
    prop = {"size": "small", **({"family": font} if font else {})}
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), prop=prop)


def save_png(fig: Any, path: Path) -> Path:
    """Writes ``fig`` to ``path`` as PNG through a temporary file, so a reader never sees half a plot."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path


def plot_confusion(
    labels: Sequence[str], confusion: Sequence[Sequence[int]], path: Path, *, title: str
) -> Path:
    """The confusion matrix with counts (rows: true class, columns: predicted class)."""
    fig = figure(4.6, 4.0)
    ax = fig.subplots()
    matrix = [list(row) for row in confusion]
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ticks = tick_labels(labels)
    ax.set_xticks(range(len(ticks)), ticks, **font_kwargs())
    ax.set_yticks(range(len(ticks)), ticks, **font_kwargs())
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = max((max(row) for row in matrix if row), default=0) or 1
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > top / 2 else "black")
    ax.set_title(title, **font_kwargs())  # a task or model name may be Korean
    return save_png(fig, path)


def plot_scores(
    labels: Sequence[str],
    golds: Sequence[int],
    loglikelihoods: Sequence[Sequence[float]],
    path: Path,
    *,
    title: str,
) -> Path | None:
    """Distribution of the model's score, one histogram per true class.

    Two classes: the score is ``loglik(class 1) - loglik(class 0)`` (above 0 predicts class 1), the
    classic picture of how well the two classes separate. More classes: the margin of the true class
    over the best other one (above 0 is a correct prediction).

    Returns:
        The path, or None when there is nothing to plot.
    """
    if len(labels) < 2 or not golds:
        return None
    binary = len(labels) == 2
    values: dict[int, list[float]] = {i: [] for i in range(len(labels))}
    for gold, lls in zip(golds, loglikelihoods, strict=True):
        if lls is None or len(lls) != len(labels) or not 0 <= gold < len(labels):
            continue
        if binary:
            values[gold].append(float(lls[1]) - float(lls[0]))
        else:
            others = [float(v) for j, v in enumerate(lls) if j != gold]
            values[gold].append(float(lls[gold]) - max(others))
    if not any(values.values()):
        return None
    fig = figure()
    ax = fig.subplots()
    everything = [v for vs in values.values() for v in vs]
    lo, hi = min(everything), max(everything)
    bins = [lo + (hi - lo) * k / 40 for k in range(41)] if hi > lo else 10
    ticks = tick_labels(labels)
    for index, vs in values.items():
        if vs:
            ax.hist(vs, bins=bins, alpha=0.55, label=f"true {ticks[index]} (n={len(vs)})")
    ax.axvline(0.0, color="black", linewidth=1)
    if binary:
        ax.set_xlabel(f"log-likelihood of {ticks[1]} minus {ticks[0]} (nats)", **font_kwargs())
    else:
        ax.set_xlabel("log-likelihood margin of the true class (> 0: correct)")
    ax.set_ylabel("rows")
    legend_outside(ax)
    ax.set_title(title, **font_kwargs())  # a task or model name may be Korean
    return save_png(fig, path)


def plot_nshot(points: Mapping[int, float], path: Path, *, metric: str, title: str) -> Path | None:
    """The metric against the number of few-shot examples; None with fewer than two points."""
    if len(points) < 2:
        return None
    shots = sorted(points)
    fig = figure()
    ax = fig.subplots()
    ax.plot(shots, [points[s] for s in shots], "o-")
    for s in shots:
        ax.annotate(
            f"{points[s]:.3f}", (s, points[s]), textcoords="offset points", xytext=(0, 6), ha="center"
        )
    ax.set_xticks(shots)
    if all(0 <= v <= 1 for v in points.values()):
        ax.set_ylim(0, 1.05)  # scores on their whole scale: a 0.001 change must not look like a cliff
    else:
        ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlabel("few-shot examples (n)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.set_title(title, **font_kwargs())  # a task or model name may be Korean
    return save_png(fig, path)


def plot_labels_predictions(
    labels: Sequence[str],
    golds: Sequence[int],
    predictions: Sequence[int],
    path: Path,
    *,
    title: str,
) -> Path | None:
    """ko-gpt-bot-sc's labels-vs-predictions picture: per row (in order), its true class and the predicted one.

    Dots are the labels, crosses the predictions that differ from them, so each cross is an error.

    Returns:
        The path, or None when there are no rows.
    """
    if not golds or len(golds) != len(predictions):
        return None
    fig = figure(max(6.4, min(14.0, len(golds) * 0.08)), 3.2)
    ax = fig.subplots()
    xs = list(range(len(golds)))
    ax.plot(xs, golds, "o", color="tab:blue", markersize=4, label="label")
    wrong = [i for i in xs if predictions[i] != golds[i]]
    ax.plot(
        wrong,
        [predictions[i] for i in wrong],
        "x",
        color="tab:red",
        markersize=7,
        label=f"wrong prediction ({len(wrong)} of {len(golds)})",
    )
    ticks = tick_labels(labels)
    ax.set_yticks(range(len(ticks)), ticks, **font_kwargs())
    ax.set_ylim(-0.5, len(ticks) - 0.5)
    ax.set_xlabel("eval row")
    ax.grid(alpha=0.3, axis="x")
    legend_outside(ax)
    ax.set_title(title, **font_kwargs())  # a task or model name may be Korean
    return save_png(fig, path)


__all__ = [
    "figure",
    "font_kwargs",
    "legend_outside",
    "plot_confusion",
    "plot_labels_predictions",
    "plot_nshot",
    "plot_scores",
    "save_png",
    "tick_labels",
]
