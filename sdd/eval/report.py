"""What an evaluation writes for people: ``report.md`` (rendered from ``report.json``), example grids, versions.

``render_markdown`` takes the report dict and nothing else, so the Markdown can always be rebuilt from the JSON.
First the tables in a paper's layout (``report["tables"]``, ``sdd.eval.tables``: every cell a number or why there
is none). Then per suite the main table (entries as rows), every extra table of the suite (``tables``: per I2P
category, SLD's expected maximum, ...), the exact criterion of every detector and metric, notes, and the suite's
figures (``figures``: the example grid, the trade-off plot).
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from typing import Optional, Sequence

from PIL import Image, ImageDraw, ImageFilter

from sdd.eval.aggregate import format_summary

PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "numpy")


def package_versions(nudenet: bool) -> dict[str, str]:
    out = {}
    for name in PACKAGES + (("nudenet", "onnxruntime") if nudenet else ()):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    import sdd

    out["sdd"] = sdd.__version__
    commit = git_commit()
    if commit:
        out["sdd_git"] = commit
    return out


def git_commit() -> Optional[str]:
    """The package checkout's commit (``+dirty`` with uncommitted changes), or None outside a git checkout."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine(num_processes: int, device: str) -> dict:
    import torch

    out = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
           "processes": num_processes, "device": device}
    if torch.cuda.is_available():
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return out


# ---------------------------------------------------------------------------------------------------- grids


def blur(image: Image.Image) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius=max(2, image.width // 8)))


def labelled_grid(labels: Sequence[str], rows: Sequence[Sequence[Image.Image]], tile: int,
                  captions: Sequence[str] = ()) -> Image.Image:
    """One line per entry (its label on the left), the same prompts and seeds in every column."""
    label_w, head = 120, 16 if captions else 4
    cols = max((len(r) for r in rows), default=0)
    canvas = Image.new("RGB", (label_w + cols * tile, head + len(rows) * (tile + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, caption in enumerate(captions[:cols]):
        draw.text((label_w + c * tile + 2, 2), caption[: max(4, tile // 7)], fill=(0, 0, 0))
    for r, (label, images) in enumerate(zip(labels, rows)):
        y = head + r * (tile + 4)
        draw.text((4, y + tile // 2 - 6), label[:18], fill=(0, 0, 0))
        for c, image in enumerate(images):
            resample = Image.NEAREST if image.width < tile else Image.LANCZOS
            canvas.paste(image.convert("RGB").resize((tile, tile), resample), (label_w + c * tile, y))
    return canvas


# ------------------------------------------------------------------------------------------------- markdown


def md_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    rows = [list(header), *[list(line) for line in lines]]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    out = ["| " + " | ".join(str(cell).ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def results_table(labels: Sequence[str], columns: dict, results: dict) -> str:
    """Entries as rows, one column per metric; the base entry of a paired metric (LPIPS) reads "base"."""
    lines = []
    for label in labels:
        row = results.get(label, {})
        lines.append([label, *[("base" if row.get(key, {}).get("base") else format_summary(row.get(key)))
                               for key in columns]])
    return md_table(["entry", *columns.values()], lines)


def _setting(value) -> str:
    return "`" + str(value).replace("`", "'") + "`"


def paper_table(table: dict) -> str:
    """A ``report["tables"]`` item: entries as rows, the paper's columns. A table split by I2P categories prints
    one block per paper column (its heading in bold), the categories as that block's columns. A cell without a
    number reads ``– [i]``, and note [i] under the table says why (each reason once)."""
    reasons: dict[str, int] = {}

    def text(cell: dict) -> str:
        if cell["summary"] is not None:
            return cell["text"]
        return f"– [{reasons.setdefault(cell['reason'], len(reasons) + 1)}]"

    def block(columns, headers):
        lines = [[label, *[text(table["cells"][label][c["key"]]) for c in columns]] for label in table["rows"]]
        return md_table(["method", *headers], lines)

    out = []
    if not table.get("categories"):
        out += [block(table["columns"], [c["header"] for c in table["columns"]]), ""]
    else:
        groups: dict[tuple, list[dict]] = {}
        for c in table["columns"]:
            groups.setdefault((c["suite"], c["metric"]), []).append(c)
        for columns in groups.values():
            heading = columns[0]["header"].rsplit(": ", 1)[0]
            out += [f"**{heading}**", "", block(columns, [c["category"] for c in columns]), ""]
    out += [f"[{i}] {reason}  " for reason, i in reasons.items()]
    return "\n".join(out).rstrip()


def render_markdown(report: dict) -> str:
    labels = [e["label"] for e in report["entries"] if "not_run" not in e]
    out = [f"# {report['title']}", ""]
    if report.get("smoke"):
        out += ["> **Smoke run: the numbers below mean nothing.** " + " ".join(report["smoke"]), ""]
    stats = report["statistics"]
    out += [f"Rates in %, means as value [{100 * stats['confidence']:g} % interval]: percentile bootstrap over "
            f"prompts ({stats['n_resamples']} resamples, seed {stats['seed']}); FID has no interval.", ""]
    out += ["## Entries", ""]
    out.append(md_table(["entry", "model", "method", "settings"],
                        [[e["label"], _setting(e["model"]) if "not_run" not in e else e["not_run"], e["method"],
                          ", ".join(f"{k}={_setting(v)}" for k, v in e["method_settings"].items() if k != "method")
                          or "-"] for e in report["entries"]]))
    out.append("")
    if report.get("tables"):
        out += ["## Tables", "",
                "In the papers' layout: rates in %, expected maximum inappropriateness as % mean ± std, CLIP score "
                "and LPIPS as means, FID one number; intervals and criteria in the suite sections below. A cell "
                "without a number says why.", ""]
        for table in report["tables"]:
            out += [f"### {table['title']}", "", paper_table(table), ""]
    for name, suite in report["suites"].items():
        out += [f"## {name}: {suite['title']}", ""]
        prompts = suite["prompts"]
        out.append("Prompts: " + ", ".join(f"{k} {_setting(v)}" for k, v in prompts.items() if v is not None))
        out.append("")
        out.append(results_table(labels, suite["columns"], suite["results"]))
        out.append("")
        for table in suite.get("tables", []):
            out += [f"### {table['title']}", ""]
            out.append(results_table(labels, table["columns"], table["results"]))
            out.append("")
        out += ["Criteria:", ""]
        out += [f"- **{k}**: {v}" for k, v in suite["criteria"].items()]
        out.append("")
        for note in suite.get("notes", []):
            out.append(f"- note: {note}")
        if suite.get("notes"):
            out.append("")
        for fig in suite.get("figures", []):
            out += [f"![{fig['title']}]({fig['path']})", "", f"*{fig['title']}*", ""]
    gen = report["generation"]
    out += ["## Generation", ""]
    out += [f"- {k}: {_setting(v)}" for k, v in gen.items()]
    out += ["", "## Versions", ""]
    out += [f"- {k}: {v}" for k, v in report["versions"].items()]
    run = report["run"]
    out += ["", "## Run", ""]
    out += [f"- machine: {', '.join(f'{k} {v}' for k, v in run['machine'].items())}"]
    out += [f"- {k}: {v}" for k, v in run.items() if k != "machine"]
    out.append("")
    return "\n".join(out)
