"""The measured speed table: which backend is faster for a shape class on a GPU model (xformers/NATTEN-style).

The dispatcher never times anything inside a user call. A GPU session benchmarks CUDA C++ against Triton
(``benchmarks/bench_*.py``, the ``vitkern-cuda`` and ``vitkern`` rows), ``benchmarks/make_speed_table.py`` turns
the result files into ``vitkern/data/speed_table.json`` (committed, reviewable), and :func:`lookup` finds the entry
for a call: the dispatcher then tries that backend first, and ``vitkern.explain`` cites the measurement. No entry
(or no table) leaves the default rank order (Triton before CUDA) unchanged.

An entry's key is (op, direction ``fwd``/``bwd``, device key, dtype, shape class):

- device key: :func:`device_key` of ``torch.cuda.get_device_name``: the first word with a digit after dropping the
  vendor/brand words, e.g. ``"NVIDIA H100 80GB HBM3"`` -> ``"H100"``, ``"NVIDIA A100-SXM4-80GB"`` -> ``"A100"``
  (so H100 SXM and PCIe share entries; an H200 needs its own measurements).
- shape class (:func:`shape_class`): the few dims that decide which kernel is faster, from the dispatch Problem
  (:data:`PROBLEM_DIMS`) and from a benchmark case's params (``benchmarks/make_speed_table.py``) through the same
  function. Batch / row count is not part of it: the benches measure at ViT batch sizes.

  ============================  ==============================================================================
  attention                     ``head_dim=D,seq<=B``: B = the query length rounded up to a power of two (>= 64)
  window_attention              ``window_tokens=Wh*Ww,head_dim=D``
  layer_norm                    ``width=N`` (+ ``,residual`` for the fused residual add)
  ln_mlp, ln_linear             ``width=D`` (the LayerNorm / input width)
  linear_residual               ``width=K`` (the input width of the GEMM)
  patch_embed                   ``patch=p,width=D`` (``patch=ph x pw`` written ``16x8`` when not square)
  ============================  ==============================================================================

``VITKERN_SPEED_TABLE``: unset or empty = the packaged table; ``0`` / ``off`` = no table (rank order only); any
other value = the path of a table file. Each table is read once per process (see :func:`reset`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

if TYPE_CHECKING:
    from vitkern.dispatch import Problem

log = logging.getLogger("vitkern.dispatch")

SCHEMA = "vitkern-speed-table/1"
ENV_SPEED_TABLE = "VITKERN_SPEED_TABLE"
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "data" / "speed_table.json"
DISABLED = ("0", "off", "false", "no", "none")
DIRECTIONS = {"forward": "fwd", "backward": "bwd"}  # dispatch.FORWARD / BACKWARD -> the table's (and benches') names
SEQ_BUCKET_MIN = 64
ENTRY_FIELDS = ("op", "direction", "device", "dtype", "shape_class", "backend", "over", "speedup")

# op -> the dims of its shape class, in the order they are written (module docstring)
CLASS_KEYS: dict[str, tuple[str, ...]] = {
    "attention": ("head_dim", "seq"),
    "window_attention": ("window_tokens", "head_dim"),
    "layer_norm": ("width", "residual"),
    "ln_mlp": ("width",),
    "ln_linear": ("width",),
    "linear_residual": ("width",),
    "patch_embed": ("patch", "width"),
}


def patch_dim(ph: int, pw: int) -> int | str:
    return ph if ph == pw else f"{ph}x{pw}"


# op -> dims of a dispatch Problem (the shapes/attrs each op's ``problem(...)`` builds in vitkern/ops/*.py)
PROBLEM_DIMS: dict[str, Callable[["Problem"], dict[str, Any]]] = {
    "attention": lambda p: {"head_dim": p.shape("q")[3], "seq": p.shape("q")[2]},  # q: [B, H, N, D] view
    "window_attention": lambda p: {"window_tokens": math.prod(p.attr("window")), "head_dim": p.attr("head_dim")},
    "layer_norm": lambda p: {"width": p.shape("x")[-1], "residual": "residual" in dict(p.shapes)},
    "ln_mlp": lambda p: {"width": p.shape("x")[-1]},
    "ln_linear": lambda p: {"width": p.shape("x")[-1]},
    "linear_residual": lambda p: {"width": p.shape("x")[-1]},  # x: [M, K], the proj's input width
    "patch_embed": lambda p: {"patch": patch_dim(*p.shape("weight")[2:]), "width": p.shape("weight")[0]},  # [D, C, p, p]
}


def seq_bucket(n: int) -> int:
    """Query length -> the power of two at or above it (at least SEQ_BUCKET_MIN): 50 -> 64, 197 -> 256, 577 -> 1024."""
    b = SEQ_BUCKET_MIN
    while b < n:
        b *= 2
    return b


def shape_class(op: str, dims: Mapping[str, Any]) -> str:
    """The shape class string of ``op`` for ``dims`` (from a Problem or a benchmark case): bucketing happens here only,
    so the table's writer and the dispatcher cannot disagree."""
    keys = CLASS_KEYS[op]
    if set(dims) != set(keys):
        raise ValueError(f"shape_class({op!r}): dims {sorted(dims)} != {sorted(keys)}")
    parts = []
    for k in keys:
        v = dims[k]
        if k == "seq":
            parts.append(f"seq<={seq_bucket(int(v))}")
        elif isinstance(v, bool):
            parts += [k] if v else []  # flags: present or absent
        else:
            parts.append(f"{k}={v}")
    return ",".join(parts)


def problem_class(problem: "Problem") -> str | None:
    """The shape class of a dispatch Problem; None for ops without a class (no table entries apply)."""
    dims = PROBLEM_DIMS.get(problem.op)
    return shape_class(problem.op, dims(problem)) if dims is not None else None


_BRAND_WORDS = {"NVIDIA", "TESLA", "GEFORCE", "QUADRO"}


def device_key(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'H100', 'NVIDIA H200' -> 'H200', 'NVIDIA A100-SXM4-80GB' -> 'A100'."""
    words = [w for w in re.split(r"[\s_\-]+", name.upper()) if w and w not in _BRAND_WORDS]
    return next((w for w in words if re.search(r"\d", w)), " ".join(words))


def device_name(index: int) -> str:
    """torch.cuda.get_device_name(index), "" when there is no such device (then no entry matches)."""
    return _device_name(index)


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    try:
        return torch.cuda.get_device_name(index)
    except Exception:  # noqa: BLE001 - no CUDA / bad index: the table simply does not apply
        return ""


def dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).replace("torch.", "")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One measured winner. ``speedup``: geometric mean over the class's measured cases of loser ms / winner ms."""

    op: str
    direction: str  # fwd | bwd
    device: str  # device_key
    dtype: str  # "bfloat16"
    shape_class: str
    backend: str  # the winner
    over: str  # the loser
    speedup: float
    device_name: str = ""  # as measured, e.g. "NVIDIA H100 80GB HBM3"
    source: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)
    cases: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return self.op, self.direction, self.device, self.dtype, self.shape_class

    def reason(self) -> str:
        """What the dispatcher's Choice says when it follows this entry."""
        src = self.source
        commit = str(src.get("commit") or "unknown")[:12] + ("-dirty" if src.get("dirty") else "")
        return (f"measured faster for this shape class ({self.shape_class}) on {self.device_name or self.device} "
                f"({self.speedup:.2f}x over {self.over}; {src.get('results', '?')}, commit {commit})")

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["speedup"] = round(self.speedup, 4)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Entry":
        missing = [f for f in ENTRY_FIELDS if f not in d]
        if missing:
            raise ValueError(f"speed table entry {dict(d)} lacks {missing}")
        known = {f.name for f in dataclasses.fields(cls)}
        e = cls(**{k: v for k, v in d.items() if k in known})
        if e.direction not in DIRECTIONS.values() or not e.speedup >= 1.0 or e.backend == e.over:
            raise ValueError(f"speed table entry {e.key}: bad direction/speedup/backend ({e.direction}, {e.speedup}, "
                             f"{e.backend} over {e.over})")
        return e


@dataclasses.dataclass(eq=False)  # identity hash: part of the dispatcher's choice-cache key
class Table:
    path: str
    entries: dict[tuple[str, str, str, str, str], Entry]
    doc: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def load(path: str | Path) -> Table:
    """Read and validate a table file (ValueError if malformed, OSError if unreadable)."""
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a speed table (schema {doc.get('schema') if isinstance(doc, dict) else None!r}"
                         f", expected {SCHEMA!r})")
    entries: dict[tuple[str, str, str, str, str], Entry] = {}
    for d in doc.get("entries") or ():
        e = Entry.from_json(d)
        if e.key in entries:
            raise ValueError(f"{path}: duplicate entry {e.key}")
        entries[e.key] = e
    return Table(str(path), entries, doc)


EMPTY = Table("(none)", {})
_TABLES: dict[str, Table] = {}


def _load_spec(spec: str) -> Table:
    if spec.lower() in DISABLED:
        return EMPTY
    path = Path(spec) if spec else DEFAULT_PATH
    if not spec and not path.exists():
        return EMPTY  # a build without the data file behaves as before the table existed
    try:
        return load(path)
    except (OSError, ValueError) as e:  # never fail a user call over the table: warn once, dispatch by rank
        log.warning("vitkern speed table %s ignored (dispatch uses the rank order): %s", path, e)
        return EMPTY


def active() -> Table:
    """The table ``$VITKERN_SPEED_TABLE`` selects, loaded on first use (one dict lookup afterwards)."""
    spec = os.environ.get(ENV_SPEED_TABLE, "").strip()
    table = _TABLES.get(spec)
    if table is None:
        table = _TABLES[spec] = _load_spec(spec)
    return table


def reset() -> None:
    """Forget loaded tables, device names and the dispatcher's cached choices (after editing a table file)."""
    from vitkern import dispatch

    _TABLES.clear()
    _device_name.cache_clear()
    dispatch._choice_cache.clear()


def lookup(problem: "Problem", table: Table | None = None) -> Entry | None:
    """The measured winner for ``problem`` on its CUDA device, or None (not CUDA, no table, no entry)."""
    table = active() if table is None else table
    if not table.entries or problem.device != "cuda":
        return None
    cls = problem_class(problem)
    if cls is None:
        return None
    device = device_key(device_name(problem.attr("device_index") or 0))
    key = (problem.op, DIRECTIONS.get(problem.direction, problem.direction), device, dtype_name(problem.dtype), cls)
    return table.entries.get(key)
