"""CPU tests of the benchmark harness (vitkern/bench/harness.py, run_all.py, bench_layernorm.py).

They run the real code path in smoke mode on tiny shapes, so a broken harness shows up in CI, not in a paid GPU
session. Nothing here needs vitkern to import: the LayerNorm bench turns a vitkern failure into error rows.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import math
import time
from pathlib import Path

import pytest
import torch

from benchmarks import bench_layernorm, run_all
from vitkern.bench import harness
from vitkern.bench.harness import FWD, FWD_BWD, Benchmark, Case, Context, Peaks, Provider, Timing, Work

CUDA = torch.cuda.is_available()


def _ctx(**kw) -> Context:
    return Context(device="cpu", log=lambda s: None, **kw)


def _inputs(case: Case, device: torch.device) -> dict[str, torch.Tensor]:
    n = case.params["N"]
    return {
        "a": torch.randn(n, device=device, dtype=case.dtype).requires_grad_(case.direction == FWD_BWD),
        "b": torch.randn(n, device=device, dtype=case.dtype),
    }


def _spec(*providers: Provider, directions=(FWD,)) -> Benchmark:
    cases = [Case({"N": 1000}, torch.float32, d) for d in directions]
    return Benchmark(
        "toy", cases, list(providers), _inputs, baseline="eager",
        model=lambda c, p: Work(bytes=3 * 4 * c.params["N"], flops=c.params["N"]),
    )


EAGER = Provider("eager", lambda c, i: (lambda: i["a"] * i["b"]))
ALT = Provider("alt", lambda c, i: (lambda: torch.mul(i["b"], i["a"])))


def test_smoke_end_to_end_writes_json_and_csv(tmp_path: Path) -> None:
    rows = harness.run_benchmark(_ctx(), _spec(EAGER, ALT, directions=(FWD, FWD_BWD)))
    assert [(r.direction, r.provider) for r in rows] == [(d, p) for d in (FWD, FWD_BWD) for p in ("eager", "alt")]
    for r in rows:
        assert r.status == "ok", r.error
        assert r.timer == harness.CPU_TIMER and r.median_ms > 0 and r.p20_ms <= r.p80_ms
        assert r.pct_peak_bw is None and r.gbps is not None  # no peaks in smoke mode
    alt = rows[1]
    assert alt.correct is True and alt.speedup is not None and rows[0].speedup == pytest.approx(1.0)

    meta = harness.collect_metadata("cpu", None, argv=["pytest"])
    json_path, csv_path = harness.write_results(tmp_path, "toy", rows, meta)
    doc = json.loads(json_path.read_text())
    assert doc["schema"] == harness.SCHEMA and doc["bench"] == "toy" and len(doc["rows"]) == 4
    for key in ("device", "sm_count", "torch", "triton", "cuda", "cudnn", "driver", "python", "git_commit",
                "date_utc", "peaks", "command", "smoke", "timer", "triton_configs"):
        assert key in doc["meta"], key
    assert doc["meta"]["triton_configs"].startswith(("autotuned", "first config")), doc["meta"]["triton_configs"]
    assert doc["meta"]["smoke"] is True and doc["meta"]["peaks"] is None and doc["meta"]["command"] == "pytest"
    assert doc["rows"][0]["dtype"] == "float32" and doc["rows"][0]["params"] == {"N": 1000}
    with csv_path.open() as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 4 and table[1]["provider"] == "alt" and table[1]["N"] == "1000"
    assert "median_ms" in table[0] and "error" in table[0]


def test_smoke_results_never_go_into_results_dir() -> None:
    rows = harness.run_benchmark(_ctx(), _spec(EAGER))
    with pytest.raises(ValueError, match="smoke"):
        harness.write_results(harness.RESULTS_DIR / "x", "toy", rows, {"smoke": True})


def test_failing_provider_becomes_error_row() -> None:
    def boom(case, inputs):
        raise RuntimeError("torch.compile exploded\nwith a long traceback")

    late = Provider("late", lambda c, i: (lambda: 1 / 0))
    unsupported = Provider("nope", EAGER.setup, supports=lambda c: "needs sm_90")
    rows = harness.run_benchmark(_ctx(), _spec(EAGER, Provider("boom", boom), late, unsupported, ALT))
    by = {r.provider: r for r in rows}
    assert by["boom"].status == "error" and by["boom"].error == "RuntimeError: torch.compile exploded"
    assert by["late"].status == "error" and "ZeroDivisionError" in by["late"].error
    assert by["nope"].status == "skipped" and "sm_90" in by["nope"].error
    assert by["eager"].status == by["alt"].status == "ok"
    assert by["boom"].median_ms is None and by["boom"].speedup is None
    assert "ERROR" in harness.format_table(rows)


def test_correctness_check_flags_wrong_provider() -> None:
    wrong = Provider("fast-but-wrong", lambda c, i: (lambda: i["a"] * i["b"] * 1.1))
    nan = Provider("nan", lambda c, i: (lambda: i["a"] * i["b"] * torch.nan))
    rows = harness.run_benchmark(_ctx(), _spec(EAGER, wrong, nan, ALT, directions=(FWD, FWD_BWD)))
    for r in rows:
        if r.provider in ("fast-but-wrong", "nan"):
            assert r.status == "wrong" and r.correct is False and "check vs eager" in r.error, r
            assert r.median_ms is not None  # still timed, but flagged
        elif r.provider == "alt":
            assert r.correct is True and r.rel_err < 1e-6
    bwd = [r for r in rows if r.direction == FWD_BWD and r.provider == "fast-but-wrong"][0]
    assert bwd.rel_err == pytest.approx(0.1, rel=1e-3)  # output and da are both 10% off
    assert "WRONG" in harness.format_table(rows)


def test_fwd_bwd_compares_gradients() -> None:
    # same forward values, wrong gradient: only the fwd+bwd check can see it
    class Bad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            ctx.save_for_backward(b)
            return a * b

        @staticmethod
        def backward(ctx, g):
            (b,) = ctx.saved_tensors
            return -g * b, None

    bad = Provider("bad-grad", lambda c, i: (lambda: Bad.apply(i["a"], i["b"])))
    rows = harness.run_benchmark(_ctx(), _spec(EAGER, bad, directions=(FWD, FWD_BWD)))
    assert [r.correct for r in rows if r.provider == "bad-grad"] == [True, False]


def test_gbps_arithmetic_and_percent_of_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    assert harness.gbps(1e9, 1.0) == pytest.approx(1000.0)  # 1 GB in 1 ms = 1 TB/s
    assert harness.tflops(2e12, 2.0) == pytest.approx(1000.0)
    # LayerNorm fwd, M=256*197, N=768, bf16: read x + write y (2 * 50432 * 768 * 2 B) + weight, bias (2 * 768 * 2 B)
    case = Case({"M": 50432, "N": 768}, torch.bfloat16, FWD)
    plain, fused = bench_layernorm.PROVIDERS[0], bench_layernorm.PROVIDERS[4]
    assert bench_layernorm.model(case, plain).bytes == 154_927_104 + 3_072
    assert bench_layernorm.model(case, fused).bytes == 2 * 154_927_104 + 3_072  # + read r, + write s
    # fwd+bwd, tiny: A = 2*4*2 = 16 B, P = 8 B, stats = 16 B -> fwd 48 + 16 + bwd (3A + 3P + 16 = 88) = 152
    tiny = Case({"M": 2, "N": 4}, torch.bfloat16, FWD_BWD)
    assert bench_layernorm.model(tiny, plain).bytes == 152
    # through the harness: 12 kB in 0.001 ms = 12 GB/s, 50% of a 24 GB/s copy peak; 1000 flop -> 1e-3 TFLOP/s
    monkeypatch.setattr(harness, "bench", lambda fn, **kw: (fn(), Timing(0.001, 0.0009, 0.0011, "fake"))[1])
    ctx = _ctx(peaks=Peaks(matmul_tflops=0.004, copy_gbps=24.0, matmul_n=8, copy_bytes=8))
    row = harness.run_benchmark(ctx, _spec(EAGER))[0]
    assert row.bytes == 12_000 and row.gbps == pytest.approx(12.0) and row.pct_peak_bw == pytest.approx(50.0)
    assert row.tflops == pytest.approx(1e-3) and row.pct_peak_flops == pytest.approx(25.0)


def test_time_budget_skips_remaining_cases() -> None:
    ctx = _ctx(deadline=0.0)  # already past
    rows = harness.run_benchmark(ctx, _spec(EAGER, ALT))
    assert {r.status for r in rows} == {"skipped"} and "budget" in rows[0].error


def test_format_table_is_fixed_width() -> None:
    rows = harness.run_benchmark(_ctx(), _spec(EAGER, ALT))
    lines = harness.format_table(rows).splitlines()
    assert lines[0].split()[:3] == ["case", "dtype", "dir"] and len(lines) == 2 + len(rows)
    assert "bench" not in lines[0]  # constant column dropped
    assert harness.format_table([]) == "(no rows)"


def test_compare_edge_cases() -> None:
    a = torch.ones(3)
    assert harness.compare([a], [a], 1e-6)[0]
    assert not harness.compare([a, a], [a], 1e-6)[0]
    assert not harness.compare([torch.ones(4)], [a], 1e-6)[0]
    ok, max_abs, rel, msg = harness.compare([torch.tensor([1.0, math.inf, 1.0])], [a], 1.0)
    assert not ok and "non-finite" in msg


def _timed_row(provider: str, case: str, ms: float, backend: str | None = None, status: str = "ok") -> harness.Row:
    return harness.Row("toy", case, {}, "bfloat16", FWD, provider, "eager", status, median_ms=ms,
                       extra={"backend": backend} if backend else {})


def test_cuda_vs_triton_targets() -> None:
    rows = [_timed_row("vitkern", "a", 1.0, "triton"), _timed_row("vitkern-cuda", "a", 1.05),  # 0.95x: within 10%
            _timed_row("vitkern", "b", 1.0, "triton"), _timed_row("vitkern-cuda", "b", 0.8),  # 1.25x
            _timed_row("vitkern", "c", 1.0, "cuda"), _timed_row("vitkern-cuda", "c", 1.0)]  # no Triton row to compare
    lines = harness.cuda_vs_triton_targets(rows, best_at_least=1.15)
    assert lines[0].startswith("target vitkern-cuda within 10% of Triton or faster at every case: 2/2 cases MET")
    assert "worst 0.95x at a bfloat16 fwd" in lines[0] and "not measured: 1" in lines[0]
    assert lines[1].endswith("1.25x at b bfloat16 fwd MET")
    rows.append(_timed_row("vitkern", "d", 1.0, "triton"))
    rows.append(_timed_row("vitkern-cuda", "d", 1.2))  # 0.83x: outside the bar
    lines = harness.cuda_vs_triton_targets(rows)
    assert "2/3 cases NOT MET" in lines[0] and lines[1] == "  slower than the bar: 0.83x at d bfloat16 fwd"
    assert harness.cuda_vs_triton_targets(rows[:1])[0].endswith("not measured")
    smoke = [dataclasses.replace(rows[0], timer=harness.CPU_TIMER)]
    assert "CPU smoke" in harness.cuda_vs_triton_targets(smoke)[0]


def test_layernorm_bench_smoke() -> None:
    rows = bench_layernorm.run(_ctx())
    providers = [p.name for p in bench_layernorm.PROVIDERS]
    assert len(rows) == len(bench_layernorm.cases(_ctx())) * len(providers)
    assert {r.provider for r in rows} == set(providers)
    for r in rows:
        if r.provider in ("torch", "torch-residual"):
            assert r.status == "ok", r.error
        if r.provider.startswith("torch.compile"):
            assert r.status == "skipped"  # no C++ toolchain build on CI
        if r.provider.startswith("vitkern") and r.status == "ok":  # vitkern may not import yet
            assert r.correct is True and r.extra.get("backend")
    assert "CPU smoke" in bench_layernorm.targets(rows)[0]


@pytest.mark.interpreter
@pytest.mark.parametrize("name", ["attention", "window_attention", "ln_mlp", "linear_residual", "patch_embed"])
def test_op_bench_smoke_and_targets(name: str) -> None:
    """Every op bench runs in smoke mode (its vitkern rows on the Triton interpreter), and its targets() gets
    through timed rows without an exception (made-up times at the smoke shapes, so most targets read "not
    measured": this checks the code path, not a number)."""
    mod = importlib.import_module(f"benchmarks.bench_{name}")
    rows = mod.run(_ctx())
    assert rows and {r.provider for r in rows} == {p.name for p in mod.PROVIDERS}
    bad = [(r.provider, r.case, r.status, r.error) for r in rows if r.status not in ("ok", "skipped")]
    assert not bad, bad
    assert any(r.provider == "vitkern" and r.status == "ok" and r.correct for r in rows)
    assert "CPU smoke" in mod.targets(rows)[0]
    timed = [dataclasses.replace(r, timer=harness.GPU_TIMER, status="ok", error=None, median_ms=1.0 + i / 64,
                                 speedup=1.1, pct_peak_bw=50.0, pct_peak_flops=40.0, tflops=100.0, gbps=1000.0,
                                 extra={**r.extra, "backend": "triton" if r.provider == "vitkern" else "cuda"})
             for i, r in enumerate(rows)]
    lines = mod.targets(timed)
    assert lines and all(isinstance(line, str) and "CPU smoke" not in line for line in lines), lines
    cuda = [line for line in lines if line.startswith("target vitkern-cuda within 10%")]
    assert cuda and "cases" in cuda[0], lines  # the CUDA-vs-Triton comparison found its pairs


def test_run_all_discovers_and_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "layernorm" in run_all.discover()
    bench_dir = tmp_path / "benches"
    bench_dir.mkdir()
    (bench_dir / "bench_toy.py").write_text(
        "import torch\n"
        "from vitkern.bench.harness import Benchmark, Case, Provider, Work, run_benchmark\n"
        "NAME = 'toy'\n"
        "def run(ctx):\n"
        "    cases = [Case({'N': 64}, torch.float32)]\n"
        "    mk = lambda c, d: {'a': torch.randn(c.params['N'], device=d)}\n"
        "    ps = [Provider('eager', lambda c, i: (lambda: i['a'] * 2)),\n"
        "          Provider('alt', lambda c, i: (lambda: i['a'] + i['a']))]\n"
        "    return run_benchmark(ctx, Benchmark(NAME, cases, ps, mk, 'eager', lambda c, p: Work(bytes=512)))\n"
        "def targets(rows):\n"
        "    return ['toy target: not evaluated']\n"
    )
    (bench_dir / "bench_broken.py").write_text("import does_not_exist_anywhere\n")
    (bench_dir / "helper.py").write_text("raise SystemExit('not a bench')\n")
    found = run_all.discover(bench_dir)
    assert sorted(found) == ["broken", "toy"]

    out = tmp_path / "out"
    rc = run_all.main(["--bench-dir", str(bench_dir), "--out", str(out), "--smoke"])
    printed = capsys.readouterr().out
    assert rc == 1  # the broken bench crashed (as a row), the other still ran
    assert (out / "toy.json").exists() and (out / "toy.csv").exists() and (out / "summary.md").exists()
    broken = json.loads((out / "broken.json").read_text())["rows"][0]
    assert broken["status"] == "error" and "ModuleNotFoundError" in broken["error"]
    tail = printed.rstrip().splitlines()
    assert tail[-1] == "- toy target: not evaluated"  # the summary is printed last
    assert "CPU SMOKE RUN" in printed and "RESULTS_DIR=" in printed

    assert run_all.main(["--bench-dir", str(bench_dir), "--only", "toy", "--out", str(tmp_path / "o2"), "--smoke"]) == 0
    assert not (tmp_path / "o2" / "broken.json").exists()
    assert run_all.main(["--bench-dir", str(bench_dir), "--only", "nope", "--smoke"]) == 2
    assert run_all.main(["--smoke", "--out", str(harness.RESULTS_DIR / "smoke")]) == 2


def test_total_budget_gives_every_bench_a_share(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Under --total-budget-s a greedy first bench must not starve the last one (a GPU call has one budget for six
    benches): each gets at most an even share of what is left, and what one leaves unused passes on."""
    bench_dir = tmp_path / "benches"
    bench_dir.mkdir()
    for name, sleep_s in (("a_greedy", 1.5), ("b_quick", 0.0), ("c_last", 0.0)):
        (bench_dir / f"bench_{name}.py").write_text(
            "import time\n"
            f"NAME = {name!r}\n"
            "def run(ctx):\n"
            f"    print('BUDGET', NAME, ctx.budget_s)\n"
            f"    time.sleep(min({sleep_s}, ctx.budget_s))\n"
            "    return []\n"
        )
    assert run_all.main(["--bench-dir", str(bench_dir), "--out", str(tmp_path / "out"), "--smoke",
                         "--total-budget-s", "3"]) == 0
    budgets = {line.split()[1]: float(line.split()[2])
               for line in capsys.readouterr().out.splitlines() if line.startswith("BUDGET ")}
    assert budgets["a_greedy"] == pytest.approx(1.0, abs=0.05)  # 3 s over three benches, not the default 100 s
    # a_greedy used its whole second: 2 s left for two; b_quick used none of its share, so c_last gets all 2 s
    assert budgets["b_quick"] == pytest.approx(1.0, abs=0.1)
    assert budgets["c_last"] == pytest.approx(2.0, abs=0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_peaks_and_timer_on_gpu() -> None:
    peaks = harness.measure_peaks("cuda")
    assert harness.measure_peaks("cuda") is peaks  # cached per process
    assert 100 < peaks.copy_gbps < 20_000 and 10 < peaks.matmul_tflops < 5_000
    x = torch.randn(1 << 24, device="cuda")
    t = harness.bench(lambda: x * 2, warmup_ms=5, rep_ms=20)
    assert 0 < t.p20_ms <= t.median_ms <= t.p80_ms and t.timer == harness.GPU_TIMER


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_harness_end_to_end_on_gpu(tmp_path: Path) -> None:
    ctx = Context(device="cuda", peaks=harness.measure_peaks("cuda"), warmup_ms=2, rep_ms=5, log=lambda s: None)
    rows = harness.run_benchmark(ctx, _spec(EAGER, ALT, directions=(FWD, FWD_BWD)))
    assert all(r.status == "ok" and r.pct_peak_bw is not None and r.timer == harness.GPU_TIMER for r in rows), rows
    meta = harness.collect_metadata("cuda", ctx.peaks, argv=["pytest"])
    assert meta["sm_count"] and meta["device"] != "cpu" and meta["peaks"]["copy_gbps"] > 0
    harness.write_results(tmp_path, "toy", rows, meta)


def test_bench_uses_do_bench_quantiles(monkeypatch: pytest.MonkeyPatch) -> None:
    import triton.testing

    seen = {}

    def fake(fn, warmup, rep, grad_to_none, quantiles):
        seen.update(warmup=warmup, rep=rep, quantiles=quantiles)
        return [2.0, 1.0, 3.0]

    monkeypatch.setattr(triton.testing, "do_bench", fake)
    t = harness.bench(lambda: None, warmup_ms=5, rep_ms=7, device="cuda")  # no CUDA call happens
    assert seen == {"warmup": 5, "rep": 7, "quantiles": [0.5, 0.2, 0.8]}
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.timer) == (2.0, 1.0, 3.0, harness.GPU_TIMER)


# A fake kernel fault: once a "faulting" provider (or make_inputs) ran in this process, the harness's CUDA probe
# reports the context as lost, as it would after an illegal memory access on the GPU.
_FAULT_PRELUDE = (
    "import torch\n"
    "from vitkern.bench import harness\n"
    "from vitkern.bench.harness import Benchmark, Case, Provider, Work, run_benchmark\n"
    "harness._fake_faults = getattr(harness, '_fake_faults', [])\n"
    "harness.cuda_context_lost = lambda: 'AcceleratorError: CUDA error: an illegal memory access' "
    "if harness._fake_faults else None\n"
    "def fault(what):\n"
    "    harness._fake_faults.append(what)\n"
    "    raise RuntimeError('CUDA error: an illegal memory access was encountered')\n"
    "def healthy(c, i):\n"
    "    assert not harness._fake_faults, 'ran in a process whose CUDA context was lost'\n"
    "    return lambda: i['a'] * 2\n"
    "def inputs(c, d):\n"
    "    return {'a': torch.randn(c.params['N'], device=d)}\n"
    "def spec(name, providers, mk=inputs):\n"
    "    cases = [Case({'N': n}, torch.float32) for n in (8, 16)]\n"
    "    return Benchmark(name, cases, providers, mk, 'eager', lambda c, p: Work(bytes=64))\n"
)
_FAULT_BENCHES = {
    "a_before": "NAME = 'a_before'\n"
                "def run(ctx):\n"
                "    return run_benchmark(ctx, spec(NAME, [Provider('eager', healthy)]))\n",
    "b_faulty": "NAME = 'b_faulty'\n"
                "def run(ctx):\n"
                "    ps = [Provider('eager', healthy), Provider('faulty', lambda c, i: fault('faulty')),\n"
                "          Provider('after', healthy)]\n"
                "    return run_benchmark(ctx, spec(NAME, ps))\n",
    "c_inputs": "NAME = 'c_inputs'\n"
                "def run(ctx):\n"
                "    return run_benchmark(ctx, spec(NAME, [Provider('eager', healthy)], lambda c, d: fault('inputs')))\n",
    "d_last": "NAME = 'd_last'\n"
              "def run(ctx):\n"
              "    return run_benchmark(ctx, spec(NAME, [Provider('eager', healthy)]))\n",
}


def _fault_benches(tmp_path: Path) -> Path:
    bench_dir = tmp_path / "benches"
    bench_dir.mkdir()
    for name, body in _FAULT_BENCHES.items():
        (bench_dir / f"bench_{name}.py").write_text(_FAULT_PRELUDE + body)
    return bench_dir


def _rows(out: Path, name: str) -> list[dict]:
    return json.loads((out / f"{name}.json").read_text())["rows"]


def _run_all_process(tmp_path: Path, bench_dir: Path, out: Path, *args: str, timeout: float):
    """``python benchmarks/run_all.py`` as a script from another folder, without PYTHONPATH: its restarts must
    still find ``benchmarks.run_all``."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, str(Path(run_all.__file__).resolve()), "--bench-dir", str(bench_dir),
                           "--out", str(out), "--smoke", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def test_run_all_goes_on_in_a_fresh_process_after_a_lost_cuda_context(tmp_path: Path) -> None:
    """A kernel fault poisons its process's CUDA context: run_all must rerun the bench without the provider that
    faulted and run the later benches in a fresh process, keeping what was done (the first GPU run of never-run
    CUDA code must not lose a whole step of benchmarks to one bad kernel)."""
    bench_dir, out = _fault_benches(tmp_path), tmp_path / "out"
    r = _run_all_process(tmp_path, bench_dir, out, timeout=600)
    printed = r.stdout + r.stderr
    assert r.returncode == 1, printed  # c_inputs crashed (no provider to leave out); everything else ran
    assert printed.count("restarting in a fresh process") == 2, printed
    # the faulty provider is left out of b's rerun, with the reason, and the providers beside it are measured
    b = _rows(out, "b_faulty")
    assert [(r["provider"], r["status"]) for r in b] == [("eager", "ok"), ("faulty", "error"), ("after", "ok")] * 2
    assert all("lost the CUDA context at case" in r["error"] for r in b if r["provider"] == "faulty"), b
    c = _rows(out, "c_inputs")
    assert len(c) == 1 and "making the inputs lost the CUDA context" in c[0]["error"], c
    for name in ("a_before", "d_last"):  # a kept from the first process, d run in the last one
        assert [r["status"] for r in _rows(out, name)] == ["ok", "ok"], name
    summary = (out / "summary.md").read_text()
    assert summary.count("restarted in a fresh process:") == 2 and "'faulty' lost the CUDA context" in summary
    assert not (out / run_all.STATE_FILE).exists()
    assert printed.rstrip().endswith("```"), printed[-500:]  # the summary still comes last


def test_run_all_in_process_stops_using_cuda_after_a_lost_context(tmp_path: Path, monkeypatch) -> None:
    """Called as a function (no restart possible), the benches after the loss are not run, saying why."""
    monkeypatch.setattr(harness, "cuda_context_lost", harness.cuda_context_lost)  # the fake benches patch it
    bench_dir, out = _fault_benches(tmp_path), tmp_path / "out"
    assert run_all.main(["--bench-dir", str(bench_dir), "--out", str(out), "--smoke"]) == 1
    assert [r["status"] for r in _rows(out, "a_before")] == ["ok", "ok"]
    assert "bench crashed" in _rows(out, "b_faulty")[0]["error"]
    for name in ("c_inputs", "d_last"):
        (row,) = _rows(out, name)
        assert row["error"].startswith("not run: the CUDA context was lost in b_faulty"), row


def test_run_all_stops_a_bench_that_overruns_its_budget_and_goes_on(tmp_path: Path) -> None:
    """A compile that takes minutes or a hung kernel must not eat the later benches' time, nor the summary: the
    watchdog keeps the finished cases, records where the bench was and continues in a fresh process."""
    bench_dir, out = tmp_path / "benches", tmp_path / "out"
    bench_dir.mkdir()
    (bench_dir / "bench_a_slow.py").write_text(
        _FAULT_PRELUDE + "NAME = 'a_slow'\n"
        "def stuck(c, i):\n"
        "    if c.params['N'] == 16:\n"
        "        import time\n"
        "        time.sleep(120)  # a compile that never ends, as far as the budget goes\n"
        "    return healthy(c, i)\n"
        "def run(ctx):\n"
        "    import dataclasses\n"
        "    ctx = dataclasses.replace(ctx, rep_ms=ctx.rep_ms)  # as the models bench does: the watchdog still sees it\n"
        "    return run_benchmark(ctx, spec(NAME, [Provider('eager', healthy), Provider('stuck', stuck)]))\n")
    (bench_dir / "bench_b_next.py").write_text(_FAULT_PRELUDE + _FAULT_BENCHES["d_last"].replace("d_last", "b_next"))
    t0 = time.monotonic()
    r = _run_all_process(tmp_path, bench_dir, out, "--budget-s", "1", timeout=100)
    printed = r.stdout + r.stderr
    assert time.monotonic() - t0 < 60, printed  # stopped at the watchdog's limit (3 s), not after the 120 s sleep
    assert r.returncode == 1, printed
    a = _rows(out, "a_slow")
    assert [(r["case"], r["provider"], r["status"]) for r in a[:2]] == [("N=8", "eager", "ok"), ("N=8", "stuck", "ok")]
    assert len(a) == 3 and a[2]["status"] == "error", a
    assert "stopped" in a[2]["error"] and "case N=16 float32 fwd, provider 'stuck'" in a[2]["error"], a[2]
    assert [r["status"] for r in _rows(out, "b_next")] == ["ok", "ok"]
    assert "restarted in a fresh process: a_slow: stopped" in (out / "summary.md").read_text()
