"""``vitkern bench``: one model, eager vs torch.compile vs vitkern vs vitkern+compile, at one or more batch sizes.

Prints a table (ms, img/s, speedup vs eager and vs compile, peak memory), writes ``bench.json`` / ``bench.csv``
(the benchmark harness's format and metadata), ``throughput.svg`` (always; written here, no dependency) and
``throughput.png`` (matplotlib, else Pillow) into a results folder. The measuring is the end-to-end model
benchmark's (:mod:`vitkern.bench.models`: providers, training step, peak memory) on the shared harness
(:mod:`vitkern.bench.harness`: ``triton.testing.do_bench`` medians with CUDA events); both ship in the package, so
an installed vitkern needs no source checkout. Results go to the harness's ``RESULTS_DIR`` (``benchmarks/results/cli``
in a checkout, else ``./vitkern-results/cli``).

Performance numbers come only from GPU measurements: without CUDA it refuses, unless ``--allow-cpu`` asks for a
smoke run (wall clock, a few iterations, results marked "cpu smoke, not a measurement", written to a temp folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import math
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

CPU_REFUSAL = ("vitkern bench: no CUDA GPU visible; performance numbers come only from GPU measurements, so nothing "
               "is timed on the CPU. (--allow-cpu runs a smoke test of the code path: not a measurement.)")
SMOKE_NOTE = "cpu smoke, not a measurement"
COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")


def add_parser(sub: Any) -> None:
    b = sub.add_parser("bench", help="time a model: eager vs torch.compile vs vitkern vs vitkern+compile (GPU)")
    b.add_argument("--model", required=True, help="timm name, torchvision:NAME, hf:NAME or reference:NAME")
    b.add_argument("--batch", default="256", help="batch size(s), comma-separated, e.g. 64,128,256")
    b.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="the model's dtype (default bf16)")
    b.add_argument("--train", action="store_true", help="time a training step (fwd + bwd + AdamW) instead of inference")
    b.add_argument("--amp", action="store_true", help="time a training step of the fp32 model under bf16 autocast "
                   "(AMP training; implies --train, and --dtype fp32)")
    b.add_argument("--modes", default="eager,compile,vitkern,vitkern+compile", help="providers, comma-separated")
    b.add_argument("--compile-mode", default="max-autotune",
                   help="torch.compile mode (e.g. default, max-autotune-no-cudagraphs)")
    b.add_argument("--img-size", type=int, default=None, help="input size (default: the model's own)")
    b.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="constructor / config override, repeatable (e.g. depth=2)")
    b.add_argument("--out", type=Path, default=None,
                   help="results folder (default: benchmarks/results/cli/<date>_<device>_<commit> in a source checkout, "
                        "else ./vitkern-results/cli/...)")
    b.add_argument("--warmup-ms", type=float, default=200.0, help="do_bench warm-up time per measurement")
    b.add_argument("--rep-ms", type=float, default=1000.0, help="do_bench timing window per measurement (the "
                   "median of the reps in it is reported)")
    b.add_argument("--allow-cpu", action="store_true",
                   help="without a GPU: smoke-run the code path (not a measurement)")


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"{what} must be positive integers, comma-separated (e.g. 64,128,256), got {text!r}")
    return values


def _progress(total: int, desc: str) -> Any:
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="run", file=sys.stderr, leave=True)
    except ImportError:
        return _Lines(total, desc)


class _Lines:
    """Plain progress lines when tqdm is absent."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.n, self.desc = total, 0, desc

    def set_postfix_str(self, s: str) -> None:
        print(f"[{self.n}/{self.total}] {self.desc}: {s}", file=sys.stderr, flush=True)

    def update(self, k: int) -> None:
        self.n += k

    def close(self) -> None:
        print(f"[{self.n}/{self.total}] {self.desc}: done", file=sys.stderr, flush=True)


def cmd_bench(args: argparse.Namespace) -> int:
    # here, not at the top: `vitkern --help` / info / check import this module for its parser only
    from vitkern import models
    from vitkern.bench import harness
    from vitkern.bench import models as bm

    smoke = not torch.cuda.is_available()
    if smoke and not args.allow_cpu:
        print(CPU_REFUSAL, file=sys.stderr)
        return 2
    try:
        batches = _ints(args.batch, "--batch")
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        kwargs = models.parse_kwargs(args.model_arg)
        models.check_name(args.model)
        unknown = [m for m in modes if m not in bm.MODES]
        if unknown or not modes:
            raise ValueError(f"--modes must be a comma-separated subset of {', '.join(bm.MODES)}, got {args.modes!r}")
        if args.amp and args.dtype not in (None, "fp32"):
            raise ValueError(f"--amp times the fp32 model under bf16 autocast; --dtype {args.dtype} contradicts it")
        args.dtype = "fp32" if args.amp else args.dtype or "bf16"
    except (ValueError, RuntimeError) as exc:
        print(f"vitkern bench: {exc}", file=sys.stderr)
        return 2
    from vitkern.cli import DTYPES

    device = torch.device("cpu" if smoke else "cuda")
    task = bm.TRAIN_AMP if args.amp else bm.TRAIN if args.train else bm.INFER
    peaks = None if smoke else harness.measure_peaks(device)
    meta = harness.collect_metadata(device, peaks)
    meta["cli"] = {"model": args.model, "batches": batches, "dtype": args.dtype, "task": task, "modes": modes,
                   "compile_mode": args.compile_mode, "img_size": args.img_size, "model_args": kwargs}
    if smoke:
        meta["note"] = SMOKE_NOTE
        print(f"*** {SMOKE_NOTE}: CPU wall clock, a few iterations; compile modes are skipped ***")
    out = Path(args.out) if args.out else _default_out(meta, smoke)
    if smoke and harness.is_inside(out, harness.RESULTS_DIR):
        print(f"vitkern bench: refusing to write CPU smoke results into {harness.RESULTS_DIR}", file=sys.stderr)
        return 2
    cases = [bm.entry_case(bm.Entry(args.model, b, task), DTYPES[args.dtype], args.img_size, kwargs) for b in batches]
    ctx = harness.Context(device=device, peaks=peaks, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                          budget_s=float("inf"), log=lambda s: None)
    print(f"vitkern bench: {args.model} {task} {args.dtype} batch {','.join(map(str, batches))} on "
          f"{meta['device']}; modes {', '.join(modes)} (compile mode {args.compile_mode})")
    bar = _progress(len(cases) * len(modes), f"{args.model} {task}")

    def on_case(rows: list) -> None:
        bar.update(len(modes))
        harness.write_results(out, "bench", rows, dict(meta, partial=True))  # a crash keeps what finished

    try:
        rows = bm.run_cases(ctx, cases, modes, args.compile_mode, on_case=on_case,
                            on_start=lambda case, mode: bar.set_postfix_str(f"B={case.params['B']} {mode}"))
    except harness.CudaContextLost as lost:  # a kernel fault: nothing more can run in this process
        done = (f"the cases finished before it are in {out / 'bench.json'}" if (out / "bench.json").exists()
                else "no case had finished")
        print(f"\nvitkern bench: {lost}; {done}", file=sys.stderr)
        return 1
    finally:
        bar.close()
    written = [*harness.write_results(out, "bench", rows, meta)]
    title = f"{args.model} {task} {args.dtype} on {meta['device']}" + (f" ({SMOKE_NOTE})" if smoke else "")
    written += write_plots(out, rows, title)
    print()
    print(format_rows(rows))
    _print_swaps(rows)
    if smoke:
        print(f"\n{SMOKE_NOTE}: these numbers only show that the code path runs")
    print("\nwrote: " + ", ".join(str(p) for p in written))
    return 1 if any(r.status in ("error", "wrong") for r in rows) else 0


def _default_out(meta: dict, smoke: bool) -> Path:
    from vitkern.bench import harness

    if smoke:
        return Path(tempfile.mkdtemp(prefix="vitkern-bench-smoke-"))
    return harness.default_out_dir(meta, "cli")


def _fmt(v: Any, spec: str, suffix: str = "") -> str:
    return "" if v is None else f"{format(v, spec)}{suffix}"


COLUMNS = ("B", "task", "mode", "ms", "img/s", "vs eager", "vs compile", "peak MiB", "check", "note")


def format_rows(rows: Sequence[Any]) -> str:
    table = [COLUMNS]
    for r in rows:
        check = {"ok": "ok" if r.correct is not False else "WRONG", "wrong": "WRONG", "error": "ERROR",
                 "skipped": "skip"}.get(r.status, r.status)
        if r.status == "ok" and r.correct is None:
            check = "ref" if r.provider == r.baseline else "-"
        note = r.error or ""
        table.append((str(r.params["B"]), r.params["task"], r.provider, _fmt(r.median_ms, ".2f"),
                      _fmt(r.extra.get("img_per_s"), ",.0f"), _fmt(r.speedup, ".2f", "x"),
                      _fmt(r.extra.get("speedup_vs_compile"), ".2f", "x"), _fmt(r.extra.get("peak_mib"), ",.0f"),
                      check, note if len(note) <= 70 else note[:67] + "..."))
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    right = {0, 3, 4, 5, 6, 7}
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _print_swaps(rows: Sequence[Any]) -> None:
    r = next((r for r in rows if "swapped" in r.extra), None)
    if r is None:
        return
    backends = ", ".join(f"{k} x{v}" for k, v in sorted(r.extra.get("backends", {}).items()))
    print(f"\nvitkern.optimize: swapped {r.extra['swapped']} module(s), left {r.extra['left']}; backends: {backends}")
    for why in r.extra.get("left_reasons", []):
        print(f"  left: {why}")


# --------------------------------------------------------------------------------------------------- plots
def series(rows: Sequence[Any]) -> dict[str, list[tuple[int, float]]]:
    """mode -> [(batch, img/s)] of the measured rows, sorted by batch."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r.extra.get("img_per_s"):
            out.setdefault(r.provider, []).append((int(r.params["B"]), float(r.extra["img_per_s"])))
    return {k: sorted(v) for k, v in out.items()}


@dataclasses.dataclass
class _Chart:
    """Geometry shared by the SVG and the PNG: canvas, margins, batch x positions and the 1-2-5 y ticks."""

    data: dict[str, list[tuple[int, float]]]
    W: int = 640
    H: int = 400
    L: int = 70
    R: int = 150
    T: int = 40
    B: int = 50

    def __post_init__(self) -> None:
        self.batches = sorted({b for pts in self.data.values() for b, _ in pts})
        top = max([v for pts in self.data.values() for _, v in pts] or [1.0])
        self.step = next(m * 10 ** e for e in range(-3, 10) for m in (1, 2, 5) if m * 10 ** e * 6 >= top)
        self.ticks = int(math.ceil(top / self.step))
        self.ymax = self.step * self.ticks
        n = max(len(self.batches), 1)
        self.x = {b: self.L + (self.W - self.L - self.R) * (i + 0.5) / n for i, b in enumerate(self.batches)}

    def y(self, v: float) -> float:
        return self.T + (self.H - self.T - self.B) * (1 - v / self.ymax)

    def tick_label(self, i: int) -> str:
        return f"{self.step * i:,.{0 if self.step >= 1 else 3}f}"


def throughput_svg(data: dict[str, list[tuple[int, float]]], title: str) -> str:
    """A small line chart (img/s vs batch size, one line per mode), as SVG text; batches evenly spaced."""
    c = _Chart(data)
    W, H, L, R, T, B, x, y = c.W, c.H, c.L, c.R, c.T, c.B, c.x, c.y
    e = html.escape
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           'font-family="sans-serif" font-size="12">', f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">{e(title)}</text>',
           f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>',
           f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">batch size</text>',
           f'<text x="16" y="{(T + H - B) / 2}" text-anchor="middle" transform="rotate(-90 16 {(T + H - B) / 2})">'
           'images / s</text>']
    for i in range(c.ticks + 1):
        v = c.step * i
        out.append(f'<line x1="{L - 4}" y1="{y(v):.1f}" x2="{W - R}" y2="{y(v):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{L - 8}" y="{y(v) + 4:.1f}" text-anchor="end">{c.tick_label(i)}</text>')
    for b in c.batches:
        out.append(f'<text x="{x[b]:.1f}" y="{H - B + 16}" text-anchor="middle">{b}</text>')
    for k, (mode, pts) in enumerate(data.items()):
        col = COLORS[k % len(COLORS)]
        if len(pts) > 1:
            path = " ".join(f"{x[b]:.1f},{y(v):.1f}" for b, v in pts)
            out.append(f'<polyline points="{path}" fill="none" stroke="{col}" stroke-width="2"/>')
        out += [f'<circle cx="{x[b]:.1f}" cy="{y(v):.1f}" r="4" fill="{col}"><title>{e(mode)} B={b}: {v:,.0f} img/s'
                '</title></circle>' for b, v in pts]
        ly = T + 10 + 20 * k
        out.append(f'<rect x="{W - R + 15}" y="{ly - 9}" width="12" height="12" fill="{col}"/>')
        out.append(f'<text x="{W - R + 32}" y="{ly + 2}">{e(mode)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def throughput_png(data: dict[str, list[tuple[int, float]]], title: str, path: Path) -> bool:
    """The same chart as a PNG drawn with Pillow (a torchvision dependency, so present wherever the models are);
    False when Pillow is missing."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        return False
    c = _Chart(data)
    W, H, L, R, T, B, x, y = c.W, c.H, c.L, c.R, c.T, c.B, c.x, c.y
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((W / 2, 12), title, fill="black", anchor="mt")
    for i in range(c.ticks + 1):
        v = c.step * i
        d.line([(L - 4, y(v)), (W - R, y(v))], fill="#dddddd")
        d.text((L - 8, y(v)), c.tick_label(i), fill="black", anchor="rm")
    d.line([(L, H - B), (W - R, H - B)], fill="black")
    d.line([(L, T), (L, H - B)], fill="black")
    d.text(((L + W - R) / 2, H - 12), "batch size", fill="black", anchor="mm")
    d.text((8, T - 14), "images / s", fill="black", anchor="lm")
    for b in c.batches:
        d.text((x[b], H - B + 10), str(b), fill="black", anchor="mt")
    for k, (mode, pts) in enumerate(data.items()):
        col = COLORS[k % len(COLORS)]
        if len(pts) > 1:
            d.line([(x[b], y(v)) for b, v in pts], fill=col, width=2)
        for b, v in pts:
            d.ellipse([x[b] - 4, y(v) - 4, x[b] + 4, y(v) + 4], fill=col)
        ly = T + 10 + 20 * k
        d.rectangle([W - R + 15, ly - 9, W - R + 27, ly + 3], fill=col)
        d.text((W - R + 32, ly - 3), mode, fill="black", anchor="lm")
    img.save(path)
    return True


def write_plots(out: Path, rows: Sequence[Any], title: str) -> list[Path]:
    """throughput.svg, and throughput.png (matplotlib when importable, else Pillow)."""
    data = series(rows)
    svg = Path(out) / "throughput.svg"
    svg.write_text(throughput_svg(data, title))
    png = Path(out) / "throughput.png"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [svg] + ([png] if throughput_png(data, title, png) else [])
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for mode, pts in data.items():
        ax.plot([b for b, _ in pts], [v for _, v in pts], marker="o", label=mode)
    ax.set(xlabel="batch size", ylabel="images / s", title=title)
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return [svg, png]

