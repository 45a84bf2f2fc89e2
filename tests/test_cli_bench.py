"""`vitkern.models` (name -> random-init model), `vitkern bench`, `vitkern parity` and benchmarks/bench_models.py.

Everything runs on tiny configs; `bench` is exercised in its CPU smoke mode only (it refuses to time on the CPU
otherwise), and the end-to-end benchmark's target verdicts are checked on synthetic rows.
"""

from __future__ import annotations

import copy
import json
import socket
import xml.etree.ElementTree as ET

import pytest
import torch

from vitkern import cli, models, parity

CUDA = torch.cuda.is_available()

TINY_VIT = dict(img_size=32, depth=2, embed_dim=32, num_heads=2)
TINY = {  # name -> (kwargs, expected block paths)
    "vit_tiny_patch16_224": (TINY_VIT, ["blocks.0", "blocks.1"]),
    "timm:deit_tiny_distilled_patch16_224": (TINY_VIT, ["blocks.0", "blocks.1"]),
    "swin_tiny_patch4_window7_224": (dict(img_size=64, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4),
                                     [f"layers.{i}.blocks.{j}" for i in (0, 1) for j in (0, 1)]),
    "torchvision:vit_b_16": (dict(img_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64),
                             ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"]),
    "torchvision:swin_t": (dict(img_size=40, embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=[4, 4]),
                           ["features.0", "features.1.0", "features.1.1", "features.2", "features.3.0",
                            "features.3.1"]),
    "hf:google/vit-base-patch16-224": (dict(img_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=64), None),
    "hf:deit-base-distilled-patch16-224": (dict(img_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, intermediate_size=64), None),
    "hf:swin-tiny-patch4-window7-224": (dict(img_size=32, embed_dim=16, depths=[2, 2], num_heads=[1, 2],
                                             window_size=4), None),
    "hf:dinov2-small": (dict(img_size=28, hidden_size=32, num_hidden_layers=2, num_attention_heads=2), None),
    "reference:vit_tiny_patch16_224": (dict(img_size=32, depth=2), ["blocks.0", "blocks.1"]),
    "reference:swin_tiny_patch4_window7_224": (dict(img_size=64, embed_dim=16, depths=(2, 2), num_heads=(1, 2),
                                                    window_size=4), None),
}


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: model creation must never download."""
    def refuse(*args, **kwargs):
        raise AssertionError("model creation tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --------------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("name", sorted(TINY))
def test_create_model_every_prefix(name, no_network):
    kwargs, paths = TINY[name]
    kwargs = dict(kwargs)
    img = kwargs.pop("img_size")
    built = models.create_model(name, img_size=img, **kwargs)
    assert built.source == (name.split(":")[0] if ":" in name else "timm")
    assert built.img_size == img and built.num_classes == 1000 and not built.module.training
    x = built.example_input(2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = built.forward(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 1000) and torch.isfinite(y).all()
    blocks = parity.block_paths(built.module)
    assert len(blocks) >= 2, blocks
    if paths is not None:
        assert blocks == paths


def test_create_model_dtype_device_and_hf_org_prefix():
    built = models.create_model("hf:facebook/dinov2-small", img_size=28, dtype=torch.float16, device="cpu",
                                hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    assert built.arch == "dinov2-small" and next(built.module.parameters()).dtype == torch.float16


@pytest.mark.parametrize("name, match", [
    ("foo:vit_base_patch16_224", r"unknown model source 'foo'.*timm.*torchvision:NAME.*hf:NAME.*reference:NAME"),
    ("timm:not_a_model_xyz", r"unknown timm model.*accepted names"),
    ("hf:vit-tiny-unknown", r"unknown hf model.*vit-base-patch16-224.*accepted names"),
    ("torchvision:resnet_nope", r"unknown torchvision model"),
    ("reference:nope", r"unknown reference model.*vit_base_patch16_224"),
    ("", r"non-empty string"),
])
def test_unknown_model_names_list_what_is_accepted(name, match):
    with pytest.raises(ValueError, match=match):
        models.create_model(name)


def test_logits_unwraps_outputs_and_kwargs_parse():
    t = torch.randn(2, 3)
    assert models.logits(t) is t and models.logits((t, None)) is t
    assert models.logits(type("Out", (), {"logits": t})()) is t
    with pytest.raises(TypeError, match="logits"):
        models.logits({"x": t})
    kw = models.parse_kwargs(["depth=2", "depths=(2, 2)", "act=gelu"])
    assert kw == {"depth": 2, "depths": (2, 2), "act": "gelu"}
    assert models.parse_kwargs(models.format_kwargs(kw)) == kw
    with pytest.raises(ValueError, match="KEY=VALUE"):
        models.parse_kwargs(["depth"])


def test_disable_stochastic_depth_zeroes_every_drop():
    built = models.create_model("torchvision:swin_t", img_size=40, embed_dim=16, depths=[2, 2], num_heads=[1, 2],
                                window_size=[4, 4], dropout=0.1, attention_dropout=0.1)
    assert models.disable_stochastic_depth(built.module) >= 3
    probs = [getattr(m, a) for m in built.module.modules() for a in ("p", "drop_prob", "dropout")
             if isinstance(getattr(m, a, None), float)]
    assert probs and all(p == 0.0 for p in probs)
    assert models.disable_stochastic_depth(built.module) == 0


# --------------------------------------------------------------------------------------------------- parity
def _tiny_vit(seed: int = 0):
    torch.manual_seed(seed)
    built = models.create_model("vit_tiny_patch16_224", img_size=32, depth=2, embed_dim=32, num_heads=2)
    with torch.no_grad():
        for p in built.module.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x = built.example_input(2, generator=torch.Generator().manual_seed(seed))
    return built, (lambda m: models.logits(m(x.to(next(m.parameters()).dtype))))


def test_parity_cli_prints_per_block_rows(capsys):
    rc = cli.main(["parity", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--model-arg", "depth=2",
                   "--model-arg", "embed_dim=32", "--model-arg", "num_heads=2", "--dtype", "fp16"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.splitlines()
    head = next(line for line in lines if line.startswith("block"))
    for col in ("fp16 |opt-orig|", "fp16 status", "fp32 |opt-orig|", "fp32 bound"):
        assert col in head
    for path in ("blocks.0", "blocks.1", "logits"):
        row = next(line for line in lines if line.startswith(path + " "))
        assert row.split()[-1] == "ok" and row.split()[-6] == "ok", row  # fp16 and fp32 status
        diff32 = float(row.split()[-5])
        assert diff32 < 1e-4  # fp32: the optimized model matches the original to rounding
    assert "swapped" in out and "3 of 3 blocks within bounds" in out


@pytest.mark.parametrize("wrong", ["perturbed_output", "wrong_weights"])
def test_block_parity_flags_a_wrong_block(monkeypatch, wrong):
    """The per-block table must catch a wrong swap at the block where it happens (and not before)."""
    built, run = _tiny_vit()
    real = parity.optimize

    def bad_optimize(model, **kw):
        report = real(model, **kw)
        if wrong == "perturbed_output":  # a kernel ~1e-3 off in one block (not a pure scale: the final LN would
            model.blocks[1].register_forward_hook(lambda m, a, out: out + 1e-3 * torch.sin(7 * out))  # remove it)
        else:  # a swap that wired in the wrong block's parameters
            model.blocks[1] = copy.deepcopy(model.blocks[0])
        return report

    monkeypatch.setattr(parity, "optimize", bad_optimize)
    rows, _, _ = parity.model_block_parity(built.module, run, [torch.float32])
    status = {r.path: r.errors["fp32"].status for r in rows}
    assert status["blocks.0"] == "ok", status
    assert status["blocks.1"].startswith("FAIL") and status["logits"].startswith("FAIL"), status


def test_block_parity_missing_and_reshaped_outputs():
    ref = torch.randn(2, 3, dtype=torch.float64)
    assert parity.compare_block("b", ref, ref.float(), None).status.startswith("FAIL: no output")
    assert parity.compare_block("b", ref, ref.float(), torch.zeros(3, 2)).status.startswith("FAIL: shape")
    assert parity.compare_block("b", None, None, ref.float()).status.startswith("n/a")
    ok = parity.compare_block("b", ref, ref.float(), ref.float())
    assert ok.status == "ok" and ok.diff == 0.0


def test_parity_cli_exits_1_on_a_wrong_block(monkeypatch, capsys):
    real = parity.optimize

    def bad_optimize(model, **kw):
        report = real(model, **kw)
        model.blocks[0].register_forward_hook(lambda m, a, out: out + 1e-2)
        return report

    monkeypatch.setattr(parity, "optimize", bad_optimize)
    rc = cli.main(["parity", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--model-arg", "depth=1"])
    out = capsys.readouterr().out
    assert rc == 1 and "FAILED: blocks.0" in out


# --------------------------------------------------------------------------------------------------- bench CLI
@pytest.mark.skipif(CUDA, reason="checks the refusal without a GPU")
def test_bench_refuses_on_cpu(tmp_path, capsys):
    rc = cli.main(["bench", "--model", "vit_tiny_patch16_224", "--batch", "2", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "performance numbers come only from GPU measurements" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv, match", [
    (["--batch", "0"], "--batch must be positive"),
    (["--batch", "a,b"], "--batch must be positive"),
    (["--modes", "eager,fast"], "--modes must be"),
    (["--model", "nope:x"], "unknown model source"),
    (["--model", "timm:not_a_model_xyz"], "unknown timm model"),
    (["--amp", "--dtype", "bf16"], "--amp times the fp32 model under bf16 autocast"),
])
def test_bench_rejects_bad_arguments(argv, match, capsys):
    flags = [a for a in argv if a == "--amp"]  # valueless
    argv = [a for a in argv if a != "--amp"]
    base = {"--model": "vit_tiny_patch16_224", "--batch": "2", "--modes": "eager"}
    base.update(dict(zip(argv[::2], argv[1::2])))
    rc = cli.main(["bench", "--allow-cpu", *flags, *[a for kv in base.items() for a in kv]])
    assert rc == 2 and match in capsys.readouterr().err


def _smoke_bench(tmp_path, *extra):
    out = tmp_path / "res"
    rc = cli.main(["bench", "--model", "vit_tiny_patch16_224", "--allow-cpu", "--dtype", "fp32", "--img-size", "32",
                   "--model-arg", "depth=1", "--model-arg", "embed_dim=32", "--model-arg", "num_heads=2",
                   "--out", str(out), *extra])
    return rc, out


@pytest.mark.skipif(CUDA, reason="CPU smoke mode")
def test_bench_cpu_smoke_writes_json_svg_and_table(tmp_path, capsys):
    rc, out = _smoke_bench(tmp_path, "--batch", "1,2", "--modes", "eager,vitkern,compile")
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "cpu smoke, not a measurement" in printed
    header = next(line for line in printed.splitlines() if line.lstrip().startswith("B "))
    for col in ("B", "task", "mode", "ms", "img/s", "vs eager", "vs compile", "peak MiB", "check"):
        assert col in header
    doc = json.loads((out / "bench.json").read_text())
    assert doc["meta"]["note"] == "cpu smoke, not a measurement" and doc["meta"]["smoke"] is True
    assert "partial" not in doc["meta"]
    rows = {(r["params"]["B"], r["provider"]): r for r in doc["rows"]}
    assert sorted(rows) == [(b, p) for b in (1, 2) for p in ("compile", "eager", "vitkern")]
    for b in (1, 2):
        assert rows[(b, "eager")]["status"] == "ok" and rows[(b, "eager")]["extra"]["img_per_s"] > 0
        vk = rows[(b, "vitkern")]
        assert vk["status"] == "ok" and vk["correct"] is True and vk["extra"]["swapped"] >= 2
        assert rows[(b, "compile")]["status"] == "skipped"  # no torch.compile in CPU smoke mode
    svg = ET.parse(out / "throughput.svg").getroot()
    ns = "{http://www.w3.org/2000/svg}"
    assert len(svg.findall(f"{ns}polyline")) == 2  # eager and vitkern, two batch sizes each
    assert {t.text for t in svg.findall(f"{ns}text")} >= {"eager", "vitkern", "1", "2", "batch size"}
    assert str(out / "throughput.svg") in printed and "wrote:" in printed
    from PIL import Image

    with Image.open(out / "throughput.png") as png:  # matplotlib's or Pillow's: a real image of the chart's size
        assert png.format == "PNG" and png.size[0] >= 600 and len(_colors(png)) > 3


@pytest.mark.skipif(CUDA, reason="CPU smoke mode")
def test_bench_cpu_smoke_training_step(tmp_path, capsys):
    rc, out = _smoke_bench(tmp_path, "--batch", "2", "--modes", "eager,vitkern", "--train")
    assert rc == 0, capsys.readouterr().out
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [r["direction"] for r in rows] == ["fwd+bwd+adamw"] * 2
    assert all(r["status"] == "ok" for r in rows) and rows[1]["correct"] is True  # same loss as eager


@pytest.mark.skipif(CUDA, reason="CPU smoke mode")
def test_bench_cpu_smoke_amp_training_step(tmp_path, capsys):
    out = tmp_path / "res"
    rc = cli.main(["bench", "--model", "vit_tiny_patch16_224", "--allow-cpu", "--img-size", "32", "--model-arg",
                   "depth=1", "--model-arg", "embed_dim=32", "--model-arg", "num_heads=2", "--out", str(out),
                   "--batch", "2", "--modes", "eager,vitkern", "--amp"])
    assert rc == 0, capsys.readouterr().out
    doc = json.loads((out / "bench.json").read_text())
    assert doc["meta"]["cli"]["task"] == "train-amp" and doc["meta"]["cli"]["dtype"] == "fp32"
    assert [(r["params"]["task"], r["dtype"], r["direction"]) for r in doc["rows"]] == [
        ("train-amp", "float32", "fwd+bwd+adamw")] * 2
    assert all(r["status"] == "ok" for r in doc["rows"]) and doc["rows"][1]["correct"] is True


@pytest.mark.skipif(CUDA, reason="CPU smoke mode")
def test_bench_runs_from_an_installed_package_without_a_checkout(tmp_path):
    """`vitkern bench` from a copy of the package alone (as pip installs it: no benchmarks/ beside it) finds its
    harness, runs, and would write GPU results under ./vitkern-results instead of a checkout's benchmarks/results."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import vitkern

    site, work = tmp_path / "site", tmp_path / "work"
    shutil.copytree(Path(vitkern.__file__).parent, site / "vitkern",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("VITKERN_COMMIT", None)
    probe = ("import vitkern, vitkern.bench.harness as h; "
             "print(vitkern.__file__); print(h.REPO_ROOT); print(h.RESULTS_DIR); print(h.git_commit())")
    lines = subprocess.run([sys.executable, "-c", probe], cwd=work, env=env, capture_output=True, text=True,
                           check=True, timeout=120).stdout.splitlines()
    assert lines[0].startswith(str(site)), lines  # the copy, not the checkout
    assert lines[1:] == ["None", str(work / "vitkern-results"), "unknown"]
    out = tmp_path / "res"
    run = subprocess.run([sys.executable, "-m", "vitkern", "bench", "--model", "vit_tiny_patch16_224", "--allow-cpu",
                          "--dtype", "fp32", "--img-size", "32", "--model-arg", "depth=1", "--batch", "1",
                          "--modes", "eager,vitkern", "--out", str(out)],
                         cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [(r["provider"], r["status"]) for r in rows] == [("eager", "ok"), ("vitkern", "ok")]


def _colors(png) -> set[tuple[int, int, int]]:
    """The RGB colours an image uses (getcolors: Pillow 12 deprecates getdata)."""
    return {color for _, color in png.convert("RGB").getcolors(maxcolors=1 << 24)}


def test_throughput_png_with_pillow_draws_every_series(tmp_path):
    from PIL import Image

    from vitkern.bench.cli import COLORS, throughput_png

    data = {"eager": [(64, 5000.0), (128, 5600.0)], "vitkern": [(64, 7000.0), (128, 8100.0)]}
    assert throughput_png(data, "vit_b bf16", tmp_path / "t.png")
    with Image.open(tmp_path / "t.png") as png:
        colors = _colors(png)
    for hex_color in COLORS[:2]:  # both lines (and their legend boxes) are drawn
        assert tuple(int(hex_color[i:i + 2], 16) for i in (1, 3, 5)) in colors


def test_throughput_svg_ticks_and_single_points():
    from vitkern.bench.cli import throughput_svg

    svg = ET.fromstring(throughput_svg({"eager": [(256, 8200.0)], "vitkern": [(256, 11800.0)]}, "t <&>"))
    texts = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")]
    assert "t <&>" in texts and "12,000" in texts and "0" in texts  # 1-2-5 ticks up to the top value
    assert len(list(svg.iter("{http://www.w3.org/2000/svg}circle"))) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_bench_on_gpu_tiny_model(tmp_path, capsys):
    out = tmp_path / "res"
    rc = cli.main(["bench", "--model", "vit_tiny_patch16_224", "--batch", "8,16", "--dtype", "bf16",
                   "--modes", "eager,vitkern,compile", "--compile-mode", "default", "--warmup-ms", "5",
                   "--rep-ms", "20", "--out", str(out)])
    assert rc == 0, capsys.readouterr().out
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert all(r["status"] == "ok" and r["extra"]["peak_mib"] is not None for r in rows), rows
    assert all("cuda-events" in r["timer"] for r in rows)
    assert all(r["extra"].get("speedup_vs_compile") for r in rows)


# --------------------------------------------------------------------------------------------------- bench_models
def test_bench_models_smoke_and_registered():
    from benchmarks import run_all
    from vitkern.bench import models as bench_models
    from vitkern.bench.harness import Context

    assert run_all.discover()["models"].run is bench_models.run  # benchmarks/bench_models.py puts it in the suite
    lines: list[str] = []
    rows = bench_models.run(Context(device="cpu", log=lines.append), models=[bench_models.VIT_B])
    expected = [(t, p) for t in ("infer", "train", "train-amp") for p in bench_models.MODES]
    assert [(r.params["task"], r.provider) for r in rows] == expected
    assert {r.dtype for r in rows if r.params["task"] == "train-amp"} == {"float32"}  # fp32 model, bf16 autocast
    for r in rows:
        if r.provider in ("eager", "vitkern"):
            assert r.status == "ok", r.error
        else:
            assert r.status == "skipped"
    assert sum(line.startswith("ROW {") for line in lines) == len(rows)  # incremental, parseable
    assert json.loads(lines[-1][4:])["provider"] == "vitkern+compile"
    lines = bench_models.targets(rows)
    tgt = [t for t in lines if t.startswith("target ")]
    assert len(tgt) == len(bench_models.TARGETS) and all("not measured (CPU smoke" in t for t in tgt)
    assert sum("img/s: eager" in t for t in lines) == 3  # one throughput line per case


def _row(model, task, provider, ms, **extra):
    from vitkern.bench.harness import GPU_TIMER, Row

    return Row(bench="models", case="c", params={"model": model, "B": 256, "task": task}, dtype="bfloat16",
               direction="fwd", provider=provider, baseline="eager", status="ok", median_ms=ms, timer=GPU_TIMER,
               extra=dict(extra))


def test_bench_models_amp_step_runs_under_autocast():
    """The train-amp step runs the fp32 model's forward under bf16 autocast (the plain step does not), and its
    correctness check uses the bf16 tolerance (fp32 weights, bf16 compute)."""
    from vitkern.bench import models as bm
    from vitkern.bench.harness import Context

    seen = {}
    for task in (bm.TRAIN, bm.TRAIN_AMP):
        case = bm.entry_case(bm.Entry(bm.VIT_B, 2, task), torch.float32, kwargs=bm.SMOKE_KWARGS[bm.VIT_B])
        inp = bm.make_inputs(case, torch.device("cpu"))
        def record(module, args, out, task=task):
            seen.setdefault(task, (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))

        hook = inp["built"].module.register_forward_hook(record)  # deep-copied into the step's model
        bm.prepare("vitkern", case, inp, "default").fn()
        hook.remove()
    bm._BASE.clear()
    assert seen == {bm.TRAIN: (False, torch.get_autocast_dtype("cpu")), bm.TRAIN_AMP: (True, torch.bfloat16)}
    assert bm.entry_case(bm.Entry(bm.VIT_B, 2, bm.TRAIN_AMP), torch.bfloat16).dtype == torch.float32
    rows = bm.run_cases(Context(device="cpu", log=lambda s: None), [case], modes=("eager", "vitkern"))
    assert all(r.status == "ok" for r in rows) and rows[1].correct


def test_bench_models_target_verdicts():
    from vitkern.bench import models as bm

    vit, swin = bm.VIT_B, bm.SWIN_T
    rows = [  # ViT-B: vitkern 20 ms (12.8k img/s), eager 28 ms (1.4x), compile max-autotune 21 ms (1.05x)
        _row(vit, "infer", "eager", 28.0), _row(vit, "infer", "vitkern", 20.0),
        _row(vit, "infer", "compile", 21.0, compile_mode="max-autotune"), _row(vit, "infer", "vitkern+compile", 22.0),
        # Swin-T: compile in mode default -> the compile target is not claimed
        _row(swin, "infer", "eager", 30.0), _row(swin, "infer", "vitkern", 14.0),
        _row(swin, "infer", "compile", 20.0, compile_mode="default"),
    ]
    v = {t["target"]: t for t in bm.evaluate_targets(rows, device_name="NVIDIA H100 80GB HBM3")}
    assert v[f"{vit} infer: vitkern >= 1.35x eager"]["status"] == "pass"
    assert v[f"{vit} infer: vitkern >= 1.35x eager"]["value"] == pytest.approx(1.4)
    assert v[f"{vit} infer: vitkern >= 1.1x compile"]["status"] == "fail"
    assert v[f"{vit} infer: vitkern >= 12500 img/s"]["status"] == "pass"
    assert v[f"{swin} infer: vitkern >= 2x eager"]["status"] == "pass"
    assert v[f"{swin} infer: vitkern >= 1.2x compile"]["status"] == "not measured"
    assert "max-autotune" in v[f"{swin} infer: vitkern >= 1.2x compile"]["why"]
    assert v[f"{vit} train: vitkern >= 1.25x eager"]["status"] == "not measured"
    assert rows[1].extra["targets"][f"{vit} infer: vitkern >= 1.35x eager"]["status"] == "pass"  # in the JSON
    h200 = {t["target"]: t for t in bm.evaluate_targets(rows, device_name="NVIDIA H200")}
    assert h200[f"{vit} infer: vitkern >= 12500 img/s"]["status"] == "not measured"  # an H100 target
    rows[1].status = "wrong"  # a wrong result never passes
    rows[3].status = "error"
    again = {t["target"]: t for t in bm.evaluate_targets(rows, device_name="NVIDIA H100")}
    assert again[f"{vit} infer: vitkern >= 1.35x eager"]["status"] == "not measured"


def test_bench_models_finish_rows_and_compile_setting(monkeypatch):
    from vitkern.bench import models as bm

    rows = bm.finish_rows([_row(bm.VIT_B, "train", "eager", 40.0), _row(bm.VIT_B, "train", "compile", 32.0),
                           _row(bm.VIT_B, "train", "vitkern", 25.0)])
    assert [r.direction for r in rows] == [bm.TRAIN_DIRECTION] * 3
    assert rows[2].extra["img_per_s"] == pytest.approx(256 / 0.025, rel=1e-3)
    assert rows[2].extra["speedup_vs_compile"] == pytest.approx(1.28)
    assert bm._compile_setting(quick=False) == ("targets", "max-autotune")
    assert bm._compile_setting(quick=True) == ("targets", "default")
    monkeypatch.setenv("VITKERN_BENCH_COMPILE", "0")
    monkeypatch.setenv("VITKERN_BENCH_COMPILE_MODE", "max-autotune-no-cudagraphs")
    assert bm._compile_setting(quick=True) == ("none", "max-autotune-no-cudagraphs")
    monkeypatch.setenv("VITKERN_BENCH_COMPILE", "sometimes")
    with pytest.raises(ValueError, match="VITKERN_BENCH_COMPILE"):
        bm._compile_setting(quick=False)


def test_run_all_uses_a_bench_budget(tmp_path, capsys):
    from benchmarks import run_all

    d = tmp_path / "benches"
    d.mkdir()
    (d / "bench_toy.py").write_text("NAME = 'toy'\nBUDGET_S = 7.0\ndef run(ctx):\n    return []\n")
    assert run_all.main(["--bench-dir", str(d), "--out", str(tmp_path / "o"), "--smoke"]) == 0
    assert "== toy (budget 7 s)" in capsys.readouterr().out
    assert run_all.main(["--bench-dir", str(d), "--out", str(tmp_path / "o"), "--smoke", "--budget-s", "3"]) == 0
    assert "== toy (budget 3 s)" in capsys.readouterr().out
