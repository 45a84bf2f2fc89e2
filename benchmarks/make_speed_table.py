"""Build the dispatcher's speed table (``vitkern/data/speed_table.json``) from GPU benchmark results.

    VITKERN_SPEED_TABLE=0 bash scripts/gpu_suite.sh     # GPU machine; table off, so the `vitkern` rows run Triton
    python -m benchmarks.make_speed_table benchmarks/results/<date>_<device>_<commit>   # review the diff, commit

Per op bench (``bench_attention`` -> op ``attention``, ``bench_window_attention`` -> ``window_attention``,
``bench_layernorm`` -> ``layer_norm``, ``bench_ln_mlp`` -> ``ln_mlp``, ``bench_linear_residual`` -> ``linear_residual``,
``bench_patch_embed`` -> ``patch_embed``) the
``vitkern-cuda`` rows are paired with the ``vitkern`` rows whose recorded backend is Triton (same case, dtype,
direction; both ``status == "ok"``, i.e. timed and correct). Each case maps to the dispatcher's shape class through
:func:`vitkern.backends.speed_table.shape_class`, the function the dispatcher applies to a call's Problem.

A class gets an entry only when one backend wins at every measured case of the class by at least ``--margin``
(default 3%: a smaller win is within what run-to-run noise can reverse, and the class would flip between
regenerations) and, where the rows have them, with non-overlapping p20-p80 spreads. CUDA wins and Triton wins
are both written (Triton's lets ``vitkern.explain`` cite the measurement); ties are left out (rank order).

Directions: ``fwd`` entries come from the ``fwd`` rows. ``bwd`` entries only for benches whose CUDA provider runs the
CUDA backward too (LayerNorm), from ``(fwd+bwd) - fwd`` of each provider; the other CUDA backends are forward-only
(their ``fwd+bwd`` rows run the Triton backward), so they get none.

Only GPU-timed results with Triton autotuned are accepted: a file whose metadata says smoke or VITKERN_AUTOTUNE=0,
or with a row timed by the CPU smoke timer, makes the script refuse (exit 2). Later files (``meta.date_utc``) replace
earlier measurements of the same class; ``--merge`` keeps the current table's entries for classes the given results
do not measure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from vitkern.bench.harness import CPU_TIMER, FWD, FWD_BWD, OK
from vitkern.bench.harness import SCHEMA as BENCH_SCHEMA
from vitkern.backends import speed_table as st

REPO_ROOT = Path(__file__).resolve().parent.parent
MARGIN = 0.03
CUDA, TRITON = "cuda", "triton"
ABOUT = ("Measured winner (CUDA C++ vs Triton) per op, direction, GPU model, dtype and shape class; read by "
         "vitkern/backends/speed_table.py. Written by benchmarks/make_speed_table.py from GPU benchmark results "
         "(README.md, 'Backends and dispatch'); do not edit by hand. No entry: rank order (Triton before CUDA).")


def _square(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, float)) else (int(v[0]), int(v[1]))


@dataclasses.dataclass(frozen=True)
class BenchMap:
    """How one bench's rows map to the table: its op, (cuda provider, triton provider, fixed dims) pairs, and the
    shape-class dims of a case (params + the Triton row) for :func:`speed_table.shape_class`."""

    op: str
    pairs: tuple[tuple[str, str, Mapping[str, Any]], ...]
    dims: Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, Any]]
    cuda_backward: bool = False  # the CUDA provider's fwd+bwd runs a CUDA backward: derive bwd entries


BENCHES: dict[str, BenchMap] = {
    "attention": BenchMap("attention", (("vitkern-cuda", "vitkern", {}),),
                          lambda p, row: {"head_dim": p["D"], "seq": p["N"]}),
    "window_attention": BenchMap("window_attention", (("vitkern-cuda", "vitkern", {}),),
                                 lambda p, row: {"window_tokens": math.prod(_square(p["ws"])),
                                                 "head_dim": p["D"]}),
    "layernorm": BenchMap("layer_norm", (("vitkern-cuda", "vitkern", {"residual": False}),
                                         ("vitkern-cuda-residual", "vitkern-residual", {"residual": True})),
                          lambda p, row: {"width": p["N"]}, cuda_backward=True),
    "ln_mlp": BenchMap("ln_mlp", (("vitkern-cuda", "vitkern", {}),), lambda p, row: {"width": p["D"]}),
    "linear_residual": BenchMap("linear_residual", (("vitkern-cuda", "vitkern", {}),), lambda p, row: {"width": p["D"]}),
    "patch_embed": BenchMap("patch_embed", (("vitkern-cuda", "vitkern", {}),),
                            lambda p, row: {"patch": st.patch_dim(*_square(p["p"])), "width": p["D"]}),
}


class RefusedResults(ValueError):
    """Results that are not GPU measurements (CPU smoke runs)."""


@dataclasses.dataclass(frozen=True)
class Timed:
    ms: float
    p20: float | None = None
    p80: float | None = None


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One case of one class: CUDA's and Triton's time."""

    key: tuple[str, str, str, str, str]  # (op, direction, device key, dtype, shape class), as speed_table.Entry.key
    case: str
    cuda: Timed
    triton: Timed


def _beats(w: Timed, l: Timed, margin: float) -> bool:
    spread_ok = w.p80 is None or l.p20 is None or w.p80 < l.p20
    return w.ms * (1.0 + margin) <= l.ms and spread_ok


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def read_results(paths: Iterable[str | Path], notes: list[str]) -> list[tuple[Path, dict[str, Any]]]:
    """Result JSON files (directories: every ``*.json`` in them) of mapped benches, oldest first; refuses smoke."""
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.json")) if p.is_dir() else [p]
    docs = []
    for f in files:
        doc = json.loads(f.read_text())
        if not isinstance(doc, dict) or doc.get("schema") != BENCH_SCHEMA:
            notes.append(f"{_rel(f)}: not a benchmark result file ({BENCH_SCHEMA}), ignored")
            continue
        if doc.get("bench") not in BENCHES:
            notes.append(f"{_rel(f)}: bench {doc.get('bench')!r} has no CUDA-vs-Triton pairing, ignored")
            continue
        meta = doc.get("meta") or {}
        smoke = [r for r in doc.get("rows", ()) if r.get("timer") == CPU_TIMER]
        if meta.get("smoke") or smoke or str(meta.get("device", "cpu")).lower().startswith("cpu"):
            raise RefusedResults(f"{_rel(f)}: CPU smoke results ({meta.get('timer') or CPU_TIMER}), not measurements; "
                                 "the speed table takes GPU-timed results only")
        if "VITKERN_AUTOTUNE=0" in str(meta.get("triton_configs", "")):
            raise RefusedResults(f"{_rel(f)}: measured with VITKERN_AUTOTUNE=0 (untuned Triton configs): CUDA vs "
                                 "Triton must be compared with Triton autotuned")
        docs.append((f, doc))
    return sorted(docs, key=lambda fd: str((fd[1].get("meta") or {}).get("date_utc", "")))


def measurements(doc: Mapping[str, Any], notes: list[str], where: str = "") -> list[Measurement]:
    """Pair one result file's CUDA and Triton rows into per-case measurements (module docstring)."""
    bench = BENCHES[doc["bench"]]
    device = st.device_key(str(doc["meta"]["device"]))
    rows: dict[tuple[str, str, str, str], Mapping[str, Any]] = {}
    for r in doc["rows"]:
        rows[(r["provider"], json.dumps(r["params"], sort_keys=True), r["dtype"], r["direction"])] = r
    out: list[Measurement] = []
    for cuda_p, triton_p, fixed in bench.pairs:
        for (prov, params_s, dtype, direction), crow in rows.items():
            if prov != cuda_p or direction != FWD:
                continue
            trow = rows.get((triton_p, params_s, dtype, direction))
            label = f"{crow['case']} {dtype}"
            pair = _usable(crow, trow, label, where, notes)
            if pair is None:
                continue
            try:
                cls = st.shape_class(bench.op, {**bench.dims(crow["params"], trow), **fixed})
            except (KeyError, ValueError, TypeError) as e:
                notes.append(f"{where}{label}: no shape class ({type(e).__name__}: {e}), skipped")
                continue
            out.append(Measurement((bench.op, "fwd", device, dtype, cls), label, *pair))
            fb_rows = rows.get((cuda_p, params_s, dtype, FWD_BWD)), rows.get((triton_p, params_s, dtype, FWD_BWD))
            if bench.cuda_backward and fb_rows != (None, None):  # bwd = (fwd+bwd) - fwd, per provider, same case
                both = _usable(*fb_rows, label + " fwd+bwd", where, notes)
                if both is not None:
                    c, t = both[0].ms - pair[0].ms, both[1].ms - pair[1].ms
                    if c > 0 and t > 0:
                        out.append(Measurement((bench.op, "bwd", device, dtype, cls), label + " (fwd+bwd - fwd)",
                                               Timed(c), Timed(t)))
                    else:
                        notes.append(f"{where}{label}: fwd+bwd not slower than fwd ({c:.4f} / {t:.4f} ms), no bwd")
    return out


def _usable(crow: Mapping[str, Any] | None, trow: Mapping[str, Any] | None, label: str, where: str,
            notes: list[str]) -> tuple[Timed, Timed] | None:
    if crow is None or trow is None:
        notes.append(f"{where}{label}: no {'CUDA' if crow is None else 'Triton'} row, skipped")
        return None
    for r, want in ((crow, CUDA), (trow, TRITON)):
        backend = str((r.get("extra") or {}).get("backend", ""))
        if not backend.startswith(want):
            hint = " (run the benches with VITKERN_SPEED_TABLE=0)" if want == TRITON else ""
            notes.append(f"{where}{label}: {r['provider']} ran backend {backend or '?'!r}, not {want}{hint}; skipped")
            return None
        if r.get("status") != OK or not r.get("median_ms"):
            notes.append(f"{where}{label}: {r['provider']} {r.get('status')}: {r.get('error') or 'no time'}; skipped")
            return None
    return tuple(Timed(float(r["median_ms"]), r.get("p20_ms"), r.get("p80_ms")) for r in (crow, trow))  # type: ignore


def winner(ms: Sequence[Measurement], margin: float) -> tuple[str, str, float] | None:
    """(winner, loser, geometric-mean speedup) if one backend beats the other at every case by the margin."""
    for w, l in ((CUDA, TRITON), (TRITON, CUDA)):
        if all(_beats(getattr(m, w), getattr(m, l), margin) for m in ms):
            speedup = math.exp(sum(math.log(getattr(m, l).ms / getattr(m, w).ms) for m in ms) / len(ms))
            return w, l, speedup
    return None


def build(paths: Iterable[str | Path], margin: float = MARGIN, base: st.Table | None = None,
          notes: list[str] | None = None) -> dict[str, Any]:
    """The table document for ``paths`` (``base``: entries kept where the results measure nothing new)."""
    notes = [] if notes is None else notes
    result: dict[tuple[str, ...], st.Entry | None] = dict(base.entries) if base is not None else {}
    sources = list(base.doc.get("sources", ())) if base is not None else []
    for path, doc in read_results(paths, notes):
        meta, rel = doc["meta"], _rel(path)
        by_class: dict[tuple[str, str, str, str, str], list[Measurement]] = {}
        for m in measurements(doc, notes, where=f"{rel}: "):
            by_class.setdefault(m.key, []).append(m)
        source = {"results": rel, "commit": meta.get("git_commit"), "dirty": meta.get("git_dirty"),
                  "date_utc": meta.get("date_utc")}
        for key, ms in sorted(by_class.items()):
            if key in result and result[key] is not None:
                notes.append(f"{rel}: {key} re-measured, replaces the older entry")
            won = winner(ms, margin)
            result[key] = None if won is None else st.Entry(
                *key, backend=won[0], over=won[1], speedup=won[2], device_name=str(meta["device"]), source=source,
                cases={m.case: {f"{CUDA}_ms": round(m.cuda.ms, 5), f"{TRITON}_ms": round(m.triton.ms, 5)} for m in ms},
            )
            if won is None:
                notes.append(f"{rel}: {key}: no backend wins every case by {margin:.0%} with separate p20-p80 "
                             "spreads, no entry (rank order)")
        if by_class:
            sources.append(source)
    entries = sorted((e for e in result.values() if e is not None), key=lambda e: e.key)
    return table_doc(entries, margin, sources)


def table_doc(entries: Sequence[st.Entry], margin: float = MARGIN, sources: Sequence[Any] = ()) -> dict[str, Any]:
    return {"schema": st.SCHEMA, "about": ABOUT, "margin": margin, "sources": list(sources),
            "entries": [e.to_json() for e in entries]}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.make_speed_table", description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="result directories (benchmarks/results/<dir>) or <bench>.json files")
    ap.add_argument("--out", default=str(st.DEFAULT_PATH), help="table to write (default: the packaged one)")
    ap.add_argument("--margin", type=float, default=MARGIN, help="least relative win per case (default 0.03)")
    ap.add_argument("--merge", action="store_true", help="keep --out's entries for classes not measured here")
    ap.add_argument("--dry-run", action="store_true", help="print the table instead of writing it")
    args = ap.parse_args(argv)
    notes: list[str] = []
    try:
        base = st.load(args.out) if args.merge and Path(args.out).exists() else None
        doc = build(args.results, args.margin, base, notes)
    except RefusedResults as e:
        print(f"make_speed_table: refusing: {e}", file=sys.stderr)
        return 2
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    text = json.dumps(doc, indent=1) + "\n"
    for e in doc["entries"]:
        print(f"{e['op']} {e['direction']} {e['device']} {e['dtype']} {e['shape_class']}: {e['backend']} "
              f"{e['speedup']:.2f}x over {e['over']}")
    if args.dry_run:
        print(text)
    else:
        Path(args.out).write_text(text)
        print(f"wrote {len(doc['entries'])} entries to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
