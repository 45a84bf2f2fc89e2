"""End-to-end model benchmark (issue 9): whole models, bf16, inference and a training step, four providers.

Rows (``ENTRIES``, in run order: the time budget skips what does not fit): timm ``vit_base_patch16_224`` and
``swin_tiny_patch4_window7_224`` inference (B=256; the rows with targets), ``deit_base_distilled_patch16_224``,
torchvision ``vit_b_16`` and ``swin_t`` (B=256), ``vit_large_patch16_384`` and ``swin_base_patch4_window12_384``
(B=64), then the ViT-B training step (B=128) and the same step as AMP training runs it (``train-amp``: the fp32
model under ``torch.autocast(bf16)``, fp32 weights and residual stream, bf16 GEMMs and attention), and ViT-B
inference at batch 1 (host-bound: the latency case); without
``--quick`` also training steps of the others (``FULL_ONLY``, Swin-T's AMP step among them). Models are random-init
(``vitkern.models.create_model``, no download) and cast to bf16 (weights and activations), except the AMP rows. Timing: the harness's do_bench medians, with windows of at least ``MIN_REP_MS`` per measurement.

Providers, each on its own copy of the same initial weights and the same images:
- ``eager``: the library's own model (timm uses SDPA attention by default) — the baseline;
- ``vitkern``: a copy after ``vitkern.optimize`` (row extra: modules swapped, left, backends);
- ``compile``: ``torch.compile(model, mode=COMPILE_MODE)``;
- ``vitkern+compile``: ``torch.compile`` of the optimized copy.
Inference = forward under ``no_grad``; training step = forward + cross-entropy + backward + ``AdamW.step()`` +
``zero_grad`` (dropout / drop-path set to 0 so the providers' losses are comparable; timm's defaults are 0 anyway).

Every row's extra: ``img_per_s``, ``peak_mib`` (peak memory of one call beyond what was resident before it: weights,
optimizer state and inputs excluded; measured on the second call, so compile/autotune is excluded),
``speedup_vs_compile``. ``flops`` come from ``torch.utils.flop_counter`` on the eager model (fwd; x3 for a step).
The correctness gate compares with eager: the logits (inference), or the loss and the gradient of the first
parameter (it flows back through every block) after the same number of steps (training).

Targets (issue 9), evaluated by :func:`evaluate_targets`, written into the rows' extra and printed, never claimed
when not measured: ViT-B/16 inference >= 1.35x eager, >= 1.1x compile (max-autotune), >= 12.5k img/s on an H100;
Swin-T inference >= 2x eager, >= 1.2x compile; ViT-B training step >= 1.25x eager.

Time: a whole run must fit one 10-minute GPU command. ``BUDGET_S`` is this bench's budget (run_all uses it);
compile providers run only on the target rows by default (``VITKERN_BENCH_COMPILE=all`` for every row, ``0`` for
none) and are not started with less than ``COMPILE_RESERVE_S`` left. ``--quick`` compiles in mode "default" (the
compile targets then say "not measured"); ``VITKERN_BENCH_COMPILE_MODE`` overrides the mode. How long a
max-autotune compile of these models takes on the GPU machine has not been measured yet: the first GPU session
should run ``--quick`` first. Each finished case is logged as a ``ROW {json}`` line (the log survives a timeout)
and, when an output directory is known, written at once.

It lives in the package so that ``vitkern bench`` (which runs its providers on one model) works from an installed
vitkern; ``benchmarks/bench_models.py`` puts it into ``benchmarks/run_all.py``'s suite.

Standalone: ``python -m vitkern.bench.models [--quick] [--models a,b] [--compile-mode M] [--no-compile] [--out D]``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from vitkern.bench import harness
from vitkern.bench.harness import CPU_TIMER, FWD, OK, WRONG, Benchmark, Case, Context, Provider, Row, Work

NAME = "models"
BUDGET_S = 360.0  # run_all gives this bench this budget (the others get 100 s)
# A model step takes 10-200 ms: the harness's 100 ms of reps (40 with --quick) would give do_bench 1-5 samples.
MIN_WARMUP_MS, MIN_REP_MS, MIN_REP_MS_QUICK = 200.0, 1000.0, 400.0
COMPILE_RESERVE_S = 100.0  # a max-autotune compile of a whole model can take a minute or two: don't start one late
INFER, TRAIN = "infer", "train"
TRAIN_AMP = "train-amp"  # a training step of the fp32 model under bf16 autocast (AMP: fp32 weights and stream)
TRAIN_TASKS = (TRAIN, TRAIN_AMP)
TRAIN_DIRECTION = "fwd+bwd+adamw"  # Row.direction of training rows (the harness Case itself runs them as "fwd")
MODES = ("eager", "vitkern", "compile", "vitkern+compile")  # row order: the cheap ones first, compiles last
DEFAULT_COMPILE_MODE = "max-autotune"
# ||out - eager|| / ||eager|| allowed. Whole models in bf16: every one of 12-24 blocks rounds its output to bf16 and
# vitkern sums in another order than cuBLAS/SDPA, so two correct bf16 models differ by a few % (measured on CPU,
# random-init ViT-B, B=4: logits, class-token and patch-weight gradients of vitkern vs eager 1.3-1.5%, each vs
# float64 1.1-1.3%); a wrong kernel gives O(1). Per-block numerics are `vitkern parity`'s job.
TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclasses.dataclass(frozen=True)
class Entry:
    model: str
    batch: int
    task: str = INFER
    target: bool = False  # has issue targets: compiled by default


VIT_B, SWIN_T = "vit_base_patch16_224", "swin_tiny_patch4_window7_224"
ENTRIES = [  # the two inference targets first, then the other models (no compile: fast), the training target last
    Entry(VIT_B, 256, INFER, target=True),
    Entry(SWIN_T, 256, INFER, target=True),
    Entry("deit_base_distilled_patch16_224", 256),
    Entry("torchvision:vit_b_16", 256),
    Entry("torchvision:swin_t", 256),
    Entry("vit_large_patch16_384", 64),
    Entry("swin_base_patch4_window12_384", 64),
    Entry(VIT_B, 128, TRAIN, target=True),
    Entry(VIT_B, 128, TRAIN_AMP),
    # batch 1, eager: where the host launches kernels more slowly than the GPU runs them. On CI's CPU, with the
    # driver stubbed out, vitkern's host work for a ViT-S/16 forward is ~4.5 ms for 86 launches
    # (benchmarks/cpu/launch_overhead.py); this row measures what that means on the GPU machine
    Entry(VIT_B, 1, INFER),
]
FULL_ONLY = [  # not with --quick
    Entry(SWIN_T, 128, TRAIN),
    Entry(SWIN_T, 128, TRAIN_AMP),
    Entry("deit_base_distilled_patch16_224", 128, TRAIN),
    Entry("torchvision:vit_b_16", 128, TRAIN),
    Entry("torchvision:swin_t", 128, TRAIN),
    Entry("vit_large_patch16_384", 16, TRAIN),
    Entry("swin_base_patch4_window12_384", 32, TRAIN),
]
SMOKE_KWARGS = {  # CPU smoke: tiny configs of the same families
    VIT_B: dict(img_size=32, depth=2, embed_dim=64, num_heads=2),
    SWIN_T: dict(img_size=64, embed_dim=32, depths=(2, 2), num_heads=(1, 2), window_size=4),
}


def _vitkern() -> Any:
    import vitkern

    return vitkern


def _models() -> Any:
    from vitkern import models

    return models


# --------------------------------------------------------------------------------------------------- inputs
_BASE: dict[tuple, Any] = {}  # one model at a time: case key -> BuiltModel (cached across its cases)
_FLOPS: dict[tuple, float | None] = {}  # case key -> forward FLOPs per image
_PREPARED: dict[str, "_Prepared"] = {}  # the provider being run (cleared after each case: frees its model copy)


def _key(case: Case) -> tuple:
    p = case.params
    return (p["model"], case.dtype, p.get("kwargs", ""), p.get("img"))


def _base_model(case: Case, device: torch.device) -> Any:
    """The random-init model of ``case``, built on ``device`` in the case's dtype; the last one is cached."""
    key = _key(case) + (str(device),)
    if key not in _BASE:
        _BASE.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        p, kwargs = case.params, _models().parse_kwargs(case.params.get("kwargs"))
        img = p.get("img") or kwargs.pop("img_size", None)
        built = _models().create_model(p["model"], img_size=img, device=device, dtype=case.dtype, **kwargs)
        _BASE[key] = built
        _FLOPS[_key(case)] = _flops_per_image(built, device, case.dtype)
    return _BASE[key]


def _flops_per_image(built: Any, device: torch.device, dtype: torch.dtype) -> float | None:
    from torch.utils.flop_counter import FlopCounterMode

    try:
        x = built.example_input(1, device=device, dtype=dtype)
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            built.forward(x)
        return float(fc.get_total_flops())
    except Exception:  # noqa: BLE001 - a model the counter cannot trace just has no TFLOP/s column
        return None


def make_inputs(case: Case, device: torch.device) -> dict[str, Any]:
    built = _base_model(case, device)
    B = case.params["B"]
    return {  # random images (never zeros) and labels; the harness seeded torch before this call
        "built": built,
        "x": torch.randn(B, 3, built.img_size, built.img_size, device=device).to(case.dtype),
        "y": torch.randint(0, built.num_classes, (B,), device=device),
    }


def work(case: Case, provider: Provider) -> Work:
    """FLOPs of the eager model (forward, counted by torch.utils.flop_counter at B=1) x B; x3 for a training step."""
    flops = _FLOPS.get(_key(case))
    if flops is None:
        return Work()
    return Work(flops=flops * case.params["B"] * (3.0 if case.params["task"] in TRAIN_TASKS else 1.0))


# --------------------------------------------------------------------------------------------------- providers
def _optimized(module: torch.nn.Module) -> tuple[torch.nn.Module, Any]:
    m = copy.deepcopy(module)
    return m, _vitkern().optimize(m)


def _report_extra(report: Any) -> dict[str, Any]:
    backends: dict[str, int] = {}
    for s in report.swapped:
        for op, b in s.backends.items():
            backends[f"{op}:{b}"] = backends.get(f"{op}:{b}", 0) + 1
    return {"swapped": len(report.swapped), "left": len(report.left), "backends": backends,
            "left_reasons": sorted({why for _, _, why in report.left})[:5]}


@dataclasses.dataclass
class _Prepared:
    fn: Callable[[], Any]
    extra: dict[str, Any]


def _compile(module: torch.nn.Module, mode: str) -> Any:
    """harness.compile_fresh (Dynamo reset: a fresh graph per case), with Dynamo's counters cleared too (reset
    keeps them), so that describe can report this compile's graph breaks."""
    from torch._dynamo.utils import counters

    compiled = harness.compile_fresh(module, mode=mode)
    counters.clear()
    return compiled


def prepare(mode: str, case: Case, inp: dict[str, Any], compile_mode: str) -> _Prepared:
    """The callable one provider times: an inference forward or a whole training step."""
    built, x, y = inp["built"], inp["x"], inp["y"]
    logits = _models().logits
    extra: dict[str, Any] = {}
    if case.params["task"] == INFER:
        if mode.startswith("vitkern"):
            if "_optimized" not in inp:  # vitkern and vitkern+compile share one optimized copy
                inp["_optimized"] = _optimized(built.module)
            module, report = inp["_optimized"]
            extra.update(_report_extra(report))
        else:
            module = built.module
        if mode.endswith("compile"):
            module = _compile(module, compile_mode)
            extra["compile_mode"] = compile_mode

        def infer() -> torch.Tensor:
            with torch.no_grad():
                return logits(module(x))

        return _Prepared(infer, extra)

    module = copy.deepcopy(built.module).train()
    extra["dropouts_zeroed"] = _models().disable_stochastic_depth(module)
    if mode.startswith("vitkern"):
        extra.update(_report_extra(_vitkern().optimize(module)))
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=x.device.type == "cuda")
    runner = _compile(module, compile_mode) if mode.endswith("compile") else module
    if mode.endswith("compile"):
        extra["compile_mode"] = compile_mode
    # the first parameter (timm/torchvision ViT: the class token; Swin: the patch projection) gets its gradient
    # through every block: returned with the loss, so the check covers the backward, not only the forward
    probe = module.get_parameter(next(n for n, p in built.module.named_parameters() if p.requires_grad))

    amp = case.params["task"] == TRAIN_AMP  # fp32 model and images; autocast runs the GEMMs/attention in bf16

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            out = logits(runner(x))
        loss = F.cross_entropy(out.float(), y)
        loss.backward()
        grad = probe.grad.detach().clone()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach(), grad

    return _Prepared(step, extra)


def providers(ctx: Context, modes: Sequence[str], compile_mode: str, compile_cases: Callable[[Case], bool],
              on_start: Callable[[Case, str], None] | None = None) -> list[Provider]:
    """One harness Provider per mode. The harness calls setup, then describe, then the callable for its check:
    describe runs it twice (the second call measures peak memory), so every provider takes the same number of
    steps before its check and training losses stay comparable."""
    prepared = _PREPARED

    def make(mode: str) -> Provider:
        def setup(case: Case, inp: dict[str, Any]) -> Callable[[], Any]:
            if on_start is not None:
                on_start(case, mode)
            prepared.clear()
            prepared[mode] = prepare(mode, case, inp, compile_mode)
            return prepared[mode].fn

        def describe(case: Case, inp: dict[str, Any]) -> dict[str, Any]:
            p = prepared[mode]
            extra = dict(p.extra, peak_mib=harness.peak_mib(p.fn) if ctx.device.type == "cuda" else None)
            if mode.endswith("compile"):  # counters were cleared when this provider compiled (see _compile)
                from torch._dynamo.utils import counters

                extra["graph_breaks"] = sum(counters["graph_break"].values())
                extra["graphs"] = counters["stats"].get("unique_graphs")
            return extra

        def supports(case: Case) -> str | None:
            if not mode.endswith("compile"):
                return None
            if not compile_cases(case):
                return "compile not selected for this row (VITKERN_BENCH_COMPILE=all compiles every row)"
            left = (ctx.deadline or float("inf")) - time.monotonic()
            if left < COMPILE_RESERVE_S:
                return f"only {left:.0f} s of the bench budget left; a {compile_mode} compile needs more"
            return None

        # torch.compile is skipped in CPU smoke mode (a C++ toolchain build would take tens of seconds)
        return Provider(mode, setup, describe=describe, supports=supports, smoke=not mode.endswith("compile"))

    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"modes must be a non-empty subset of {MODES}, got {list(modes)}")
    return [make(m) for m in MODES if m in modes]


# --------------------------------------------------------------------------------------------------- running
def entry_case(e: Entry, dtype: torch.dtype, img_size: int | None = None, kwargs: dict | str | None = None) -> Case:
    """The harness case of ``e``: ``dtype`` is the model's (weights and images); an AMP step's model is fp32."""
    if e.task == TRAIN_AMP:
        dtype = torch.float32
    params: dict[str, Any] = {"model": e.model, "B": e.batch, "task": e.task}
    if img_size is not None:
        params["img"] = img_size
    if kwargs:  # a string, so that the case label and the CSV column stay readable
        params["kwargs"] = kwargs if isinstance(kwargs, str) else _models().format_kwargs(kwargs)
    return Case(params, dtype, FWD)


def finish_rows(rows: list[Row]) -> list[Row]:
    """Derived fields the harness does not know: img/s, speedup vs compile, the training rows' direction."""
    by = {r.provider: r for r in rows}
    comp = by.get("compile")
    for r in rows:
        if r.params.get("task") in TRAIN_TASKS:
            r.direction = TRAIN_DIRECTION
        if r.median_ms and r.status in (OK, WRONG):
            r.extra["img_per_s"] = round(r.params["B"] * 1e3 / r.median_ms, 1)
            if comp is not None and comp.median_ms and comp.status in (OK, WRONG):
                r.extra["speedup_vs_compile"] = round(comp.median_ms / r.median_ms, 4)
    return rows


def run_cases(ctx: Context, cases: Sequence[Case], modes: Sequence[str] = MODES,
              compile_mode: str = DEFAULT_COMPILE_MODE, compile_cases: Callable[[Case], bool] = lambda c: True,
              on_case: Callable[[list[Row]], None] | None = None,
              on_start: Callable[[Case, str], None] | None = None) -> list[Row]:
    """Run each case (one model, batch, task) on the providers of ``modes``; ``on_case(all rows so far)`` after
    each case (incremental results)."""
    ps = providers(ctx, modes, compile_mode, compile_cases, on_start)
    baseline = "eager" if "eager" in modes else ps[0].name
    rows: list[Row] = []
    try:
        for case in cases:
            tol = dict(TOL)
            if case.params["task"] == TRAIN_AMP:  # fp32 weights, bf16 compute: two correct runs differ as in bf16
                tol[torch.float32] = TOL[torch.bfloat16]
            spec = Benchmark(NAME, [case], ps, make_inputs, baseline=baseline, model=work, tol=tol)
            rows += finish_rows(harness.run_benchmark(ctx, spec))
            _PREPARED.clear()
            if on_case is not None:
                on_case(rows)
    finally:
        _BASE.clear()
        _PREPARED.clear()
        from torch import _dynamo

        _dynamo.reset()  # compiled graphs hold the last models
    return rows


def _compile_setting(quick: bool) -> tuple[str, str]:
    """(which rows compile: "targets" | "all" | "none", compile mode), from the environment."""
    which = os.environ.get("VITKERN_BENCH_COMPILE", "targets").strip().lower()
    which = {"0": "none", "1": "targets", "": "targets"}.get(which, which)
    if which not in ("targets", "all", "none"):
        raise ValueError(f"VITKERN_BENCH_COMPILE must be 0, 1, targets, all or none, got {which!r}")
    mode = os.environ.get("VITKERN_BENCH_COMPILE_MODE") or ("default" if quick else DEFAULT_COMPILE_MODE)
    return which, mode


def cases(ctx: Context, models: Sequence[str] | None = None) -> tuple[list[Case], set[int]]:
    """The cases of this run and the indices of the target rows."""
    if ctx.smoke:  # tiny configs of the two target families, inference and a training step
        entries = [Entry(VIT_B, 2, INFER, True), Entry(SWIN_T, 2, INFER, True), Entry(VIT_B, 2, TRAIN, True),
                   Entry(VIT_B, 2, TRAIN_AMP)]
        entries = [e for e in entries if not models or e.model in models]
        return [entry_case(e, torch.float32, kwargs=SMOKE_KWARGS[e.model]) for e in entries], set(range(len(entries)))
    entries = ENTRIES + ([] if ctx.quick else FULL_ONLY)
    if models:
        entries = [e for e in entries if e.model in models]
    return [entry_case(e, torch.bfloat16) for e in entries], {i for i, e in enumerate(entries) if e.target}


def _row_line(r: Row) -> str:
    return "ROW " + json.dumps(r.to_dict(), separators=(",", ":"))


def run(ctx: Context, *, models: Sequence[str] | None = None, compile_which: str | None = None,
        compile_mode: str | None = None, out_dir: str | Path | None = None) -> list[Row]:
    which, mode = _compile_setting(ctx.quick)
    which, mode = compile_which or which, compile_mode or mode
    todo, target_idx = cases(ctx, models)
    targets_ = {id(todo[i]) for i in target_idx}
    out_dir = out_dir or getattr(ctx, "out_dir", None)
    meta = harness.collect_metadata(ctx.device, ctx.peaks) if out_dir else None
    logged: set[int] = set()

    def on_case(rows: list[Row]) -> None:
        for r in rows:
            if id(r) not in logged:
                logged.add(id(r))
                ctx.log(_row_line(r))
        if out_dir is not None:
            harness.write_results(out_dir, NAME, rows, dict(meta or {}, partial=True))

    compile_cases = {"all": lambda c: True, "none": lambda c: False}.get(which, lambda c: id(c) in targets_)
    if not ctx.smoke:  # same deadline, longer timing windows (see MIN_REP_MS)
        ctx = dataclasses.replace(ctx, warmup_ms=max(ctx.warmup_ms, MIN_WARMUP_MS),
                                  rep_ms=max(ctx.rep_ms, MIN_REP_MS_QUICK if ctx.quick else MIN_REP_MS))
    rows = run_cases(ctx, todo, MODES, mode, compile_cases, on_case=on_case)
    evaluate_targets(rows, device_name=_device_name(ctx.device))
    return rows


# --------------------------------------------------------------------------------------------------- targets
@dataclasses.dataclass(frozen=True)
class Target:
    model: str
    task: str
    what: str  # "eager" | "compile" | "img_per_s"
    goal: float
    device: str | None = None  # only evaluated on this device (substring of the device name)


TARGETS = [
    Target(VIT_B, INFER, "eager", 1.35), Target(VIT_B, INFER, "compile", 1.1),
    Target(VIT_B, INFER, "img_per_s", 12_500, device="H100"),
    Target(SWIN_T, INFER, "eager", 2.0), Target(SWIN_T, INFER, "compile", 1.2),
    Target(VIT_B, TRAIN, "eager", 1.25),
]


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else "cpu"


def _measured(r: Row | None) -> bool:
    return r is not None and r.status == OK and bool(r.median_ms)


def evaluate_targets(rows: Sequence[Row], device_name: str) -> list[dict[str, Any]]:
    """One verdict per target: "pass" / "fail" with the value, or "not measured" with the reason. The best of
    vitkern and vitkern+compile counts (both are one call for a user). Verdicts go into that row's extra."""
    out = []
    for t in TARGETS:
        group = [r for r in rows if r.params.get("model") == t.model and r.params.get("task") == t.task]
        by = {r.provider: r for r in group}
        label = (f"{t.model} {t.task}: vitkern >= {t.goal:g} img/s" if t.what == "img_per_s"
                 else f"{t.model} {t.task}: vitkern >= {t.goal:g}x {t.what}")
        verdict: dict[str, Any] = {"target": label, "goal": t.goal, "status": "not measured", "value": None}
        mine = [r for r in (by.get("vitkern"), by.get("vitkern+compile")) if _measured(r)]
        base = by.get(t.what) if t.what != "img_per_s" else None
        if any(r.timer == CPU_TIMER for r in rows):
            verdict["why"] = "CPU smoke run: timings are not measurements"
        elif not group:
            verdict["why"] = "row not run (not selected, or the budget ran out before it)"
        elif not mine:
            verdict["why"] = "; ".join(f"{p}: {by[p].status} {by[p].error or ''}".strip()
                                       for p in ("vitkern", "vitkern+compile") if p in by) or "no vitkern row"
        elif t.device and t.device not in device_name:
            verdict["why"] = f"target is for an {t.device}; this device is {device_name}"
        elif t.what != "img_per_s" and not _measured(base):
            verdict["why"] = f"{t.what}: " + (f"{base.status} {base.error or ''}".strip() if base else "no row")
        elif t.what == "compile" and base.extra.get("compile_mode") != "max-autotune":
            verdict["why"] = f"compile ran in mode {base.extra.get('compile_mode')!r}; the target is vs max-autotune"
        else:
            best = min(mine, key=lambda r: r.median_ms)
            mine = [best]
            value = (best.params["B"] * 1e3 / best.median_ms if t.what == "img_per_s"
                     else base.median_ms / best.median_ms)
            verdict.update(status="pass" if value >= t.goal else "fail", value=round(value, 3), by=best.provider)
        out.append(verdict)
        holder = next((r for r in mine), by.get("vitkern") or by.get("vitkern+compile"))
        if holder is not None:  # idempotent: run() and targets() both evaluate
            holder.extra.setdefault("targets", {})[label] = verdict
    return out


def throughput_lines(rows: Sequence[Row]) -> list[str]:
    """One line per case: img/s of each provider, speedup vs eager, peak MiB (the harness table has no such columns)."""
    lines, seen = [], []
    for r in rows:
        if r.case not in seen:
            seen.append(r.case)
    for case in seen:
        group = [r for r in rows if r.case == case]
        p = group[0].params
        cells = []
        for r in group:
            if r.extra.get("img_per_s"):
                sp = f" {r.speedup:.2f}x" if r.speedup and r.provider != r.baseline else ""
                mem = f" (peak {r.extra['peak_mib']:,.0f} MiB)" if r.extra.get("peak_mib") is not None else ""
                flag = "" if r.status == OK else f" ({r.status.upper()})"
                cells.append(f"{r.provider} {r.extra['img_per_s']:,.0f}{sp}{mem}{flag}")
            else:
                cells.append(f"{r.provider} {r.status}")
        lines.append(f"{p['model']} {p['task']} B={p['B']} img/s: " + " | ".join(cells))
    return lines


def targets(rows: list[Row]) -> list[str]:
    lines = throughput_lines(rows)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for v in evaluate_targets(rows, device_name=_device_name(device)):
        if v["status"] == "not measured":
            lines.append(f"target {v['target']}: not measured ({v.get('why')})")
        else:
            lines.append(f"target {v['target']}: {v['value']:g} by {v['by']} -> {v['status'].upper()}")
    return lines


# --------------------------------------------------------------------------------------------------- standalone
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vitkern.bench.models", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="inference rows + the ViT-B training step; compile mode 'default'")
    ap.add_argument("--models", default="", help="comma-separated model names to keep (default: all rows)")
    ap.add_argument("--compile", choices=["targets", "all", "none"], default=None, help="which rows compile")
    ap.add_argument("--no-compile", action="store_true", help="same as --compile none")
    ap.add_argument("--compile-mode", default=None,
                    help=f"torch.compile mode (default {DEFAULT_COMPILE_MODE}; quick: default)")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S)
    ap.add_argument("--out", type=Path, default=None,
                    help="results directory (default: a new one under the harness's RESULTS_DIR)")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke run (tiny models, not a measurement)")
    args = ap.parse_args(argv)
    smoke = args.smoke or not torch.cuda.is_available()
    device = torch.device("cpu" if smoke else "cuda")
    peaks = None if smoke else harness.measure_peaks(device)
    meta = harness.collect_metadata(device, peaks)
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="vitkern-models-smoke-")) if smoke else harness.default_out_dir(meta)
    ctx = Context(device=device, peaks=peaks, quick=args.quick, warmup_ms=10.0 if args.quick else 25.0,
                  rep_ms=40.0 if args.quick else 100.0, budget_s=args.budget_s, log=lambda s: print(s, flush=True))
    models = [m.strip() for m in args.models.split(",") if m.strip()] or None
    try:
        rows = run(ctx, models=models, compile_which="none" if args.no_compile else args.compile,
                   compile_mode=args.compile_mode, out_dir=args.out)
    except harness.CudaContextLost as lost:  # a kernel fault: nothing more can run in this process
        print(f"{lost}; rerun without that provider (benchmarks/run_all.py does so by itself)", file=sys.stderr)
        return 1
    lines = targets(rows)
    harness.write_results(args.out, NAME, rows, dict(meta, targets=lines))
    print(harness.format_table(rows))
    print("\n".join(lines))
    print(f"RESULTS_DIR={Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
