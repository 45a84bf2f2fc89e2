"""Run every benchmark: ``python -m benchmarks.run_all [--out DIR] [--only NAME[,NAME]] [--quick] [--list] [--smoke]``.

Discovers ``benchmarks/bench_*.py`` (each exposes ``NAME``, ``run(ctx) -> list[Row]`` and optionally
``targets(rows) -> list[str]``), measures the peaks once, runs each bench under its own time budget, writes
``<NAME>.json`` + ``<NAME>.csv`` per bench and ``summary.md`` into
``benchmarks/results/<UTC date>_<device-slug>_<short commit>/`` (or ``--out``), and prints the summary LAST
(the GPU tool returns only the tail of the output). Without CUDA it is a smoke run into a temp dir.

A provider whose kernel faults takes the process's CUDA context with it (``harness.CudaContextLost``): the runner
then writes its state next to the results and ``exec``s itself, so the benches still to come, and the one that
faulted (without that provider, whose rows say why), run in a fresh process. The benches already done are kept.
The same restart stops a bench that runs far past its budget (a compile that takes minutes, a hung kernel): a
watchdog thread keeps the cases it finished, records where it was, and hands the rest of the run to a fresh
process, so that the later benches still run and the summary is still written before the GPU suite's hard kill.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Sequence

import torch

from vitkern.bench import harness
from vitkern.bench.harness import ERROR, SKIPPED, Context, Row

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_BUDGET_S = 100.0  # per bench; each must finish well under 2 minutes on an H100 (suite total: 10 min)
MAX_RESTARTS = 12  # fresh processes after lost CUDA contexts or overrun benches, per run (each re-imports torch and vitkern)
SUITE_END_MARGIN_S = 10.0  # the watchdog stops a bench this long after the total budget ends, at the latest
STATE_FILE = "run_all_state.json"  # in the results folder while a restarted run goes on; removed at the end


def overrun_limit_s(budget_s: float) -> float:
    """How long a bench may run before the watchdog stops it: its budget, plus half of it (2-60 s) for the case
    that was running when the budget ran out (the harness starts no case after it)."""
    return budget_s + min(60.0, max(2.0, 0.5 * budget_s))


def discover(directory: str | Path = BENCH_DIR) -> dict[str, ModuleType]:
    """``{NAME: module}`` for every ``bench_*.py`` in ``directory``, sorted by file name.

    A module that fails to import is returned as a stub whose ``run`` raises the import error, so one broken
    bench becomes an error row instead of stopping the suite.
    """
    directory = Path(directory).resolve()
    found: dict[str, ModuleType] = {}
    for path in sorted(directory.glob("bench_*.py")):
        stem = path.stem
        try:
            if directory == BENCH_DIR:
                mod = importlib.import_module(f"benchmarks.{stem}")
            else:
                spec = importlib.util.spec_from_file_location(stem, path)
                assert spec is not None and spec.loader is not None
                mod = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(mod)
        except Exception as e:  # noqa: BLE001
            mod = _broken(stem, e)
        name = getattr(mod, "NAME", stem.removeprefix("bench_"))
        if not callable(getattr(mod, "run", None)):
            mod = _broken(stem, TypeError(f"{path.name} defines no run(ctx)"))
        found[name] = mod
    return found


def _broken(stem: str, err: Exception) -> ModuleType:
    mod = ModuleType(stem)
    mod.NAME = stem.removeprefix("bench_")  # type: ignore[attr-defined]

    def run(ctx: Context) -> list[Row]:
        raise err

    mod.run = run  # type: ignore[attr-defined]
    return mod


def _bench_row(name: str, ctx: Context, status: str, error: str) -> Row:
    """The one row of a bench that crashed or never started."""
    return Row(
        bench=name, case="-", params={}, dtype="-", direction="-", provider="-", baseline="-",
        status=status, error=error, timer=ctx.timer,
    )


def _summary(meta: dict[str, Any], sections: list[tuple[str, list[Row], list[str], float]],
             restarts: Sequence[str] = ()) -> str:
    peaks = meta.get("peaks")
    head = [
        f"# vitkern benchmarks — {meta['device']}",
        "",
        f"- date (UTC): {meta['date_utc']}; commit: {meta['git_commit']}"
        + (" (dirty tree)" if meta.get("git_dirty") else ""),
        f"- torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, cuDNN {meta['cudnn']}, "
        f"driver {meta['driver']}, python {meta['python']}, SMs {meta['sm_count']}",
        (
            f"- measured peaks: bf16 matmul {peaks['matmul_tflops']:.0f} TFLOP/s, "
            f"copy {peaks['copy_gbps']:.0f} GB/s (read + write)"
            if peaks
            else "- peaks: not measured"
        ),
        f"- timer: {meta['timer']}; vitkern Triton launches: {meta.get('triton_configs', 'unknown')}",
        f"- command: `{meta['command']}`",
    ]
    if meta.get("smoke"):
        head.insert(2, "**CPU SMOKE RUN: wall-clock numbers on tiny shapes, not measurements.**\n")
    head += [f"- restarted in a fresh process: {event}" for event in restarts]
    body = []
    for name, rows, tgt, secs in sections:
        body += ["", f"## {name} ({secs:.0f} s)", "", "```", harness.format_table(rows), "```"]
        body += [f"- {t}" for t in tgt]
    return "\n".join(head + body) + "\n"


def main(argv: Sequence[str] | None = None, *, restart: Callable[[list[str]], None] | None = None) -> int:
    """``restart``: how to go on in a fresh process after a lost CUDA context or an overrun bench (``exec_restart``
    from the command line); None: no watchdog, and the benches after a loss are not run, saying why."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="results directory (default: benchmarks/results/<date>_<device>_<commit>)")
    ap.add_argument("--only", action="append", default=[], help="bench NAME(s), comma-separated; repeatable")
    ap.add_argument("--quick", action="store_true", help="fewer cases and shorter reps (a sanity pass)")
    ap.add_argument("--smoke", action="store_true", help="force the CPU smoke path even with CUDA")
    ap.add_argument("--list", action="store_true", help="list the discovered benches and exit")
    ap.add_argument("--budget-s", type=float, default=None,
                    help=f"wall-clock budget per bench (default: the bench's BUDGET_S, else {DEFAULT_BUDGET_S:.0f})")
    ap.add_argument("--total-budget-s", type=float, default=None, help="wall-clock budget for all benches")
    ap.add_argument("--bench-dir", type=Path, default=BENCH_DIR, help=argparse.SUPPRESS)
    ap.add_argument("--resume", type=Path, help=argparse.SUPPRESS)  # the state file of a restart (see _restart)
    args = ap.parse_args(argv)

    benches = discover(args.bench_dir)
    if args.list:
        print("\n".join(benches))
        return 0
    only = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    unknown = sorted(set(only) - set(benches))
    if unknown:
        print(f"unknown bench(es) {unknown}; known: {sorted(benches)}", file=sys.stderr)
        return 2
    selected = {n: m for n, m in benches.items() if not only or n in only}

    smoke = args.smoke or not torch.cuda.is_available()
    device = torch.device("cpu" if smoke else "cuda")
    if args.resume:  # a restart (lost CUDA context, overrun bench): same folder, metadata, peaks and deadline
        state = json.loads(args.resume.read_text())
        meta, out = state["meta"], Path(state["out"])
        peaks = harness.Peaks(**state["peaks"]) if state["peaks"] else None
        suite_end = float("inf") if state["suite_end_unix"] is None else \
            time.monotonic() + state["suite_end_unix"] - time.time()
        print(f"resumed in a fresh process ({len(state['restarts'])} restart(s)): {state['restarts'][-1]}", flush=True)
    else:
        peaks = None
        if not smoke:
            print("measuring peaks (bf16 8192^3 matmul, 1 GiB device copy) ...", flush=True)
            try:
                peaks = harness.measure_peaks(device)
                print(f"  matmul {peaks.matmul_tflops:.0f} TFLOP/s, copy {peaks.copy_gbps:.0f} GB/s", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"  peak measurement failed: {harness.short_error(e)}", flush=True)
        meta = harness.collect_metadata(device, peaks, argv=None if argv is None else ["benchmarks.run_all", *argv])
        if smoke:
            out: Path = args.out or Path(tempfile.mkdtemp(prefix="vitkern-bench-smoke-"))
            if harness.is_inside(out, harness.RESULTS_DIR):
                print(f"refusing to write CPU smoke results into {harness.RESULTS_DIR}", file=sys.stderr)
                return 2
        else:
            out = args.out or harness.default_out_dir(meta)
        suite_end = time.monotonic() + (args.total_budget_s if args.total_budget_s is not None else float("inf"))
        state = {
            "argv": list(sys.argv[1:] if argv is None else argv), "out": str(out.resolve()),
            "meta": json.loads(json.dumps(meta, default=str)),
            "peaks": dataclasses.asdict(peaks) if peaks else None,
            "suite_end_unix": None if args.total_budget_s is None else time.time() + args.total_budget_s,
            "done": {}, "excluded": {}, "restarts": [], "crashed": False,
        }
    if smoke:
        print("CPU smoke mode: tiny shapes, wall-clock timer; numbers are NOT measurements", flush=True)
    # now, and again at the end: if this process is killed, the GPU suite still packs the benches written so far
    print(f"RESULTS_DIR={out.resolve()}", flush=True)

    sections: list[tuple[str, list[Row], list[str], float]] = []
    lost_context: str | None = None  # set when the context is gone and no restart is allowed
    for i, (name, mod) in enumerate(selected.items()):
        if name in state["done"]:  # finished before a restart
            rows = [Row(**r) for r in json.loads((out / f"{name}.json").read_text())["rows"]]
            sections.append((name, rows, _targets(mod, rows), state["done"][name]))
            continue
        t0 = time.monotonic()
        # at most an even share of what is left, so that under a total budget the last bench still runs its first
        # cases (what an earlier one leaves unused passes on to the later ones)
        share = (suite_end - t0) / (len(selected) - i)
        budget = min(args.budget_s or getattr(mod, "BUDGET_S", DEFAULT_BUDGET_S), share)
        ctx = Context(
            device=device,
            peaks=peaks,
            quick=args.quick,
            warmup_ms=10.0 if args.quick else 25.0,
            rep_ms=40.0 if args.quick else 100.0,
            budget_s=max(budget, 0.0),
            log=lambda s: print(s, flush=True),
            excluded=dict(state["excluded"].get(name, {})),
        )
        print(f"== {name} (budget {budget:.0f} s)", flush=True)
        if lost_context is not None:
            rows = [_bench_row(name, ctx, ERROR, f"not run: {lost_context}")]
        elif budget <= 0:
            rows = [_bench_row(name, ctx, SKIPPED, "suite time budget exhausted before this bench started")]
        else:
            watchdog = None
            if restart is not None:
                limit = min(overrun_limit_s(budget), suite_end + SUITE_END_MARGIN_S - t0)
                watchdog = _Watchdog(limit, lambda: _stop_overrun(name, ctx, t0, budget, meta, out, state, restart))
            try:
                try:
                    rows = list(mod.run(ctx))
                finally:
                    if watchdog is not None:
                        watchdog.disarm()  # the bench is over in this process: only this thread goes on
            except harness.CudaContextLost as lost:
                print(f"  {lost}", flush=True)
                can_restart = restart is not None and len(state["restarts"]) < MAX_RESTARTS
                if can_restart and lost.provider is not None and lost.provider not in ctx.excluded:
                    state["excluded"].setdefault(name, {})[lost.provider] = (
                        f"lost the CUDA context at case {lost.case}: {lost.error}; "
                        f"left out of this bench's rerun in a fresh process")
                    state["restarts"].append(f"{name}: {lost.provider!r} lost the CUDA context at case {lost.case} "
                                             f"({lost.error}); {name} rerun without it")
                    _restart(restart, state, out)
                rows, state["crashed"] = [_bench_row(name, ctx, ERROR, f"bench crashed: {lost}")], True
                if can_restart:  # the benches after it still get a fresh process
                    _end_bench_and_restart(name, rows, time.monotonic() - t0, str(lost), meta, out, state, restart)
                lost_context = f"the CUDA context was lost in {name} ({lost.error})"
            except Exception as e:  # noqa: BLE001 - one broken bench must not stop the others
                traceback.print_exc()
                rows = [_bench_row(name, ctx, ERROR, f"bench crashed: {harness.short_error(e)}")]
                state["crashed"] = True
        harness.write_results(out, name, rows, meta)
        sections.append((name, rows, _targets(mod, rows), time.monotonic() - t0))
        state["done"][name] = sections[-1][3]
        if not smoke and lost_context is None:
            torch.cuda.empty_cache()

    summary = _summary(meta, sections, state["restarts"])
    (out / "summary.md").write_text(summary)
    (out / STATE_FILE).unlink(missing_ok=True)
    print(f"RESULTS_DIR={out.resolve()}")
    print()
    print(summary, end="")
    return 1 if state["crashed"] else 0


class _Watchdog:
    """Calls ``fire`` after ``limit_s`` unless disarmed first; the two exclude each other (``fire`` does not
    return: it restarts the process)."""

    def __init__(self, limit_s: float, fire: Callable[[], None]) -> None:
        self._lock, self._armed = threading.Lock(), True
        self._timer = threading.Timer(max(limit_s, 0.0), self._fire, args=(fire,))
        self._timer.daemon = True
        self._timer.start()

    def _fire(self, fire: Callable[[], None]) -> None:
        with self._lock:
            if self._armed:
                fire()

    def disarm(self) -> None:
        with self._lock:
            self._armed = False
        self._timer.cancel()


def _stop_overrun(name: str, ctx: Context, t0: float, budget: float, meta: dict[str, Any], out: Path,
                  state: dict[str, Any], restart: Callable[[list[str]], None]) -> None:
    """The watchdog's action: keep the finished cases' rows, say where the bench was, go on in a fresh process."""
    elapsed = time.monotonic() - t0
    what = (f"stopped {elapsed:.0f} s after it started (budget {budget:.0f} s) in "
            f"{ctx.progress.get('running', 'its set-up')}; "
            f"the cases after it were not run")
    state["crashed"] = True
    _end_bench_and_restart(name, [*ctx.finished, _bench_row(name, ctx, ERROR, what)], elapsed, f"{name}: {what}",
                           meta, out, state, restart)


def _end_bench_and_restart(name: str, rows: list[Row], elapsed: float, event: str, meta: dict[str, Any], out: Path,
                           state: dict[str, Any], restart: Callable[[list[str]], None]) -> None:
    """Write the bench's rows as its result, count it done, and go on with the next benches in a fresh process."""
    harness.write_results(out, name, rows, meta)
    state["done"][name] = elapsed
    state["restarts"].append(f"{event}; the next benches run in a fresh process")
    _restart(restart, state, out)


def _targets(mod: ModuleType, rows: list[Row]) -> list[str]:
    try:
        return list(mod.targets(rows)) if callable(getattr(mod, "targets", None)) else []
    except Exception as e:  # noqa: BLE001
        return [f"targets() failed: {harness.short_error(e)}"]


def _restart(restart: Callable[[list[str]], None], state: dict[str, Any], out: Path) -> None:
    """Save the run's state next to its results and hand over to a fresh process (``restart`` does not return)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / STATE_FILE
    path.write_text(json.dumps(state, indent=1))
    print(f"restarting in a fresh process: {state['restarts'][-1]}", flush=True)
    sys.stderr.flush()
    restart([*state["argv"], "--resume", str(path)])
    raise RuntimeError("restart returned")  # a restart replaces this process


def exec_restart(argv: list[str]) -> None:
    """Replace this process by ``python -m benchmarks.run_all ARGV`` (same PID, so the GPU suite's timeout and
    output capture carry on), with the checkout on PYTHONPATH so that ``benchmarks`` imports from any folder."""
    root = str(BENCH_DIR.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.run_all", *argv], env)


if __name__ == "__main__":
    sys.exit(main(restart=exec_restart))
