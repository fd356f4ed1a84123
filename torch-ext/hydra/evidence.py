"""Evidence files: GPU results checked into ``evidence/`` as JSON (SPEC section 6).

Every evidence file records what produced it and a digest of the sources it ran,
so that a reader can tell whether it still describes the code in the tree::

    {"kind": "decode_bench", "device": "NVIDIA H100 80GB HBM3",
     "torch": "2.11.0+cu130", "cuda": "13.0",
     "command": "python3 benchmarks/benchmark_hydra_decode.py",
     "source_digest": "sha256:...", "created": "2026-11-26T12:00:00Z",
     "rows": [...]}

``summary`` is for test runs and ``rows`` for benchmarks. Evidence whose
``source_digest`` differs from ``source_digest()`` of the current tree is stale.

This module stands alone: it has no relative imports and imports torch only
inside ``device_info``, so tests and scripts can load it straight from its
file without importing (and so building) the ``hydra`` package.

Command line::

    python3 torch-ext/hydra/evidence.py digest          # print the tree's digest
    python3 torch-ext/hydra/evidence.py check FILE...   # exit 1 if any is stale
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

__all__ = ["source_digest", "source_files", "device_info", "write_evidence", "read_evidence",
           "is_stale", "DIGEST_DIRS", "CORE_KEYS"]

# The directories whose files the digest covers, relative to the repository root.
DIGEST_DIRS = ("csrc", "torch-ext")

# Keys every evidence file has, in the order they are written.
CORE_KEYS = ("kind", "device", "torch", "cuda", "command", "source_digest", "created")

PathLike = Union[str, "os.PathLike[str]"]


def _default_root() -> Path:
    # torch-ext/hydra/evidence.py -> the checkout's root.
    return Path(__file__).resolve().parents[2]


def _skipped(rel_parts: Sequence[str]) -> bool:
    return "__pycache__" in rel_parts or rel_parts[-1].endswith(".pyc")


def source_files(root: Optional[PathLike] = None) -> list:
    """The files ``source_digest`` covers, as sorted POSIX paths relative to ``root``.

    Every regular file under ``csrc/`` and ``torch-ext/`` (recursively, following
    no symlinked directories), except anything inside a ``__pycache__`` directory
    and ``*.pyc`` files. Sorted by the UTF-8 bytes of the relative path.
    """
    root = Path(root) if root is not None else _default_root()
    missing = [d for d in DIGEST_DIRS if not (root / d).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"hydra.evidence: {root} is not a hydra source checkout (no {', '.join(missing)}/); "
            "the source digest is only defined for a checkout")
    rels = []
    for top in DIGEST_DIRS:
        for dirpath, dirnames, filenames in os.walk(root / top):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for name in filenames:
                path = Path(dirpath) / name
                rel = path.relative_to(root)
                if _skipped(rel.parts) or not path.is_file():
                    continue
                rels.append(rel.as_posix())
    return sorted(rels, key=lambda s: s.encode("utf-8"))


def source_digest(root: Optional[PathLike] = None) -> str:
    """The digest of the kernel sources: ``"sha256:<64 hex digits>"``.

    Parameters
    ----------
    root : path, optional
        The repository root. Defaults to the checkout holding this file
        (``Path(__file__).parents[2]``).

    Notes
    -----
    The algorithm, so that anyone can recompute it without this module:

    1. List every regular file under ``<root>/csrc/`` and ``<root>/torch-ext/``,
       recursively, skipping ``__pycache__`` directories and ``*.pyc`` files.
    2. Take each file's path relative to ``root`` with ``/`` separators, and sort
       the list by the UTF-8 bytes of those paths.
    3. Feed one SHA-256 hasher, for each file in that order:
       the path's UTF-8 bytes, one NUL byte (``0x00``), the file size in bytes as
       ASCII decimal, one NUL byte, then the file's raw bytes.
    4. The digest is ``"sha256:"`` followed by the lowercase hex digest.

    The NUL separators and the length prefix make the encoding unambiguous: no
    two different trees feed the hasher the same byte stream.

    Examples
    --------
    >>> source_digest()                      # doctest: +SKIP
    'sha256:3f0c...'
    """
    root = Path(root) if root is not None else _default_root()
    h = hashlib.sha256()
    for rel in source_files(root):
        data = (root / rel).read_bytes()
        h.update(rel.encode("utf-8"))
        h.update(b"\0")
        h.update(str(len(data)).encode("ascii"))
        h.update(b"\0")
        h.update(data)
    return "sha256:" + h.hexdigest()


def device_info() -> dict:
    """The device, torch and CUDA versions to stamp on evidence.

    Returns
    -------
    dict
        ``{"device": str, "torch": str, "cuda": str | None}``. ``device`` is the
        current CUDA device's name, or ``"cpu"`` when there is no usable GPU;
        ``cuda`` is ``torch.version.cuda`` (``None`` for a CPU-only torch).
    """
    import torch

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(torch.cuda.current_device())
    else:
        device = "cpu"
    return {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda}


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _command_str(command: Union[str, Iterable[str]]) -> str:
    if isinstance(command, str):
        return command
    return shlex.join(str(c) for c in command)


def write_evidence(path: PathLike, *, kind: str, command: Union[str, Sequence[str]],
                   summary: Optional[Mapping[str, Any]] = None,
                   rows: Optional[Sequence[Mapping[str, Any]]] = None,
                   extra: Optional[Mapping[str, Any]] = None,
                   root: Optional[PathLike] = None,
                   device: Optional[Mapping[str, Any]] = None) -> dict:
    """Write one evidence file in the common shape of SPEC section 6.

    Parameters
    ----------
    path : path
        Where to write the JSON; missing parent directories are created. The file
        is written to a temporary name first and then renamed, so a reader never
        sees half of it.
    kind : str
        ``"gpu_tests"``, ``"decode_bench"``, ``"prefill_bench"``, ``"fidelity"``, ...
    command : str or sequence of str
        The command that produced the results (a sequence is shell-quoted).
    summary : mapping, optional
        Test counts, e.g. ``{"passed": 10, "failed": 0, "skipped": 2}``.
    rows : sequence of mappings, optional
        Benchmark rows. At least one of ``summary`` and ``rows`` is required.
    extra : mapping, optional
        Further top-level keys; they may not replace the common ones.
    root : path, optional
        The checkout whose sources are digested (default: this file's checkout).
    device : mapping, optional
        Overrides ``device_info()`` (keys ``device``, ``torch``, ``cuda``).

    Returns
    -------
    dict
        The record as written.

    Examples
    --------
    >>> write_evidence("evidence/decode_bench.json", kind="decode_bench",
    ...                command="python3 benchmarks/benchmark_hydra_decode.py",
    ...                rows=[{"name": "hydra_cached", "B": 1, "T": 131072, "us": 21.5}])
    ...                                     # doctest: +SKIP
    """
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"hydra.evidence: kind must be a non-empty string, got {kind!r}")
    if summary is None and rows is None:
        raise ValueError("hydra.evidence: give summary (test runs) and/or rows (benchmarks)")
    info = dict(device_info() if device is None else device)
    record: dict = {
        "kind": kind,
        "device": info.get("device"),
        "torch": info.get("torch"),
        "cuda": info.get("cuda"),
        "command": _command_str(command),
        "source_digest": source_digest(root),
        "created": _utc_now(),
    }
    if summary is not None:
        record["summary"] = dict(summary)
    if rows is not None:
        record["rows"] = [dict(r) for r in rows]
    for key, value in (extra or {}).items():
        if key in record:
            raise ValueError(f"hydra.evidence: extra key {key!r} would replace a common field")
        record[key] = value

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return record


def read_evidence(path: PathLike) -> dict:
    """Load one evidence file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def is_stale(path: PathLike, root: Optional[PathLike] = None) -> bool:
    """Whether an evidence file no longer describes the sources in the tree.

    True when its ``source_digest`` is missing or differs from
    ``source_digest(root)``.
    """
    recorded = read_evidence(path).get("source_digest")
    return recorded != source_digest(root)


def _main(argv: Sequence[str]) -> int:
    if argv[:1] == ["digest"]:
        print(source_digest())
        return 0
    if argv[:1] == ["check"] and len(argv) > 1:
        current = source_digest()
        stale = 0
        for name in argv[1:]:
            recorded = read_evidence(name).get("source_digest")
            ok = recorded == current
            stale += not ok
            print(f"{'ok   ' if ok else 'STALE'} {name}")
        return 1 if stale else 0
    print(__doc__.split("Command line::", 1)[1].rstrip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
