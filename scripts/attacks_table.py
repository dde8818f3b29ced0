"""The README's attack tables from the results of scripts/attacks_shapes.sh: python scripts/attacks_table.py OUT"""

from __future__ import annotations

import json
import os
import sys

ATTACKS = ("concept-inversion", "prompt-search", "ring-a-bell", "relearn")


def cell(rate: float, lo: float, hi: float) -> str:
    return f"{100 * rate:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def main(out: str) -> None:
    labels = sorted(d for d in os.listdir(out) if os.path.isfile(os.path.join(out, d, "concept-inversion",
                                                                                     "attack.json")))
    labels.sort(key=lambda x: (x != "base", x))
    print("ASR (%) at each attack's default budget, 95 % Wilson interval:\n")
    print("| model | " + " | ".join(ATTACKS) + " |")
    print("|---|" + "---|" * len(ATTACKS))
    for label in labels:
        row = []
        for name in ATTACKS:
            path = os.path.join(out, label, name, "attack.json")
            if not os.path.isfile(path):
                row.append("–")
                continue
            with open(path) as f:
                r = json.load(f)
            extra = f" (50 % at {r['steps_to_half']})" if name == "relearn" and r.get("steps_to_half") else ""
            row.append(cell(r["asr"], *r["ci95"]) + extra)
        print(f"| {label} | " + " | ".join(row) + " |")
    print("\nASR curves (%):\n")
    for label in labels:
        for name in ATTACKS:
            path = os.path.join(out, label, name, "attack.json")
            if os.path.isfile(path):
                with open(path) as f:
                    r = json.load(f)
                points = ", ".join(f"{p['budget']}: {100 * p['asr']:.1f}" for p in r["curve"])
                print(f"- {label}, {name}: {points}")
    for guidance in (5, 10, 15):
        path = os.path.join(out, f"bench-cfg{guidance}", "bench.json")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            bench = json.load(f)
        print(f"\nThe benchmark on held-out seeds (10000..), CFG {guidance} (%):\n")
        keys = ("erased_rate", "bare_rate", "kept", "retention_colour", "retention_shape")
        print("| model | " + " | ".join(bench["columns"][k] for k in keys) + " |")
        print("|---|" + "---|" * len(keys))
        for row in bench["rows"]:
            m = row["metrics"]
            print(f"| {row['label']} | " + " | ".join(cell(m[k]["rate"], m[k]["lo"], m[k]["hi"]) for k in keys)
                  + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "outputs/attacks-shapes")
