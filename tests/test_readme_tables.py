"""The README's result tables are generated from the committed result files (benchmarks/readme_tables.py)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

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


def _performance_prose(text: str) -> str:
    """The README's Performance section without its generated tables and code spans."""
    tables = _module()
    section = text.split("\n## Performance\n", 1)[1].split("\n## ", 1)[0]
    section = tables.SECTION.sub("", section)
    return re.sub(r"`[^`]*`", "", section)


def test_performance_section_states_no_figure_outside_the_generated_tables():
    text = (REPO / "README.md").read_text()
    for name in ("throughput", "stages", "end_to_end"):
        assert f"<!-- readme_tables: {name} -->" in text
    figures = re.findall(r"\d[\d.,]*\s*(?:img/s|GFLOP/s|MB|GiB)\b|\b\d+(?:\.\d+)?x(?!\d)|\d+\.\d+\s*%"
                         r"|load average \d", _performance_prose(text))
    assert figures == [], f"hand-written figures in README's Performance section: {figures}"


def test_throughput_rows_name_the_host_the_load_and_the_command(tmp_path):
    tables = _module()
    committed = sorted((REPO / "benchmarks" / "results").glob("throughput-*.json"))
    newest = next(p for p in committed if "host" in json.loads(p.read_text())["environment"])
    payload = json.loads(newest.read_text())
    payload["environment"].update(load_average_before=[5.0, 5.0, 5.0], load_average_after=[1.0, 1.0, 1.0],
                                  machine_busy=True, other_cpu_use_before=None)
    payload["run"] = {"command": "python benchmarks/throughput.py --quick", "date_utc": "2026-12-02T01:00:00Z"}
    payload["precision_probe"] = {"precision": "fp32", "reason": "measured",
                                  "images_per_s": {"bf16": 10.0, "fp32": 12.5}}
    path = tmp_path / "throughput-test-kind.json"
    path.write_text(json.dumps(payload))
    text = tables.throughput_section(path)
    host = payload["environment"]["host"]
    assert host["cpu"] in text and host["onednn"]["isa"] in text and f"torch {payload['environment']['torch']}" in text
    assert "**BUSY machine** (load average 5.00 before, 1.00 after" in text
    assert "`python benchmarks/throughput.py --quick` on 2026-12-02T01:00:00Z" in text
    assert "| `--precision auto` probe | fp32 (measured; bf16 10.0 img/s, fp32 12.5 img/s) |" in text
    speedup = payload["pretrain_speedup_vs_lightly"]
    assert f"| speed-up vs lightly fp32 | {speedup:.2f}x" in text


def test_an_older_throughput_file_gets_the_fraction_of_its_best_kernel_not_its_own_roofline_key():
    """Files from before the best-kernel roofline divided by the square-matmul peak; the table divides
    by the fastest probe the file holds (matmul peaks and the bf16 conv probe) and judges that."""
    tables = _module()
    for path in sorted((REPO / "benchmarks" / "results").glob("throughput-*.json")):
        payload = json.loads(path.read_text())
        if "best_kernel_gflops" in payload["roofline"]:
            continue
        best = max([v["peak_gflops"] for v in payload["matmul_peaks"].values()]
                   + [payload["conv_probe_bf16"]["best_gflops"]])
        fraction = payload["roofline"]["achieved_gflops"] / best
        row = next(line for line in tables.throughput_section(path).splitlines()
                   if line.startswith("| of the best kernel measured"))
        assert row.split(" | ")[1].startswith(f"{fraction * 100:.0f}% (")
        assert row.endswith(f"≥ 70%: {'met' if fraction >= 0.7 else '**not met**'} |")
        break
    else:
        pytest.skip("no throughput file of the older format is committed")
