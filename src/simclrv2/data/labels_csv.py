"""Labelled images given as a CSV file of ``path,label`` rows (``--labels FILE.csv``).

For users whose labels live in a table rather than in class folders. Paths are relative to the
CSV file's folder (absolute paths are allowed); a first row ``path,label`` is a header. Class
names are the distinct labels, sorted, as for class folders. Errors name the file and the line
numbers, never the rows themselves (the file may not be what the user thinks it is).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from simclrv2.errors import DataError

__all__ = ["MAX_LABELS_BYTES", "read_labels_csv"]

MAX_LABELS_BYTES = 512 * 1024 * 1024


def read_labels_csv(csv_file: str | Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """``([(image path, label index)], classes)`` from ``csv_file``; :class:`DataError` on any problem."""
    path = Path(csv_file).expanduser()
    if not path.is_file():
        raise DataError(f"labels: {path} does not exist")
    if path.stat().st_size > MAX_LABELS_BYTES:
        raise DataError(f"labels: {path} is larger than {MAX_LABELS_BYTES >> 20} MiB")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"labels: {path} is not UTF-8 text (invalid byte at offset {exc.start})") from exc
    except OSError as exc:
        raise DataError(f"labels: cannot read {path} ({exc.strerror or exc})") from exc
    rows: list[tuple[int, str, str]] = []
    bad: list[int] = []
    for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or all(not cell.strip() for cell in row) or row[0].lstrip().startswith("#"):
            continue
        if number == 1 and [c.strip().lower() for c in row[:2]] == ["path", "label"]:
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            bad.append(number)
            continue
        rows.append((number, row[0].strip(), row[1].strip()))
    if bad:
        raise DataError(f"labels: {path}: {len(bad)} line(s) are not 'path,label' rows (lines "
                        f"{', '.join(map(str, bad[:10]))}{', ...' if len(bad) > 10 else ''})")
    if not rows:
        raise DataError(f"labels: {path} has no path,label rows")
    classes = sorted({label for _, _, label in rows})
    index = {name: i for i, name in enumerate(classes)}
    base = path.parent
    samples: list[tuple[Path, int]] = []
    missing: list[int] = []
    seen: set[Path] = set()
    for number, rel, label in rows:
        file = Path(rel.replace("\\", "/")).expanduser()
        file = file if file.is_absolute() else base / file
        if not file.is_file():
            missing.append(number)
            continue
        if file in seen:
            continue
        seen.add(file)
        samples.append((file, index[label]))
    if missing:
        raise DataError(f"labels: {path}: {len(missing)} row(s) name images that do not exist (lines "
                        f"{', '.join(map(str, missing[:10]))}{', ...' if len(missing) > 10 else ''}); paths "
                        f"are relative to {base}")
    return samples, classes
