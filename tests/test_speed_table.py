"""The measured speed table: the dispatcher tries the measured winner first and says why; the table's writer
(benchmarks/make_speed_table.py) pairs CUDA and Triton rows into the same shape classes the dispatcher computes.

CPU-only: problems are built with device "cuda" by hand (or replaced from real CPU problems) and the device name
lookup is monkeypatched, since the table applies per GPU model.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch

import vitkern
from vitkern.bench import harness
from benchmarks import make_speed_table as mst
from vitkern import dispatch
from vitkern.backends import speed_table as st

OP = "speedtest"  # a fake op with fake backends: the real CUDA backends cannot accept anything on CPU
H100 = "NVIDIA H100 80GB HBM3"


class _Fake(dispatch.Backend):
    def __init__(self, name: str, rank: int):
        self.name, self.cuda_rank, self.rejects = name, rank, []

    def reject_reasons(self, problem):
        return list(self.rejects)


@pytest.fixture
def fake(monkeypatch):
    """Op ``speedtest`` (shape class: width) with reference / triton / cuda backends, on a fake H100."""
    table = {"reference": _Fake("reference", 1000), "triton": _Fake("triton", 10), "cuda": _Fake("cuda", 20)}
    monkeypatch.setitem(dispatch._REGISTRY, OP, table)
    monkeypatch.setitem(st.CLASS_KEYS, OP, ("width",))
    monkeypatch.setitem(st.PROBLEM_DIMS, OP, lambda p: {"width": p.shape("x")[-1]})
    monkeypatch.setattr(st, "device_name", lambda index: H100)
    monkeypatch.delenv(dispatch.ENV_BACKEND, raising=False)
    st._TABLES.clear()
    dispatch._choice_cache.clear()
    yield table
    st._TABLES.clear()
    dispatch._choice_cache.clear()


def problem(width=768, dtype=torch.bfloat16, direction=dispatch.FORWARD, device="cuda"):
    return dispatch.Problem(OP, direction, device, dtype, (("x", (64, width)),), (("device_index", 0),))


def entry(backend="cuda", over="triton", speedup=1.23, shape_class="width=768", op=OP, direction="fwd",
          device="H100", dtype="bfloat16"):
    return st.Entry(op, direction, device, dtype, shape_class, backend, over, speedup, H100,
                    {"results": "benchmarks/results/2026-01-01_h100_abc/x.json", "commit": "abc1234def567890"},
                    {"case": {"cuda_ms": 1.0, "triton_ms": 1.23}})


def use_table(monkeypatch, tmp_path, *entries, name="table.json"):
    path = tmp_path / name
    path.write_text(json.dumps(mst.table_doc(list(entries)), indent=1))
    monkeypatch.setenv(st.ENV_SPEED_TABLE, str(path))
    return path


# ----------------------------------------------------------------------------------------------- the dispatcher
def test_backend_settings_key_the_choice_cache_and_show_in_explain(fake):
    """A backend setting outside the Problem (the CUDA attention kernel choice) can change what the backend
    accepts: a cached choice made under another setting must not be reused, and the chosen backend's settings are
    shown next to it."""
    fake["triton"].rejects = ["not this one"]
    setting = {"value": ()}
    fake["cuda"].settings = lambda: setting["value"]
    fake["cuda"].reject_reasons = lambda p: ["kernel k2 cannot run here"] if ("kernel", "k2") in setting["value"] else []
    first = dispatch.select(problem())
    assert first.backend_name == "cuda" and "-> cuda: " in str(first)
    setting["value"] = (("kernel", "k2"),)
    second = dispatch.select(problem())
    assert second.backend_name == "reference" and "kernel k2 cannot run here" in str(second)
    setting["value"] = (("kernel", "k1"),)
    third = dispatch.select(problem())
    assert third.backend_name == "cuda" and "-> cuda [kernel=k1]: " in str(third)


def test_measured_winner_is_chosen_and_explained(fake, monkeypatch, tmp_path):
    use_table(monkeypatch, tmp_path, entry())
    choice = dispatch.select(problem())
    assert choice.backend_name == "cuda" and choice.considered == ["cuda", "triton", "reference"]
    assert choice.why == ("measured faster for this shape class (width=768) on NVIDIA H100 80GB HBM3 (1.23x over "
                          "triton; benchmarks/results/2026-01-01_h100_abc/x.json, commit abc1234def56)")
    assert "triton: supported, lower preference" in str(choice)
    # no entry for: another class, dtype, direction, GPU model, or a CPU problem -> rank order, today's reason
    for p in (problem(1024), problem(dtype=torch.float16), problem(direction=dispatch.BACKWARD)):
        c = dispatch.select(p)
        assert c.backend_name == "triton" and c.why.startswith("first supported backend in preference order")
    assert dispatch.select(problem(device="cpu")).backend_name == "reference"
    monkeypatch.setattr(st, "device_name", lambda index: "NVIDIA H200")
    st.reset()
    assert dispatch.select(problem()).backend_name == "triton"


def test_triton_win_is_cited(fake, monkeypatch, tmp_path):
    use_table(monkeypatch, tmp_path, entry("triton", "cuda", 1.4))
    choice = dispatch.select(problem())
    assert choice.backend_name == "triton" and choice.considered == ["triton", "cuda", "reference"]
    assert choice.why.startswith("measured faster for this shape class (width=768)") and "1.40x over cuda" in choice.why


def test_rejecting_winner_falls_back_to_rank_order(fake, monkeypatch, tmp_path):
    use_table(monkeypatch, tmp_path, entry())
    fake["cuda"].rejects = ["head_dim 48 not supported"]
    choice = dispatch.select(problem())
    assert choice.backend_name == "triton"
    assert choice.why == ("first supported backend in preference order (triton > cuda > reference) for device cuda; "
                          "the speed table prefers 'cuda' for width=768, but it rejected this call")
    assert "cuda: rejected: head_dim 48 not supported" in str(choice)
    del fake["cuda"]  # a table naming a backend the op does not have
    dispatch._choice_cache.clear()
    choice = dispatch.select(problem())
    assert choice.backend_name == "triton" and "but the op lacks it" in choice.why


def test_forcing_beats_the_table(fake, monkeypatch, tmp_path):
    use_table(monkeypatch, tmp_path, entry())
    with vitkern.use_backend("triton", op=OP):
        choice = dispatch.select(problem())
        assert choice.backend_name == "triton" and choice.why == "forced by use_backend()"
    monkeypatch.setenv(dispatch.ENV_BACKEND, f"{OP}=reference")
    assert dispatch.select(problem()).backend_name == "reference"
    monkeypatch.delenv(dispatch.ENV_BACKEND)
    fake["reference"].rejects = ["nope"]
    with vitkern.use_backend("reference", op=OP, strict=False):  # not strict and rejected: the table decides
        choice = dispatch.select(problem())
        assert choice.backend_name == "cuda" and choice.why.startswith("measured faster")
        assert "use_backend() prefers 'reference' (not strict) but it rejected this call" in choice.why
    with vitkern.use_backend("reference", op=OP), pytest.raises(vitkern.BackendError, match="nope"):
        dispatch.select(problem())


def test_empty_missing_or_disabled_table_keeps_rank_order(fake, monkeypatch, tmp_path, caplog):
    measured = use_table(monkeypatch, tmp_path, entry())
    assert dispatch.select(problem()).backend_name == "cuda"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "something-else", "entries": []}))
    specs = ["0", "off", str(tmp_path / "missing.json"), str(bad), str(use_table(monkeypatch, tmp_path, name="e.json"))]
    for spec in specs:
        monkeypatch.setenv(st.ENV_SPEED_TABLE, spec)
        with caplog.at_level(logging.WARNING, logger="vitkern.dispatch"):
            choice = dispatch.select(problem())  # the cache key includes the table: no stale "cuda" choice
        assert choice.backend_name == "triton", spec
        assert choice.why == "first supported backend in preference order (triton > cuda > reference) for device cuda"
    assert "missing.json" in caplog.text and "bad.json" in caplog.text  # told, not raised
    monkeypatch.setenv(st.ENV_SPEED_TABLE, str(measured))
    assert dispatch.select(problem()).backend_name == "cuda"


def test_packaged_table_loads(monkeypatch):
    monkeypatch.delenv(st.ENV_SPEED_TABLE, raising=False)
    st._TABLES.clear()
    table = st.active()
    assert table.path == str(st.DEFAULT_PATH) and table.doc["schema"] == st.SCHEMA
    for e in table.entries.values():  # every committed entry names its measurement
        assert e.source.get("results") and e.source.get("commit") and e.cases, e.key


def test_real_op_on_cpu_is_unchanged(monkeypatch, tmp_path):
    """A table entry for the problem's class on a (fake) H100 does not touch CPU calls."""
    monkeypatch.setattr(st, "device_name", lambda index: H100)
    use_table(monkeypatch, tmp_path, entry(op="layer_norm", shape_class="width=192", dtype="float32"))
    dispatch._choice_cache.clear()
    x = torch.randn(4, 192)
    choice = vitkern.explain("layer_norm", x, 192)
    assert choice.backend_name == "reference" and choice.why.startswith("first supported backend")
    st._TABLES.clear()
    dispatch._choice_cache.clear()


def test_device_key():
    assert st.device_key("NVIDIA H100 80GB HBM3") == st.device_key("NVIDIA H100 PCIe") == "H100"
    assert st.device_key("NVIDIA H200") == "H200" and st.device_key("NVIDIA GH200 480GB") == "GH200"
    assert st.device_key("NVIDIA A100-SXM4-80GB") == "A100" and st.device_key("") == ""


# ----------------------------------------------------------------------------------------------- shape classes
def _class(op, *args, **kwargs):
    return st.problem_class(vitkern.explain(op, *args, **kwargs).problem)


def test_shape_classes_of_real_problems():
    r = torch.randn
    for n, bucket in ((50, 64), (197, 256), (257, 512), (577, 1024), (1025, 2048)):
        assert _class("attention", qkv=r(1, n, 3 * 2 * 64), num_heads=2) == f"head_dim=64,seq<={bucket}"
    assert _class("attention", qkv=r(1, 7, 3 * 2 * 80), num_heads=2) == "head_dim=80,seq<=64"
    assert _class("window_attention", r(2, 14, 14, 3 * 2 * 32), r(169, 2), 2, 7, 3) == "window_tokens=49,head_dim=32"
    assert _class("window_attention", r(1, 16, 16, 3 * 4 * 32), r(225, 4), 4, 8, 0) == "window_tokens=64,head_dim=32"
    w, b = torch.ones(384), torch.zeros(384)
    assert _class("layer_norm", r(4, 384), 384, w, b) == "width=384"
    assert _class("layer_norm", r(4, 384), 384, w, b, residual=r(4, 384)) == "width=384,residual"
    d = 32
    mlp = (r(4, d), torch.ones(d), torch.zeros(d), r(4 * d, d), torch.zeros(4 * d), r(d, 4 * d), torch.zeros(d))
    assert _class("ln_mlp", *mlp) == "width=32"
    assert _class("ln_linear", *mlp[:3], r(3 * d, d), torch.zeros(3 * d)) == "width=32"
    assert _class("linear_residual", r(4, 48), r(d, 48), None, r(4, d)) == "width=48"  # the GEMM's input width
    assert _class("patch_embed", r(2, 3, 32, 32), r(48, 3, 16, 16), torch.zeros(48)) == "patch=16,width=48"
    assert _class("patch_embed", r(2, 3, 32, 32), r(48, 3, 8, 8), torch.zeros(48)) == "patch=8,width=48"
    # the direction does not change the class: the backward's problem has the forward's shapes
    p = vitkern.explain("layer_norm", r(4, 384), 384, w, b).problem
    assert st.problem_class(p._replace(direction=dispatch.BACKWARD)) == "width=384"
    with pytest.raises(ValueError, match="dims"):
        st.shape_class("attention", {"head_dim": 64})


def test_bench_cases_map_to_the_dispatchers_classes():
    """make_speed_table's case -> class equals the class of the problem the bench's call dispatches."""
    r = torch.randn
    wa = vitkern.explain("window_attention", r(2, 14, 14, 3 * 2 * 32), r(169, 2), 2, 7, 3)
    cases = {  # bench: (params as the bench records them, the vitkern row's extra, the problem's class)
        "attention": ({"shape": "tiny", "B": 2, "H": 2, "N": 197, "D": 64}, {},
                      _class("attention", qkv=r(2, 197, 3 * 2 * 64), num_heads=2)),
        "window_attention": ({"B": 2, "HW": 14, "heads": 2, "D": 32, "ws": 7, "shift": 3}, {},
                             st.problem_class(wa.problem)),
        "layernorm": ({"M": 64, "N": 768}, {}, _class("layer_norm", r(64, 768), 768)),
        "ln_mlp": ({"M": 64, "D": 32}, {}, _class("ln_mlp", r(64, 32), None, None, r(128, 32), None, r(32, 128), None)),
        "linear_residual": ({"M": 64, "D": 32}, {}, _class("linear_residual", r(64, 32), r(32, 32), None, r(64, 32))),
        "patch_embed": ({"B": 2, "img": 32, "p": 8, "D": 32}, {},
                        _class("patch_embed", r(2, 3, 32, 32), r(32, 3, 8, 8), torch.zeros(32))),
    }
    assert set(cases) == set(mst.BENCHES)
    for bench, (params, extra, want) in cases.items():
        m = mst.BENCHES[bench]
        got = st.shape_class(m.op, {**m.dims(params, {"extra": extra}), **m.pairs[0][2]})
        assert got == want, bench
    with pytest.raises(KeyError, match="D"):  # no silent guess of the window bench's head dim
        mst.BENCHES["window_attention"].dims({"B": 2, "HW": 14, "heads": 2, "ws": 7, "shift": 3}, {"extra": {}})


# ----------------------------------------------------------------------------------------------- make_speed_table
META = {"device": H100, "smoke": False, "timer": harness.GPU_TIMER, "git_commit": "0123456789abcdef0123",
        "git_dirty": False, "date_utc": "2026-01-02T00:00:00+00:00"}


def row(bench, params, provider, ms, direction=harness.FWD, backend=None, status=harness.OK, spread=0.005, **kw):
    extra = {"backend": backend or ("cuda" if "cuda" in provider else "triton")}
    timed = dict(median_ms=ms, p20_ms=ms * (1 - spread), p80_ms=ms * (1 + spread)) if ms is not None else {}
    return harness.Row(bench, " ".join(f"{k}={v}" for k, v in params.items()), params, "bfloat16", direction,
                       provider, "sdpa", status, extra=extra, **timed, **kw)


def attention_rows():
    def case(n, d, cuda, triton, **kw):
        p = {"shape": f"n{n}", "B": 8, "H": 12, "N": n, "D": d}
        return [row("attention", p, "sdpa", 2.0), row("attention", p, "vitkern", triton, **kw),
                row("attention", p, "vitkern-cuda", cuda),
                row("attention", p, "vitkern", 3 * triton, harness.FWD_BWD),  # fwd+bwd: no bwd entries (fwd-only)
                row("attention", p, "vitkern-cuda", 2 * cuda, harness.FWD_BWD)]

    return (case(197, 64, 1.0, 1.23) + case(577, 64, 1.0, 1.02)  # CUDA wins; within the margin
            + case(1025, 64, 1.5, 1.0)  # Triton wins
            + case(257, 80, 1.0, 1.2) + case(300, 80, 1.2, 1.0)  # one class (seq<=512), cases disagree
            + case(50, 64, 1.0, 1.5, backend="cuda"))  # the vitkern row did not run Triton


def layernorm_rows():
    out = []
    for provider, residual in (("vitkern", False), ("vitkern-residual", True)):
        cuda = provider.replace("vitkern", "vitkern-cuda")
        p = {"M": 50432, "N": 768}
        out += [row("layernorm", p, provider, 1.1), row("layernorm", p, cuda, 1.0),
                row("layernorm", p, provider, 3.0, harness.FWD_BWD), row("layernorm", p, cuda, 2.0, harness.FWD_BWD)]
        p = {"M": 50432, "N": 384}  # overlapping spreads: noise, no entry
        out += [row("layernorm", p, provider, 1.1, spread=0.1), row("layernorm", p, cuda, 1.0, spread=0.1)]
        p = {"M": 50432, "N": 1024}  # CUDA errored
        out += [row("layernorm", p, provider, 1.1), row("layernorm", p, cuda, None, status=harness.ERROR)]
    return out


def write(tmp_path, name, rows, **meta):
    harness.write_results(tmp_path / "results", name, rows, {**META, **meta})
    return tmp_path / "results"


def test_make_speed_table_builds_winners_by_margin(tmp_path, capsys):
    results = write(tmp_path, "attention", attention_rows())
    write(tmp_path, "layernorm", layernorm_rows())
    out = tmp_path / "speed_table.json"
    assert mst.main([str(results), "--out", str(out)]) == 0
    table = st.load(out)
    got = {k: (e.backend, round(e.speedup, 3)) for k, e in table.entries.items()}
    assert got == {
        ("attention", "fwd", "H100", "bfloat16", "head_dim=64,seq<=256"): ("cuda", 1.23),
        ("attention", "fwd", "H100", "bfloat16", "head_dim=64,seq<=2048"): ("triton", 1.5),
        ("layer_norm", "fwd", "H100", "bfloat16", "width=768"): ("cuda", 1.1),
        ("layer_norm", "bwd", "H100", "bfloat16", "width=768"): ("cuda", 1.9),  # (3.0 - 1.1) / (2.0 - 1.0)
        ("layer_norm", "fwd", "H100", "bfloat16", "width=768,residual"): ("cuda", 1.1),
        ("layer_norm", "bwd", "H100", "bfloat16", "width=768,residual"): ("cuda", 1.9),
    }
    e = table.entries[("attention", "fwd", "H100", "bfloat16", "head_dim=64,seq<=256")]
    assert e.over == "triton" and e.device_name == H100 and e.source["commit"] == META["git_commit"]
    assert e.source["results"].endswith("results/attention.json") and len(e.cases) == 1
    err = capsys.readouterr().err
    assert "ran backend 'cuda', not triton" in err and "VITKERN_SPEED_TABLE=0" in err  # the n50 case
    assert "head_dim=80,seq<=512" in err and "no backend wins every case" in err
    assert "vitkern-cuda error" in err
    # a smaller margin admits the 2% win (spreads of 0.5% do not overlap)
    assert mst.main([str(results), "--out", str(out), "--margin", "0.01"]) == 0
    assert ("attention", "fwd", "H100", "bfloat16", "head_dim=64,seq<=1024") in st.load(out).entries


def test_make_speed_table_refuses_untuned_results(tmp_path, capsys):
    out = tmp_path / "speed_table.json"
    untuned = write(tmp_path, "attention", attention_rows(),
                    triton_configs="first config of each launcher, not tuned (VITKERN_AUTOTUNE=0)")
    assert mst.main([str(untuned), "--out", str(out)]) == 2 and not out.exists()
    assert "VITKERN_AUTOTUNE=0" in capsys.readouterr().err


def test_make_speed_table_refuses_smoke_results(tmp_path, capsys):
    out = tmp_path / "speed_table.json"
    smoke_rows = [dataclasses.replace(r, timer=harness.CPU_TIMER) for r in attention_rows()]
    smoke = write(tmp_path, "attention", smoke_rows, smoke=True, device="cpu (x86_64)", timer=harness.CPU_TIMER)
    assert mst.main([str(smoke), "--out", str(out)]) == 2 and not out.exists()
    assert "smoke" in capsys.readouterr().err
    mixed = attention_rows()
    mixed[1] = dataclasses.replace(mixed[1], timer=harness.CPU_TIMER)  # one CPU-timed row in a GPU file
    path = tmp_path / "mixed"
    harness.write_results(path, "attention", mixed, META)
    assert mst.main([str(path / "attention.json"), "--out", str(out)]) == 2 and not out.exists()


def test_make_speed_table_newest_wins_and_merge(tmp_path):
    old = tmp_path / "old"
    harness.write_results(old, "attention", attention_rows(), {**META, "date_utc": "2026-01-01T00:00:00+00:00"})
    p = {"shape": "vit_b", "B": 8, "H": 12, "N": 197, "D": 64}  # newer run: Triton now wins this class
    newer = [row("attention", p, "vitkern", 1.0), row("attention", p, "vitkern-cuda", 1.3)]
    new = tmp_path / "new"
    harness.write_results(new, "attention", newer, {**META, "git_commit": "fedcba"})
    key = ("attention", "fwd", "H100", "bfloat16", "head_dim=64,seq<=256")
    doc = mst.build([new, old])  # argument order does not matter: meta.date_utc does
    entries = {tuple(e[k] for k in st.ENTRY_FIELDS[:5]): e for e in doc["entries"]}
    assert entries[key]["backend"] == "triton" and entries[key]["source"]["commit"] == "fedcba"
    assert len(doc["sources"]) == 2
    out = tmp_path / "t.json"
    assert mst.main([str(old), "--out", str(out)]) == 0
    assert mst.main([str(new), "--out", str(out), "--merge"]) == 0  # keeps the seq<=2048 entry of the old run
    merged = st.load(out).entries
    assert merged[key].backend == "triton" and key[:4] + ("head_dim=64,seq<=2048",) in merged
    assert mst.main([str(new), "--out", str(out)]) == 0  # without --merge: only what these results measure
    assert list(st.load(out).entries) == [key]


def test_generated_table_drives_a_real_op(tmp_path, monkeypatch):
    """End to end: a table built from result files puts CUDA first for a real attention problem on a (fake) H100;
    on this CPU machine the CUDA backend then rejects the call and the rank order takes over, saying so."""
    results = write(tmp_path, "attention", attention_rows())
    out = tmp_path / "speed_table.json"
    assert mst.main([str(results), "--out", str(out)]) == 0
    monkeypatch.setenv(st.ENV_SPEED_TABLE, str(out))
    monkeypatch.setattr(st, "device_name", lambda index: H100)
    st._TABLES.clear()
    dispatch._choice_cache.clear()
    p = vitkern.explain("attention", qkv=torch.randn(2, 197, 3 * 2 * 64, dtype=torch.bfloat16), num_heads=2).problem
    p = p._replace(device="cuda", attrs=p.attrs + (("device_index", 0),))
    assert st.lookup(p).backend == "cuda"
    choice = dispatch.select(p)
    assert choice.considered[0] == "cuda" and "cuda" in choice.rejected
    assert "the speed table prefers 'cuda' for head_dim=64,seq<=256, but it rejected this call" in choice.why
    st._TABLES.clear()
    dispatch._choice_cache.clear()
