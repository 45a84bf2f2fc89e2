"""The shared benchmark harness every ``benchmarks/bench_*.py`` module and ``vitkern bench`` use.

It lives in the package (not in ``benchmarks/``) so that ``vitkern bench`` works from an installed vitkern too.

Why one harness: every kernel issue must report numbers the same way (same timer, same L2 policy, same peaks,
same correctness gate, same files), so results from different sessions and kernels stay comparable.

A benchmark is a :class:`Benchmark`: a list of :class:`Case` (shape params, dtype, direction ``fwd`` or
``fwd+bwd``), several named :class:`Provider` run side by side on the same inputs, a bytes/flops model and a
baseline provider. :func:`run_benchmark` returns one :class:`Row` per (case, provider): timing quantiles, achieved
GB/s and TFLOP/s, % of the peaks measured in the same process, speedup over the baseline measured in the same run,
and the result of a correctness check against the baseline. Nothing a provider does can crash the run: failures
become rows with the error message. The one exception is a failure that leaves the process's CUDA context unusable
(a kernel fault): :class:`CudaContextLost` ends the bench, and ``benchmarks/run_all.py`` reruns it in a fresh
process without that provider.

Without CUDA the same code path runs as a *smoke test*: wall-clock timer, no peaks, rows labelled
``timer=CPU_TIMER``, and :func:`write_results` refuses to put them into :data:`RESULTS_DIR`.

Where results go (:data:`RESULTS_DIR`): ``benchmarks/results/`` of the source checkout when vitkern runs from one
(editable install or ``PYTHONPATH``), else ``./vitkern-results/`` under the current directory.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

_ROOT = Path(__file__).resolve().parents[2]  # vitkern/bench/harness.py -> the directory holding vitkern/
# the source checkout vitkern runs from, or None for an installed package (site-packages has no benchmarks/)
REPO_ROOT: Path | None = _ROOT if (_ROOT / "benchmarks" / "run_all.py").is_file() else None
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results" if REPO_ROOT else Path.cwd() / "vitkern-results"
SCHEMA = "vitkern-bench/1"
GPU_TIMER = "cuda-events (triton.testing.do_bench median, L2 flushed per rep)"
CPU_TIMER = "cpu-wallclock (smoke, not a measurement)"
FWD, FWD_BWD = "fwd", "fwd+bwd"
DIRECTIONS = (FWD, FWD_BWD)
# ||out - ref|| / ||ref|| allowed against the baseline provider. Both sides compute in fp32 internally, so the
# gap is output rounding (bf16 ~4e-3, fp16 ~5e-4 per element) plus reduction order in the weight gradients.
DEFAULT_TOL: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
OK, WRONG, ERROR, SKIPPED = "ok", "wrong", "error", "skipped"

Inputs = Mapping[str, Any]
Forward = Callable[[], Any]  # runs the forward once; returns a Tensor or a tuple of Tensors


# --------------------------------------------------------------------------------------------------- structure


@dataclass(frozen=True)
class Case:
    """One problem: shape parameters (e.g. ``{"M": 50432, "N": 768}``), dtype and direction."""

    params: Mapping[str, Any]
    dtype: torch.dtype
    direction: str = FWD

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"Case.direction must be one of {DIRECTIONS}, got {self.direction!r}")

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.params.items())

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")


@dataclass(frozen=True)
class Provider:
    """One implementation of the benchmarked op.

    ``setup(case, inputs)`` returns a zero-argument callable that runs the forward once on ``inputs`` (all
    one-time work, e.g. building a module, belongs in setup; torch.compile warm-up happens in the correctness
    check, which runs before timing). For ``fwd+bwd`` cases the harness adds the backward itself: random output
    gradients, ``torch.autograd.backward``, gradients of every input with ``requires_grad`` compared and reset.
    """

    name: str
    setup: Callable[[Case, Inputs], Forward]
    baseline: str | None = None  # overrides Benchmark.baseline (e.g. fused residual-LN vs eager residual+LN)
    describe: Callable[[Case, Inputs], Mapping[str, Any]] | None = None  # extra row fields (chosen backend, ...)
    supports: Callable[[Case], str | None] | None = None  # reason it cannot run a case, or None
    smoke: bool = True  # False: skip in CPU smoke mode (torch.compile would spend tens of seconds in a C++ build)
    meta: Mapping[str, Any] = field(default_factory=dict)  # free-form, read by the bytes/flops model


@dataclass(frozen=True)
class Work:
    """What one call must move and compute at the least (each input read once, each output written once)."""

    bytes: float | None = None
    flops: float | None = None


@dataclass
class Benchmark:
    name: str
    cases: Sequence[Case]
    providers: Sequence[Provider]
    make_inputs: Callable[[Case, torch.device], dict[str, Any]]  # never zeros: see benchmarks/README.md
    baseline: str  # provider name the speedups and the correctness check refer to
    model: Callable[[Case, Provider], Work] | None = None
    tol: Mapping[torch.dtype, float] = field(default_factory=lambda: dict(DEFAULT_TOL))


@dataclass(frozen=True)
class Peaks:
    """Ceilings measured on this device in this process (datasheet numbers are only leads)."""

    matmul_tflops: float  # bf16 n x n x n torch.mm, random data
    copy_gbps: float  # device-to-device copy, bytes read + bytes written
    matmul_n: int
    copy_bytes: int  # size of the copied buffer (GB/s counts it twice)
    timer: str = GPU_TIMER


@dataclass
class Row:
    bench: str
    case: str
    params: dict[str, Any]
    dtype: str
    direction: str
    provider: str
    baseline: str
    status: str  # ok | wrong (timed, failed the check) | error | skipped
    error: str | None = None
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    timer: str = GPU_TIMER
    bytes: float | None = None
    flops: float | None = None
    gbps: float | None = None
    tflops: float | None = None
    pct_peak_bw: float | None = None
    pct_peak_flops: float | None = None
    speedup: float | None = None  # baseline median / this median
    correct: bool | None = None  # None: no check (this is the baseline, or the baseline failed)
    max_abs_err: float | None = None
    rel_err: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))


@dataclass
class Context:
    """What a bench module's ``run(ctx)`` gets: the device, the measured peaks and the time budget."""

    device: torch.device
    peaks: Peaks | None = None
    quick: bool = False
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    budget_s: float = 100.0  # the bench's wall-clock budget; cases past it become "skipped" rows
    deadline: float | None = None  # time.monotonic() value; set from budget_s when None
    log: Callable[[str], None] = print
    # provider name -> why it is not run: it lost the CUDA context in an earlier attempt of this bench (run_all)
    excluded: dict[str, str] = field(default_factory=dict)
    # for run_all's watchdog: the rows of the cases done so far, and progress["running"]: the case and provider
    # running now. Mutable, so a copy (dataclasses.replace, as the models bench makes) shares them.
    finished: list[Row] = field(default_factory=list)
    progress: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        if self.deadline is None:
            self.deadline = time.monotonic() + self.budget_s

    @property
    def smoke(self) -> bool:
        return self.device.type != "cuda"

    @property
    def timer(self) -> str:
        return CPU_TIMER if self.smoke else GPU_TIMER


# --------------------------------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    timer: str


def bench(
    fn: Callable[[], Any],
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    grad_to_none: Sequence[Tensor] | None = None,
    device: torch.device | str = "cuda",
) -> Timing:
    """Median, p20 and p80 of ``fn`` in ms.

    CUDA: ``triton.testing.do_bench`` with CUDA events around each rep. It zeroes a 256 MB buffer
    (``clear_cache``) before every timed rep, which evicts the L2 (50-60 MB on H100/H200), so inputs are read
    from HBM each rep and one input set suffices (no rotation needed). ``grad_to_none`` is reset before each rep
    so a fwd+bwd step writes fresh gradients instead of accumulating into old ones (an extra kernel).

    CPU (smoke mode): median of a few ``time.perf_counter`` runs, labelled as not a measurement.
    """
    if torch.device(device).type != "cuda":
        return _wallclock(fn, grad_to_none=grad_to_none)
    from triton.testing import do_bench

    median, p20, p80 = do_bench(
        fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8]
    )
    return Timing(float(median), float(p20), float(p80), GPU_TIMER)


def _wallclock(fn: Callable[[], Any], *, reps: int = 5, grad_to_none: Sequence[Tensor] | None = None) -> Timing:
    fn()
    times = []
    for _ in range(reps):
        for t in grad_to_none or ():
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), CPU_TIMER)


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


_PEAKS: dict[str, Peaks] = {}


def measure_peaks(device: torch.device | str = "cuda", *, matmul_n: int = 8192, copy_bytes: int = 1 << 30) -> Peaks:
    """Measure bf16 matmul TFLOP/s and device-to-device copy GB/s once per process and device.

    Random data on purpose: a matmul on zeros ran 13% faster on an H200 here. The copy counts bytes read plus
    bytes written, which is what the GB/s of every memory-bound benchmark counts too.
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise RuntimeError("peaks are measured on CUDA devices only (CPU smoke mode has none)")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = f"{device}:{matmul_n}:{copy_bytes}"
    if key in _PEAKS:
        return _PEAKS[key]
    a = torch.randn(matmul_n, matmul_n, device=device, dtype=torch.bfloat16)
    b = torch.randn(matmul_n, matmul_n, device=device, dtype=torch.bfloat16)
    c = torch.empty(matmul_n, matmul_n, device=device, dtype=torch.bfloat16)
    mm = bench(lambda: torch.mm(a, b, out=c), warmup_ms=100, rep_ms=300, device=device)
    del a, b, c
    src = torch.randint(1, 255, (copy_bytes,), device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    cp = bench(lambda: dst.copy_(src), warmup_ms=50, rep_ms=200, device=device)
    del src, dst
    torch.cuda.empty_cache()
    peaks = Peaks(
        matmul_tflops=tflops(2.0 * matmul_n**3, mm.median_ms),
        copy_gbps=gbps(2.0 * copy_bytes, cp.median_ms),
        matmul_n=matmul_n,
        copy_bytes=copy_bytes,
    )
    _PEAKS[key] = peaks
    return peaks


def peak_mib(fn: Callable[[], Any]) -> float:
    """Peak CUDA memory of one call of ``fn`` beyond what is allocated before it, in MiB. ``fn`` runs twice and the
    second call is measured, so compile / autotune allocations are excluded."""
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)


def gbps(nbytes: float, ms: float) -> float:
    return nbytes * 1e-9 / (ms * 1e-3)


def tflops(flops: float, ms: float) -> float:
    return flops * 1e-12 / (ms * 1e-3)


def compile_fresh(fn: Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:
    """``torch.compile(fn, **kwargs)`` after ``torch._dynamo.reset()``.

    Why the reset: Dynamo caches per code object, so every shape/dtype/requires_grad of one function adds a
    recompile, and past ``recompile_limit`` (8) it silently falls back to eager, which would be timed as
    "torch.compile". A reset per case gives each case its own freshly compiled static-shape graph.
    """
    import torch._dynamo

    torch._dynamo.reset()
    return torch.compile(fn, **kwargs)


# --------------------------------------------------------------------------------------------------- running


class CudaContextLost(RuntimeError):
    """A provider's failure left this process's CUDA context unusable, so no later row of the process can be
    measured. ``benchmarks/run_all.py`` restarts itself and reruns the bench without ``provider`` (None when the
    failure came outside any provider, e.g. making a case's inputs)."""

    def __init__(self, bench: str, provider: str | None, case: str, error: str, probe: str) -> None:
        self.bench, self.provider, self.case, self.error, self.probe = bench, provider, case, error, probe
        who = f"provider {provider!r}" if provider else "making the inputs"
        super().__init__(f"{bench}: {who} lost the CUDA context at case {case}: {error} (then: {probe})")


def cuda_context_lost() -> str | None:
    """None while CUDA still works in this process; else the error a trivial CUDA call raises
    (:func:`vitkern.testing.cuda_context.context_lost`)."""
    try:
        from vitkern.testing.cuda_context import context_lost
    except Exception:  # noqa: BLE001 - vitkern not importable: nothing vitkern ran can have faulted
        return None
    return context_lost()


def run_benchmark(ctx: Context, spec: Benchmark) -> list[Row]:
    """Run every case against every provider; one row per (case, provider), in provider order."""
    names = [p.name for p in spec.providers]
    for p in spec.providers:
        base = p.baseline or spec.baseline
        if base not in names:
            raise ValueError(f"{spec.name}: provider {p.name!r} has baseline {base!r}, not among {names}")
    rows: list[Row] = []
    for i, case in enumerate(spec.cases):
        case_rows = _run_case(ctx, spec, i, case)
        rows.extend(case_rows)
        ctx.finished.extend(case_rows)
    return rows


def _run_case(ctx: Context, spec: Benchmark, index: int, case: Case) -> list[Row]:
    ctx.log(f"[{spec.name}] {case.label} {case.dtype_name} {case.direction}")
    seed = 1000 + index
    try:
        torch.manual_seed(seed)
        inputs = spec.make_inputs(case, ctx.device)
    except Exception as e:  # noqa: BLE001 - every failure becomes a row
        lost = cuda_context_lost()
        if lost is not None:  # a fault of earlier work surfaced here: no provider to blame
            raise CudaContextLost(spec.name, None, case.label, short_error(e), lost) from e
        return [_row(ctx, spec, case, p, ERROR, error=f"make_inputs: {short_error(e)}") for p in spec.providers]
    baselines = {p.baseline or spec.baseline for p in spec.providers}
    # Baselines run first: their outputs (and gradients) are the references the others are checked against.
    order = sorted(spec.providers, key=lambda p: p.name not in baselines)
    rows: dict[str, Row] = {}
    refs: dict[str, list[Tensor]] = {}
    for p in order:
        base = p.baseline or spec.baseline
        ref = None if p.name == base else refs.get(base)
        rows[p.name], out = _run_provider(ctx, spec, case, p, inputs, ref, seed)
        if p.name in baselines and out is not None:
            refs[p.name] = out
    for row in rows.values():
        base = rows[row.baseline]
        if row.median_ms and base.median_ms and base.status in (OK, WRONG):
            row.speedup = base.median_ms / row.median_ms
    del inputs, refs
    return [rows[p.name] for p in spec.providers]


def _run_provider(
    ctx: Context, spec: Benchmark, case: Case, p: Provider, inputs: Inputs, ref: list[Tensor] | None, seed: int
) -> tuple[Row, list[Tensor] | None]:
    if ctx.smoke and not p.smoke:
        return _row(ctx, spec, case, p, SKIPPED, error="not run in CPU smoke mode"), None
    if p.name in ctx.excluded:
        return _row(ctx, spec, case, p, ERROR, error=ctx.excluded[p.name]), None
    reason = p.supports(case) if p.supports else None
    if reason:
        return _row(ctx, spec, case, p, SKIPPED, error=f"unsupported: {reason}"), None
    if ctx.deadline is not None and time.monotonic() > ctx.deadline:
        return _row(ctx, spec, case, p, SKIPPED, error=f"bench time budget ({ctx.budget_s:.0f} s) exhausted"), None
    ctx.progress["running"] = f"case {case.label} {case.dtype_name} {case.direction}, provider {p.name!r}"
    leaves = [t for t in inputs.values() if isinstance(t, Tensor) and t.requires_grad]
    row = _row(ctx, spec, case, p, ERROR)
    try:
        fwd = p.setup(case, inputs)
        if p.describe is not None:
            try:
                row.extra.update(p.describe(case, inputs))
            except Exception as e:  # noqa: BLE001
                row.extra["describe_error"] = short_error(e)
        for t in leaves:
            t.grad = None
        outs = _tensors(fwd())
        if case.direction == FWD_BWD:
            diff = [o for o in outs if o.requires_grad]
            if not diff:
                raise RuntimeError("fwd+bwd case but no output requires grad")
            # own seed: the input seed would replay the inputs' stream and make dy == x (a degenerate case)
            gen = torch.Generator(device=ctx.device).manual_seed(seed + 7_919_993)
            douts = [torch.randn(o.shape, dtype=o.dtype, device=o.device, generator=gen) for o in diff]
            torch.autograd.backward(diff, douts)
            got = [o.detach() for o in outs] + [t.grad for t in leaves]

            def step() -> None:
                torch.autograd.backward([o for o in _tensors(fwd()) if o.requires_grad], douts)

            fn: Callable[[], Any] = step
        else:
            got, fn = list(outs), fwd
        for t in leaves:
            t.grad = None
        if ref is not None:
            ok, max_abs, rel, msg = compare(got, ref, spec.tol.get(case.dtype, DEFAULT_TOL[torch.float32]))
            row.correct, row.max_abs_err, row.rel_err = ok, max_abs, rel
            if not ok:
                row.error = f"check vs {row.baseline}: {msg}"
        timing = bench(fn, warmup_ms=ctx.warmup_ms, rep_ms=ctx.rep_ms, grad_to_none=leaves or None, device=ctx.device)
        for t in leaves:
            t.grad = None
    except Exception as e:  # noqa: BLE001 - a failing provider is a row, never a crash
        lost = cuda_context_lost()
        if lost is not None:  # ... unless it took the process's CUDA context with it: every later row would fail
            raise CudaContextLost(spec.name, p.name, case.label, short_error(e), lost) from e
        row.status, row.error = ERROR, short_error(e)
        for t in leaves:
            t.grad = None
        if isinstance(e, torch.OutOfMemoryError):
            torch.cuda.empty_cache()
        return row, None
    row.status = WRONG if row.correct is False else OK
    row.median_ms, row.p20_ms, row.p80_ms, row.timer = timing.median_ms, timing.p20_ms, timing.p80_ms, timing.timer
    if row.bytes:
        row.gbps = gbps(row.bytes, timing.median_ms)
        if ctx.peaks:
            row.pct_peak_bw = 100.0 * row.gbps / ctx.peaks.copy_gbps
    if row.flops:
        row.tflops = tflops(row.flops, timing.median_ms)
        if ctx.peaks:
            row.pct_peak_flops = 100.0 * row.tflops / ctx.peaks.matmul_tflops
    return row, got


def _row(ctx: Context, spec: Benchmark, case: Case, p: Provider, status: str, error: str | None = None) -> Row:
    work = spec.model(case, p) if spec.model else Work()
    return Row(
        bench=spec.name,
        case=case.label,
        params=dict(case.params),
        dtype=case.dtype_name,
        direction=case.direction,
        provider=p.name,
        baseline=p.baseline or spec.baseline,
        status=status,
        error=error,
        timer=ctx.timer,
        bytes=work.bytes,
        flops=work.flops,
    )


def _tensors(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for t in out if isinstance(t, Tensor)]
    raise TypeError(f"provider returned {type(out).__name__}, expected a Tensor or a tuple of Tensors")


def compare(got: Sequence[Tensor | None], ref: Sequence[Tensor | None], tol: float) -> tuple[bool, float, float, str]:
    """Worst ||got - ref|| / ||ref|| (fp64) over the tensors, and the largest |got - ref|; NaN never passes."""
    if len(got) != len(ref):
        return False, math.nan, math.nan, f"{len(got)} tensors (outputs + grads) vs {len(ref)} in the reference"
    worst_rel, worst_abs, msgs = 0.0, 0.0, []
    for i, (g, r) in enumerate(zip(got, ref)):
        if g is None or r is None:
            if (g is None) != (r is None):
                msgs.append(f"tensor {i}: {'missing' if g is None else 'unexpected'} gradient")
            continue
        if g.shape != r.shape:
            msgs.append(f"tensor {i}: shape {tuple(g.shape)} vs {tuple(r.shape)}")
            continue
        g64, r64 = g.detach().double(), r.detach().double()
        if not torch.isfinite(g64).all() and torch.isfinite(r64).all():
            msgs.append(f"tensor {i}: non-finite values")
            worst_rel = worst_abs = math.inf
            continue
        diff = torch.nan_to_num(g64 - r64, nan=math.inf)
        rel = float(diff.norm() / r64.norm().clamp_min(1e-30))
        worst_abs = max(worst_abs, float(diff.abs().max()) if diff.numel() else 0.0)
        worst_rel = max(worst_rel, rel)
        if not rel <= tol:
            msgs.append(f"tensor {i}: rel err {rel:.2e} > tol {tol:.0e}")
    return not msgs, worst_abs, worst_rel, "; ".join(msgs)


def short_error(e: BaseException) -> str:
    """First line of the message (torch.compile errors run to pages), capped."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    msg = f"{type(e).__name__}: {lines[0] if lines else ''}"
    return msg if len(msg) <= 300 else msg[:297] + "..."


# --------------------------------------------------------------------------------------------------- metadata + files


_ENV_PREFIXES = ("VITKERN_", "CUDA_VISIBLE", "TORCHINDUCTOR_", "TRITON_")


def vitkern_backend_unavailable(op: str, backend: str = "cuda") -> Callable[[Case], str | None]:
    """``Provider.supports`` for a provider that runs ``backend`` of vitkern op ``op``: why that backend cannot run
    here (extension not built, no GPU, ...), or why vitkern itself does not import; None when it can."""

    def supports(case: Case) -> str | None:
        try:
            from vitkern import dispatch

            return dispatch.backends(op)[backend].availability()
        except Exception as e:  # noqa: BLE001 - vitkern not importable: the row says why
            return f"{type(e).__name__}: {e}"

    return supports


def unmeasured(row: Row | None) -> str | None:
    """Why ``row`` has no time to judge a target by (None: it was timed and correct)."""
    if row is None:
        return "no row"
    return None if row.status == OK and row.median_ms else f"{row.status}: {row.error}"


def timed_cases(rows: Sequence[Row], label: str, widths: Sequence[int], out: list[str], key: str = "D",
                mine: str = "vitkern") -> Iterator[tuple[str, str, int, dict[str, Row], Row]]:
    """Per (width, direction): (what, direction, width, {provider: row}, ``mine``'s row) where ``mine`` was timed and
    correct;
    for the others a "not measured" line goes to ``out``. ``what`` reads "{label} {direction} D={width} bf16"."""
    for width in widths:
        for direction in (FWD, FWD_BWD):
            sel = {r.provider: r for r in rows if r.params.get(key) == width and r.direction == direction}
            what = f"{label} {direction} {key}={width} bf16"
            why = unmeasured(sel.get(mine))
            if why is not None:
                out.append(f"targets ({what}): not measured ({why})")
                continue
            yield what, direction, width, sel, sel[mine]


def speedup_target(what: str, goal: float, name: str, other: Row | None, mine: Row) -> str | None:
    """``target {what} >= {goal}x {name}: ...x MET / NOT MET`` (None when ``other`` has no time: the caller decides
    whether that is worth a line). A wrong-result baseline still has a time to compare with."""
    if other is None or other.status not in (OK, WRONG) or not other.median_ms:
        return None
    sp = other.median_ms / mine.median_ms
    return f"target {what} >= {goal}x {name}: {sp:.2f}x {'MET' if sp >= goal else 'NOT MET'}"


def gemm_share_target(what: str, mine: Row, gemm: Row | None, pct_goal: float) -> str:
    """``mine``'s TFLOP/s as a share of the cuBLAS GEMM row's, measured in the same run (a lower bound on the GEMM
    efficiency of a fused op whose time also covers its prologue and epilogues)."""
    head = f"target {what} >= {pct_goal:.0f}% of cuBLAS GEMM TFLOP/s"
    if gemm is None or gemm.status != OK or not gemm.tflops or not mine.tflops:
        return f"{head}: n/a"
    pct = 100.0 * mine.tflops / gemm.tflops
    return f"{head}: {pct:.0f}% {'MET' if pct >= pct_goal else 'NOT MET'}"


def cuda_vs_triton_targets(rows: Sequence[Row], cuda: str = "vitkern-cuda", default: str = "vitkern",
                           within: float = 0.10, best_at_least: float | None = None) -> list[str]:
    """Issues 7/8's bar for a CUDA C++ provider: within ``within`` of the Triton op or faster at every measured case
    (and, with ``best_at_least``, that much faster than Triton somewhere). Triton's time is the ``default``
    provider's row where the dispatcher chose Triton (its ``backend`` field); cases without both rows are listed
    as not measured. Printed in the summary, never asserted."""
    what = f"{cuda} within {within:.0%} of Triton or faster at every case"
    if any(r.timer == CPU_TIMER for r in rows):
        return [f"target {what}: not evaluated in CPU smoke mode"]
    key = lambda r: (r.case, r.dtype, r.direction)  # noqa: E731
    triton = {key(r): r for r in rows if r.provider == default and r.status == OK
              and str(r.extra.get("backend", "")).startswith("triton")}
    ratios, missing = [], []
    for r in rows:
        if r.provider != cuda or r.status == SKIPPED:
            continue
        t = triton.get(key(r))
        if r.status != OK or t is None:
            missing.append(f"{r.case} {r.dtype} {r.direction} ({r.status if r.status != OK else 'no Triton row'})")
            continue
        ratios.append((t.median_ms / r.median_ms, f"{r.case} {r.dtype} {r.direction}"))
    if not ratios:
        return [f"target {what}: not measured" + (f" ({'; '.join(missing[:3])})" if missing else "")]
    slow = sorted(x for x in ratios if x[0] < 1 / (1 + within))
    worst, best = min(ratios), max(ratios)
    out = [f"target {what}: {len(ratios) - len(slow)}/{len(ratios)} cases "
           + ("MET" if not slow else "NOT MET") + f" (worst {worst[0]:.2f}x at {worst[1]}; best {best[0]:.2f}x at "
           f"{best[1]})" + (f"; not measured: {len(missing)}" if missing else "")]
    out += [f"  slower than the bar: {ratio:.2f}x at {where}" for ratio, where in slow[:5]]
    if best_at_least is not None:
        out.append(f"target {cuda} >= {best_at_least}x Triton at one shape class at least: {best[0]:.2f}x at "
                   f"{best[1]} {'MET' if best[0] >= best_at_least else 'NOT MET'}")
    return out


def git_commit() -> str:
    """HEAD of the checkout, else $VITKERN_COMMIT (the GPU machine gets a tree copy without .git), else "unknown"
    (an installed vitkern: its version is in the metadata)."""
    try:
        if REPO_ROOT is None:
            raise OSError("installed package: no checkout")
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        if out:
            return out
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("VITKERN_COMMIT", "").strip() or "unknown"


def _git_dirty() -> bool | None:
    if REPO_ROOT is None:
        return None
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True,
        ).stdout
        return bool(out.strip())
    except (OSError, subprocess.SubprocessError):
        return None


def _nvidia_smi() -> dict[str, str]:
    fields = ["driver_version", "pstate", "clocks.max.sm", "clocks.max.mem", "power.limit"]
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=15, check=True,
        ).stdout.strip().splitlines()
        return dict(zip(fields, (v.strip() for v in out[0].split(",")))) if out else {}
    except (OSError, subprocess.SubprocessError, IndexError):
        return {}


def _triton_configs() -> str:
    """How vitkern's Triton launches chose their configs (VITKERN_AUTOTUNE): rows measured untuned must say so."""
    try:
        from vitkern.kernels.triton import tuning

        return tuning.describe()
    except Exception as e:  # noqa: BLE001 - a bad VITKERN_AUTOTUNE value, or vitkern not importable
        return f"unknown ({type(e).__name__}: {e})"


def collect_metadata(
    device: torch.device | str, peaks: Peaks | None, argv: Sequence[str] | None = None
) -> dict[str, Any]:
    """Everything needed to reproduce or distrust a result file."""
    device = torch.device(device)
    try:
        import triton

        triton_version: str | None = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    try:
        from vitkern.version import __version__ as vitkern_version
    except Exception:  # noqa: BLE001
        vitkern_version = None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    meta: dict[str, Any] = {
        "schema": SCHEMA,
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(argv if argv is not None else getattr(sys, "orig_argv", sys.argv)),
        "smoke": device.type != "cuda",
        "timer": CPU_TIMER if device.type != "cuda" else GPU_TIMER,
        "git_commit": git_commit(),
        "git_dirty": _git_dirty(),
        "vitkern": vitkern_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "device": "cpu",
        "sm_count": None,
        "compute_capability": None,
        "memory_gib": None,
        "l2_cache_mib": None,
        "driver": None,
        "nvidia_smi": {},
        "peaks": dataclasses.asdict(peaks) if peaks else None,
        "triton_configs": _triton_configs(),
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(_ENV_PREFIXES)},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        smi = _nvidia_smi()
        meta.update(
            device=props.name,
            sm_count=props.multi_processor_count,
            compute_capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            l2_cache_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1) or None,
            driver=smi.get("driver_version"),
            nvidia_smi=smi,
        )
    else:
        meta["device"] = f"cpu ({platform.processor() or platform.machine()})"
    return meta


def is_inside(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-") or "unknown"


def default_out_dir(meta: Mapping[str, Any], sub: str = "") -> Path:
    """``RESULTS_DIR[/sub]/<UTC date>_<device>_<commit[:8]>``: a new folder per run."""
    date = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    commit = str(meta.get("git_commit") or "unknown")[:8]
    return RESULTS_DIR / sub / f"{date}_{_slug(str(meta.get('device')))}_{commit}"


def write_results(out_dir: str | Path, name: str, rows: Sequence[Row], meta: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``<name>.json`` (metadata + rows) and ``<name>.csv`` (rows, params and extras as columns)."""
    out = Path(out_dir)
    smoke = bool(meta.get("smoke")) or any(r.timer == CPU_TIMER for r in rows)
    if smoke and is_inside(out, RESULTS_DIR):
        raise ValueError(f"refusing to write CPU smoke results into {RESULTS_DIR}: they are not measurements")
    out.mkdir(parents=True, exist_ok=True)
    dicts = [r.to_dict() for r in rows]
    json_path, csv_path = out / f"{name}.json", out / f"{name}.csv"
    doc = {"schema": SCHEMA, "bench": name, "meta": _jsonable(dict(meta)), "rows": dicts}
    json_path.write_text(json.dumps(doc, indent=1))
    params = list(dict.fromkeys(k for d in dicts for k in d["params"]))
    extras = list(dict.fromkeys(k for d in dicts for k in d["extra"]))
    base = [f.name for f in dataclasses.fields(Row) if f.name not in ("params", "extra")]
    header = base[:2] + params + base[2:] + [f"extra.{k}" for k in extras]
    with csv_path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=header)
        w.writeheader()
        for d in dicts:
            flat = {k: d[k] for k in base}
            flat.update({k: d["params"].get(k) for k in params})
            flat.update({f"extra.{k}": d["extra"].get(k) for k in extras})
            w.writerow(flat)
    return json_path, csv_path


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None  # strict JSON has no NaN/inf
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)  # torch.dtype, torch.device, ...


# --------------------------------------------------------------------------------------------------- text summary


def _fmt_ms(v: float | None) -> str:
    return "" if v is None else (f"{v:.4f}" if v < 10 else f"{v:.2f}")


def _fmt(v: float | None, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _check(r: Row) -> str:
    if r.status == ERROR:
        return "ERROR"
    if r.status == SKIPPED:
        return "skip"
    if r.correct is None:
        return "ref" if r.provider == r.baseline else "-"
    return "ok" if r.correct else f"WRONG {r.rel_err:.1e}" if r.rel_err is not None else "WRONG"


def _note(r: Row) -> str:
    parts = [f"backend={r.extra['backend']}"] if r.extra.get("backend") else []
    if r.error:
        parts.append(r.error)
    s = " ".join(parts)
    return s if len(s) <= 60 else s[:57] + "..."


_COLUMNS: list[tuple[str, Callable[[Row], str]]] = [
    ("bench", lambda r: r.bench),
    ("case", lambda r: r.case),
    ("dtype", lambda r: r.dtype),
    ("dir", lambda r: r.direction),
    ("provider", lambda r: r.provider),
    ("ms", lambda r: _fmt_ms(r.median_ms)),
    ("p20-p80", lambda r: f"{_fmt_ms(r.p20_ms)}-{_fmt_ms(r.p80_ms)}" if r.p20_ms is not None else ""),
    ("GB/s", lambda r: _fmt(r.gbps, ".0f")),
    ("%bw", lambda r: _fmt(r.pct_peak_bw, ".0f")),
    ("TFLOP/s", lambda r: _fmt(r.tflops, ".1f")),
    ("%fl", lambda r: _fmt(r.pct_peak_flops, ".0f")),
    ("vs base", lambda r: f"{r.speedup:.2f}x" if r.speedup is not None else ""),
    ("check", _check),
    ("note", _note),
]
_RIGHT = {"ms", "GB/s", "%bw", "TFLOP/s", "%fl", "vs base"}


def format_table(rows: Sequence[Row]) -> str:
    """Fixed-width text table (no tabulate dependency); drops empty columns and a constant bench column."""
    if not rows:
        return "(no rows)"
    cols = [(h, [get(r) for r in rows]) for h, get in _COLUMNS]
    cols = [(h, v) for h, v in cols if any(v) and not (h == "bench" and len(set(v)) == 1)]
    widths = [max(len(h), *(len(x) for x in v)) for h, v in cols]

    def line(cells: Sequence[str]) -> str:
        cells = [c.rjust(w) if h in _RIGHT else c.ljust(w) for (h, _), c, w in zip(cols, cells, widths)]
        return "  ".join(cells).rstrip()

    out = [line([h for h, _ in cols]), line(["-" * w for w in widths])]
    out += [line([v[i] for _, v in cols]) for i in range(len(rows))]
    return "\n".join(out)
