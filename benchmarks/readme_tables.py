"""Generate the README's result tables from the committed result files, so that every figure in them
comes from a file in ``benchmarks/results/`` (tests/test_readme_tables.py checks that they match).

Each generated table sits between ``<!-- readme_tables: NAME -->`` and ``<!-- /readme_tables -->`` in
README.md. Tables:

- ``cifar10``: ``benchmarks/results/cifar10_label_efficiency.json`` (the CIFAR-10 benchmark).
- ``demo``: ``benchmarks/results/demo/results.json`` (a ``simclrv2 demo`` run), when it is committed.

    python benchmarks/readme_tables.py           # rewrite the tables in README.md
    python benchmarks/readme_tables.py --check   # exit 1 if README.md differs from the result files
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
README = REPO / "README.md"

ROW_NAMES = {"finetune": "SimCLRv2 fine-tuned (teacher)", "distill": "SimCLRv2 self-distilled",
             "supervised": "supervised baseline", "linear_eval": "linear evaluation"}
SECTION = re.compile(r"(<!-- readme_tables: (\w+) -->\n)(.*?)(<!-- /readme_tables -->)", re.S)


def _cell(cell: dict) -> str:
    text = f"{cell['top1'] * 100:.1f}"
    if cell.get("num_seeds", 1) > 1:
        text += f" ± {cell['top1_std'] * 100:.1f}"
    return text + f" ({cell['top5'] * 100:.1f})"


def accuracy_table(table: dict) -> str:
    """A results table ``{method: {fraction: {top1, top5[, top1_std, num_seeds]}}}`` as markdown."""
    keys = sorted({k for rows in table.values() for k in rows}, key=float)
    seeds = max((c.get("num_seeds", 1) for rows in table.values() for c in rows.values()), default=1)
    spread = " mean ± std" if seeds > 1 else ""
    lines = ["| method | " + " | ".join(f"{float(k) * 100:g}% labels top-1{spread} (top-5)" for k in keys) + " |",
             "|---|" + "---|" * len(keys)]
    for method in [m for m in ROW_NAMES if m in table] + [m for m in table if m not in ROW_NAMES]:
        name = ROW_NAMES.get(method, method.replace("distill_", "distilled into "))
        lines.append(f"| {name} | " + " | ".join(_cell(table[method][k]) if k in table[method] else "-"
                                                 for k in keys) + " |")
    lines.append("")
    lines.append(f"{'One seed' if seeds == 1 else f'{seeds} seeds'}; top-1 (top-5) accuracy in % on the test split.")
    return "\n".join(lines) + "\n"


def render(name: str) -> str | None:
    """The generated text of table ``name``, or None when its result file is not committed."""
    if name == "cifar10":
        path = RESULTS / "cifar10_label_efficiency.json"
        if not path.is_file():
            return None
        payload = json.loads(path.read_text())
        minutes = payload.get("stage_seconds_total", 0) / 60
        return accuracy_table(payload["table"]) + f"All stages: {minutes:.1f} min on {payload.get('cpu_count')} CPUs.\n"
    if name == "demo":
        path = RESULTS / "demo" / "results.json"
        if not path.is_file():
            return None
        table = json.loads(path.read_text())
        seconds = json.loads((RESULTS / "demo" / "stage_seconds.json").read_text()) \
            if (RESULTS / "demo" / "stage_seconds.json").is_file() else {}
        return accuracy_table(table) + (f"All stages: {sum(seconds.values()) / 60:.1f} min.\n" if seconds else "")
    raise KeyError(name)


def update(text: str) -> str:
    """``text`` (README.md) with every generated table replaced by :func:`render`'s output."""
    def replace(match: re.Match) -> str:
        body = render(match.group(2))
        return match.group(0) if body is None else match.group(1) + body + match.group(4)
    return SECTION.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="Only compare; exit 1 when README.md differs.")
    args = parser.parse_args(argv)
    text = README.read_text()
    new = update(text)
    if args.check:
        if new != text:
            print("README.md tables differ from benchmarks/results; run python benchmarks/readme_tables.py",
                  file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
