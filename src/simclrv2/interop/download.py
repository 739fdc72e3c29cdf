"""Download the released SimCLRv2 TF1 checkpoints into a local cache (SPEC §8.1).

The checkpoints are public at
``https://storage.googleapis.com/simclr-checkpoints/simclrv2/<kind>/<arch>/`` as ``checkpoint``,
``model.ckpt-<step>.index`` and ``model.ckpt-<step>.data-0000K-of-0000N`` (the ``.meta`` graph,
``graph.pbtxt`` and ``hub/`` module are not needed and not fetched).  Files go to
``<cache>/<kind>/<arch>/`` (default cache ``~/.cache/simclrv2/checkpoints``).

* Partial files are kept as ``NAME.part`` and resumed with an HTTP ``Range`` request; a server
  that ignores the range (status 200) restarts the file from the beginning.
* Progress: one tqdm bar per file, with the rate and the ETA.
* Integrity: each file's size must equal the announced length; after the download every
  tensor's size and crc32c is checked against the bundle index (:meth:`TFCheckpoint.verify`),
  and a failing data file is deleted so that the next run fetches it again.
* Offline / unreachable server: a :class:`~simclrv2.errors.CheckpointError` (exit 2) that says
  so and how to import a copy fetched by other means.

Only the standard library's ``urllib`` is used (one GET per file; no dependency).
"""

from __future__ import annotations

import os
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from simclrv2.errors import CheckpointError, ConfigError
from simclrv2.interop.tf_bundle import TFCheckpoint, bundle_num_shards

__all__ = ["BASE_URL", "KIND_STEPS", "DOWNLOAD_KINDS", "default_cache_dir", "checkpoint_url",
           "download_checkpoint", "fetch_file"]

BASE_URL = "https://storage.googleapis.com/simclr-checkpoints/simclrv2"
#: Global step of each kind's checkpoint (the file names; SPEC §8.1).
KIND_STEPS = {"pretrained": 250228, "finetuned_100pct": 37535, "finetuned_10pct": 3754,
              "finetuned_1pct": 751, "supervised": 28151, "distill_1pct": None}
DOWNLOAD_KINDS = tuple(KIND_STEPS)
_CHUNK = 1 << 20
_TIMEOUT_S = 60
_CKPT_LINE = re.compile(r'^model_checkpoint_path:\s*"([^"]+)"\s*$')


def default_cache_dir() -> Path:
    """``$SIMCLRV2_CACHE`` or ``$XDG_CACHE_HOME/simclrv2/checkpoints`` or ``~/.cache/simclrv2/checkpoints``."""
    if os.environ.get("SIMCLRV2_CACHE"):
        return Path(os.environ["SIMCLRV2_CACHE"]).expanduser()
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "simclrv2" / "checkpoints"


def checkpoint_url(kind: str, arch: str, base_url: str = BASE_URL) -> str:
    return f"{base_url.rstrip('/')}/{kind}/{arch}/"


def _unreachable(url: str, exc: BaseException) -> CheckpointError:
    reason = getattr(exc, "reason", exc)
    return CheckpointError(f"download: cannot reach {url} ({reason}); are you offline? Fetch the files "
                           "(checkpoint, model.ckpt-*.index, model.ckpt-*.data-*) by other means and run "
                           "`simclrv2 import-tf DIR --out ...` on their folder")


def fetch_file(url: str, dest: Path, *, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``); returns ``dest``.  A complete
    ``dest`` is kept as it is (its content is checked later, by the bundle's checksums)."""
    if dest.is_file():
        return dest
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "simclrv2"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=_TIMEOUT_S)  # noqa: S310 (https or a given mirror)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the range starts at the end: the part file is complete already
            part.replace(dest)
            return dest
        if exc.code == 404:
            raise CheckpointError(f"download: {url} does not exist (HTTP 404); check the architecture and "
                                  "--kind (see `simclrv2 import-tf --help`)") from None
        raise CheckpointError(f"download: {url} failed with HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as exc:
        raise _unreachable(url, exc) from None
    with response:
        status = getattr(response, "status", 200)
        length = response.headers.get("Content-Length")
        if status == 206:
            m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != have:
                raise CheckpointError(f"download: {url} answered a resume request with the wrong range "
                                      f"({response.headers.get('Content-Range')!r}); delete {part} and retry")
            total = int(m.group(2)) if m.group(2) != "*" else None
            mode = "ab"
        else:  # 200: the server sent the whole file
            have, mode = 0, "wb"
            total = int(length) if length is not None else None
        try:
            with open(part, mode) as fh, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                               unit_divisor=1024, desc=dest.name, disable=not progress,
                                               leave=False) as bar:
                while True:
                    try:
                        chunk = response.read(_CHUNK)
                    except (OSError, socket.timeout) as exc:
                        raise CheckpointError(f"download: the connection broke while fetching {url} ({exc}); "
                                              f"rerun the same command to resume from byte {fh.tell()}") from None
                    if not chunk:
                        break
                    fh.write(chunk)
                    bar.update(len(chunk))
                size = fh.tell()
        except OSError as exc:
            raise ConfigError(f"cache_dir: cannot write {part} ({exc.strerror or exc})") from exc
    if total is not None and size != total:
        raise CheckpointError(f"download: {url} stopped at {size} of {total} bytes; rerun the same command to "
                              "resume")
    part.replace(dest)
    return dest


def download_checkpoint(arch: str, kind: str, *, cache_dir: str | Path | None = None, base_url: str = BASE_URL,
                        progress: bool = True) -> Path:
    """Fetch (or find in the cache) the released ``kind``/``arch`` checkpoint; returns its folder,
    verified against the bundle's sizes and crc32c."""
    if kind not in KIND_STEPS:
        raise ConfigError(f"kind: {kind!r} is not one of {', '.join(DOWNLOAD_KINDS)}")
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = folder / kind / arch
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cache_dir: cannot create {folder} ({exc.strerror or exc})") from exc
    url = checkpoint_url(kind, arch, base_url)
    pointer = fetch_file(url + "checkpoint", folder / "checkpoint", progress=False)
    prefix = None
    for line in pointer.read_text(errors="replace").splitlines():
        m = _CKPT_LINE.match(line.strip())
        if m:  # the pointer may hold the writer's absolute path (e.g. gs://...): keep the file name
            prefix = m.group(1).replace("\\", "/").rsplit("/", 1)[-1] or None
            break
    if prefix is None:
        pointer.unlink(missing_ok=True)
        raise CheckpointError(f"download: {url}checkpoint names no model_checkpoint_path; not a TF checkpoint "
                              "folder")
    index = fetch_file(url + f"{prefix}.index", folder / f"{prefix}.index", progress=progress)
    try:
        shards = bundle_num_shards(index)
    except CheckpointError:
        index.unlink(missing_ok=True)
        raise
    for k in range(shards):
        name = f"{prefix}.data-{k:05d}-of-{shards:05d}"
        fetch_file(url + name, folder / name, progress=progress)
    try:
        TFCheckpoint(folder).verify()
    except CheckpointError as exc:
        for k in range(shards):
            (folder / f"{prefix}.data-{k:05d}-of-{shards:05d}").unlink(missing_ok=True)
        raise CheckpointError(f"download: the files of {url} failed their integrity check ({exc}); the data files "
                              "were deleted, rerun to fetch them again") from None
    return folder
