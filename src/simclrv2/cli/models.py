"""``simclrv2 models``: the model zoo as a table or JSON (SPEC §11 parameter-count rule)."""

from __future__ import annotations

import json

from simclrv2.models import PAPER_ARCHITECTURES, architecture_table, list_architectures


def print_models(as_json: bool = False, image_size: int = 224, show_all: bool = False) -> int:
    names = list_architectures() if show_all else list(dict.fromkeys(list(PAPER_ARCHITECTURES) + [
        n for n in list_architectures() if (n.startswith(("r18_", "r34_", "r200_")) and "_1x_" in n) or "." in n]))
    rows = architecture_table(names, image_size=image_size)
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    header = f"{'name':<15} {'depth':>5} {'width':>5} {'SK':>3} {'params':>14} {'params (M)':>10} {'feature_dim':>11}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['name']:<15} {row['depth']:>5} {row['width']:>5g} {int(bool(row['sk'])):>3} "
              f"{row['params']:>14,} {row['params'] / 1e6:>10.2f} {row['feature_dim']:>11}")
    print("\nparams: ResNet trunk up to the average pool, conv weights + 4 numbers per BatchNorm channel "
          "(the rule of the paper's Table 1, SPEC §11); heads excluded.")
    return 0
