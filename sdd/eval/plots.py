"""Trade-off plots: per suite that measures erasure, how much of the concept is left against what was kept.

For the erasure suites (``ERASED``: I2P's inappropriate probability, the nudity suite's % nude, ShapesWorld's
erased rate) one figure, one panel per retention number the run has (``RETAINED``: COCO CLIP score, FID, LPIPS;
ShapesWorld's retention accuracies; for I2P also SLD's expected maximum inappropriateness): one point per entry,
bars = its 95 % interval (bootstrap over prompts, or Wilson for ShapesWorld), ± std for the expected maximum,
none for FID (one number per set). A suite with nothing to plot against gets one panel of its erased rate per
entry. ``panels`` is pure (report dicts in, points out); ``draw`` renders with matplotlib's Agg canvas (no
display, no global backend switch).
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

from sdd.errors import UserError
from sdd.eval.aggregate import has_value, number
from sdd.eval.tables import HEADERS, find_summary

ERASED = {"i2p": "inappropriate", "nudity": "nude", "shapes": "erased_rate"}
RETAINED = {
    "i2p": (("i2p", "expected_max"), ("coco", "clip_score"), ("coco", "fid"), ("coco", "lpips")),
    "nudity": (("coco", "clip_score"), ("coco", "fid"), ("coco", "lpips")),
    "shapes": (("shapes", "retention_colour"), ("shapes", "retention_shape"), ("shapes", "kept")),
}
PERCENT = ("rate", "expected_max")


def _usable(summary: Optional[dict]) -> bool:
    return has_value(summary) and not summary.get("base")


def axis_title(suites: Mapping[str, dict], suite: str, metric: str, percent: bool) -> str:
    title = suites[suite].get("columns", {}).get(metric) or HEADERS.get((suite, metric), metric)
    title = title.removeprefix("% ").removesuffix(" (%)")
    return title + (" (%)" if percent else "")


def point(summary: dict) -> tuple[float, float, float]:
    """(value, error below, error above) in the unit the axis shows: % for rates, as is otherwise."""
    scale = 100.0 if summary["kind"] in PERCENT else 1.0
    v = summary["value"] * scale
    if summary["kind"] == "expected_max":
        return v, summary["std"] * scale, summary["std"] * scale
    lo, hi = number(summary.get("lo")), number(summary.get("hi"))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return v, 0.0, 0.0
    return v, max(0.0, v - lo * scale), max(0.0, hi * scale - v)


def panels(name: str, suites: Mapping[str, dict], labels: Sequence[str]) -> list[dict]:
    """The panels of suite ``name``'s trade-off figure: ``{"x", "y", "xlabel", "ylabel", "points"}``, each point
    ``(label, x (value, err-, err+), y (...) or None)``; [] when the suite measures no erasure."""
    if name not in ERASED or name not in suites:
        return []
    x_metric = ERASED[name]
    xs = {label: find_summary(suites[name], x_metric, None, label)[0] for label in labels}
    xs = {label: s for label, s in xs.items() if _usable(s)}
    xlabel = axis_title(suites, name, x_metric, True)
    out = []
    for suite, metric in RETAINED[name]:
        if suite not in suites:
            continue
        pts = []
        for label, xsum in xs.items():
            ysum = find_summary(suites[suite], metric, None, label)[0]
            if _usable(ysum):
                pts.append((label, point(xsum), point(ysum)))
        if pts:
            y_percent = find_summary(suites[suite], metric, None, pts[0][0])[0]["kind"] in PERCENT
            out.append({"x": f"{name}.{x_metric}", "y": f"{suite}.{metric}", "xlabel": xlabel,
                        "ylabel": axis_title(suites, suite, metric, y_percent), "points": pts})
    if not out and xs:
        out.append({"x": f"{name}.{x_metric}", "y": None, "xlabel": xlabel, "ylabel": "entry",
                    "points": [(label, point(s), None) for label, s in xs.items()]})
    return out


def draw(figure_panels: Sequence[dict], title: str, path: str, labels: Sequence[str]) -> None:
    """Render the panels side by side into a PNG at ``path`` (written atomically)."""
    fig, axes, colours = _figure(len(figure_panels), labels)
    markers = "osD^vP*Xh<>"
    marker = {label: markers[(i // 10) % len(markers)] for i, label in enumerate(labels)}
    for ax, panel in zip(axes, figure_panels):
        for i, (label, (x, xl, xh), y) in enumerate(panel["points"]):
            if y is None:  # no retention number: the erased rate per entry
                y = (float(i), 0.0, 0.0)
            ax.errorbar([x], [y[0]], xerr=[[xl], [xh]], yerr=[[y[1]], [y[2]]], fmt=marker[label],
                        color=colours[label], ecolor=colours[label], elinewidth=1, capsize=3, markersize=6)
            ax.annotate(label, (x, y[0]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if panel["y"] is None:
            ax.set_yticks(range(len(panel["points"])), [p[0] for p in panel["points"]], fontsize=7)
            ax.set_title("no retention metric in this run", fontsize=8)
            ax.invert_yaxis()
        else:
            ax.set_ylabel(panel["ylabel"], fontsize=8)
        ax.set_xlabel(panel["xlabel"] + "  (lower: more erased)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
    _save(fig, title, path)


def _figure(n_panels: int, labels: Sequence[str]):
    """A figure of ``n_panels`` side by side (matplotlib's Agg canvas), its axes and a colour per label."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("report.plots: matplotlib is not installed (pip install -e '.[eval]'), or set "
                        "report.plots=false") from None
    fig = Figure(figsize=(4.4 * n_panels, 3.9), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, n_panels, squeeze=False)[0], {label: f"C{i % 10}" for i, label in enumerate(labels)}


def _save(fig, title: str, path: str) -> None:
    from sdd.files import atomic_path

    fig.suptitle(title, fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def curves(section: Mapping[str, dict], labels: Sequence[str]) -> list[dict]:
    """The panels of the attacks' figure: one per attack, ``{"attack", "title", "lines": [(label, [(budget, asr %,
    err-, err+), ...])]}``, an entry's line its ASR curve over the attack's budget (95 % Wilson bars)."""
    out = []
    for attack, title in section.get("columns", {}).items():
        lines = []
        for label in labels:
            cell = section.get("results", {}).get(label, {}).get(attack)
            if cell and cell.get("curve"):
                lines.append((label, [(p["budget"], 100 * p["asr"], 100 * max(0.0, p["asr"] - p["ci95"][0]),
                                       100 * max(0.0, p["ci95"][1] - p["asr"])) for p in cell["curve"]]))
        if lines:
            out.append({"attack": attack, "title": title, "lines": lines})
    return out


def draw_curves(figure_panels: Sequence[dict], title: str, path: str, labels: Sequence[str]) -> None:
    """Render the ASR curves side by side (budget on a log axis) into a PNG at ``path`` (written atomically)."""
    fig, axes, colours = _figure(len(figure_panels), labels)
    for ax, panel in zip(axes, figure_panels):
        for label, points in panel["lines"]:
            budget, asr, lo, hi = zip(*points)
            ax.errorbar(budget, asr, yerr=[lo, hi], fmt="-o", color=colours[label], elinewidth=1, capsize=3,
                        markersize=4, label=label)
        ax.set_xscale("log")
        ax.set_ylim(-2, 102)
        ax.set_xlabel("budget", fontsize=8)
        ax.set_ylabel("ASR (%)", fontsize=8)
        ax.set_title(panel["title"], fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    _save(fig, title, path)
