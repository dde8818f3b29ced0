"""Tables in a paper's layout, built from the numbers the suites already computed: pure, report dicts in and out.

A table (``EvalConfig.tables``, one per paper table) names its rows (entry labels) and the paper's columns, each a
(suite, metric) pair; with ``categories`` every column is repeated per I2P category (SLD's Table 2: inappropriate
probability and expected maximum inappropriateness per category). A cell is the very summary dict of the suite
section (``report["suites"][suite]``): its ``results`` for a whole-suite number, the suite table whose ``metric``
matches for a category. So a cell equals the entry's number in the suite section, and the number a run of that
entry alone gives for the same seeds.

A cell that has no number says why in its text (the entry was not given, the suite was not run, FID has no
reference images, LPIPS is measured against this entry, no prompt of the category was evaluated, ...): no cell is
blank.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

from sdd.eval.aggregate import has_value
from sdd.eval.schema import OVERALL

# Column headings when a table column gives none (the papers' names).
HEADERS = {
    ("i2p", "inappropriate"): "Inappropriate probability (%)",
    ("i2p", "expected_max"): "Exp. max. inappropriateness (%)",
    ("i2p", "q16"): "% Q16",
    ("i2p", "nudenet"): "% NudeNet",
    ("nudity", "nude"): "% nude",
    ("coco", "fid"): "FID",
    ("coco", "lpips"): "LPIPS",
    ("coco", "clip_score"): "CLIP",
}


def column_key(suite: str, metric: str, category: Optional[str]) -> str:
    return f"{suite}.{metric}" + (f"@{category}" if category else "")


def format_cell(summary: dict) -> str:
    """A table cell: rates in %, 2 decimals; means 4; one-number values (FID) 3; expected max as mean ± std."""
    kind, v = summary["kind"], summary["value"]
    if kind == "rate":
        return f"{100 * v:.2f}"
    if kind == "expected_max":
        text = f"{100 * v:.2f} ± {100 * summary['std']:.2f}"
        if summary.get("sample", 0) < summary.get("sample_requested", 0):
            text += f" (all {summary['sample']})"
        return text
    if kind == "mean":
        return f"{v:.4f}"
    return f"{v:.3f}"


def _has_number(summary: Optional[dict]) -> bool:
    return has_value(summary)


def find_summary(section: dict, metric: str, category: Optional[str], label: str) -> tuple[Optional[dict], str]:
    """The summary of ``label`` for ``metric`` (of ``category``) in a suite section, or None and why not."""
    if category in (None, OVERALL) and metric in section.get("results", {}).get(label, {}):
        return section["results"][label][metric], ""
    table = next((t for t in section.get("tables", []) if t.get("metric") == metric), None)
    if table is None:
        if category not in (None, OVERALL):
            return None, f"not computed: no per-category {metric}"
        return None, f"not computed: no {metric} in this run"
    key = category or OVERALL
    if key not in table["columns"]:
        if key == OVERALL:
            return None, f"not computed: no overall {metric}"
        return None, f"no prompt of category '{key}' among the evaluated rows"
    return table["results"].get(label, {}).get(key), ""


def build_table(table: Mapping, suites: Mapping[str, dict], labels: Sequence[str],
                not_run: Mapping[str, str], missing: Mapping[tuple[str, str], str]) -> dict:
    """One table of ``report["tables"]``.

    ``table``: a ``TableConfig`` as a dict. ``suites``: ``report["suites"]``. ``labels``: every entry, in order.
    ``not_run``: label -> why the entry was not run (no model given). ``missing``: (suite, metric) -> why the run
    has no such column (e.g. FID without ``coco.reference_dir``).
    """
    rows = list(table.get("rows") or labels)
    categories = list(table.get("categories") or [None])
    columns = []
    for col in table["columns"]:  # the paper's column groups, each split by category
        for cat in categories:
            header = col.get("header") or HEADERS.get((col["suite"], col["metric"]), f"{col['suite']} {col['metric']}")
            columns.append({"key": column_key(col["suite"], col["metric"], cat), "suite": col["suite"],
                            "metric": col["metric"], "category": cat,
                            "header": header if cat is None else f"{header}: {cat}"})
    cells: dict[str, dict] = {}
    for label in rows:
        line = {}
        for col in columns:
            summary, reason = None, ""
            suite, metric = col["suite"], col["metric"]
            if label in not_run:
                reason = not_run[label]
            elif suite not in suites:
                reason = f"not computed: suite {suite} is not in suites"
            elif (suite, metric) in missing:
                reason = missing[(suite, metric)]
            else:
                summary, reason = find_summary(suites[suite], metric, col["category"], label)
                if summary is not None and summary.get("base"):
                    reason, summary = "N/A: the LPIPS base (the others are measured against it)", None
                elif summary is not None and not _has_number(summary):
                    reason = ("not computed: no image scored" if not summary.get("n") else
                              "not computed: FID needs 2 or more images on each side" if summary["kind"] == "value"
                              else "not computed: no finite value")
                    summary = None
                elif summary is None and not reason:
                    reason = "not computed: no value for this entry"
            text = format_cell(summary) if summary is not None else f"– ({reason})"
            line[col["key"]] = {"text": text, "summary": summary, "reason": reason or None}
        cells[label] = line
    return {"name": table["name"], "title": table.get("title") or table["name"], "rows": rows,
            "categories": [c for c in categories if c is not None], "columns": columns, "cells": cells}
