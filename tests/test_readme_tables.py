"""The README's result tables are generated from the committed result files (benchmarks/readme_tables.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("readme_tables", REPO / "benchmarks" / "readme_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_tables_equal_what_the_script_generates_from_the_result_files():
    tables = _module()
    text = (REPO / "README.md").read_text()
    sections = tables.SECTION.findall(text)
    assert any(name == "cifar10" for _, name, _, _ in sections)
    for _, name, body, _ in sections:
        generated = tables.render(name)
        assert generated is not None, f"README table {name!r} has no committed result file"
        assert body == generated, f"README table {name!r} differs; run python benchmarks/readme_tables.py"


def test_generated_table_shows_mean_and_std_of_several_seeds():
    tables = _module()
    cell = {"top1": 0.5, "top5": 0.9, "top1_std": 0.021, "num_seeds": 3}
    text = tables.accuracy_table({"finetune": {"0.01": cell}})
    assert "| SimCLRv2 fine-tuned (teacher) | 50.0 ± 2.1 (90.0) |" in text
    assert "3 seeds" in text
