"""The CUDA C++ extension vitkern._C: build config, loader/status, and (when built) its ops.

* Always (CPU): build-config parsing/flags, setup.py's VITKERN_BUILD_CUDA modes, extension_status() never raising.
* When vitkern._C is loaded (built with `bash scripts/build_csrc.sh --inplace`, or JIT-built: set
  VITKERN_BUILD_CUDA=1 and the module fixture calls load_jit()): build_info, the dispatch-switch self-test and the
  Meta (shape-inference) kernel with its input checks — all run on CPU.
* GPU (@pytest.mark.gpu): the smoke op add_rowwise against `x + bias` (bit-exact) and the arch probe, proving the
  sm_90a image loads and launches.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from vitkern import _build_config as bc
from vitkern import dispatch
from vitkern._extension import ExtensionStatus, _arch_covers, extension_status

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAD_DIMS = (32, 64, 80, 96, 128)
DTYPES = {torch.float16: "float16/2", torch.bfloat16: "bfloat16/2", torch.float32: "float32/4"}


# ---------------------------------------------------------------------------------------------------------------
# build config (no torch, no compiler needed)


def test_generated_wgmma_header_is_current():
    """csrc/ops/wgmma_ops.cuh is written by scripts/gen_wgmma.py; an edit of either alone fails here."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gen_wgmma.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_parse_cuda_archs():
    assert bc.parse_cuda_archs("90a") == ["90a"]
    assert bc.parse_cuda_archs("90a;80") == ["90a", "80"]
    assert bc.parse_cuda_archs(" sm_90a, 8.0 ;90a ") == ["90a", "80"]  # prefixes, dotted, dedup
    assert bc.parse_cuda_archs("9.0a 100a") == ["90a", "100a"]
    for bad in ("banana", "90b", "5.2", ";", "sm_"):
        with pytest.raises(ValueError, match="VITKERN_CUDA_ARCHS"):
            bc.parse_cuda_archs(bad)


def test_default_arch_is_sm90a(monkeypatch):
    monkeypatch.delenv("VITKERN_CUDA_ARCHS", raising=False)
    assert bc.parse_cuda_archs() == ["90a"]
    monkeypatch.setenv("VITKERN_CUDA_ARCHS", "90a;80")
    assert bc.parse_cuda_archs() == ["90a", "80"]


def test_gencode_flags_are_explicit():
    # explicit gencode per target, never the -arch=sm_90a shorthand (its plain sm_90 pass rejects wgmma)
    assert bc.gencode_flags(["90a", "80"]) == [
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_80,code=sm_80",
    ]
    # no commas: nvcc would split "-DX=a,b" into two defines
    assert bc.archs_define(["90a", "80"]) == "-DVITKERN_CUDA_ARCHS=90a+80"


def test_make_config(tmp_path, monkeypatch):
    monkeypatch.delenv("VITKERN_CUDA_ARCHS", raising=False)
    cfg = bc.make_config(os.path.join(ROOT, "csrc"), shim_dir=str(tmp_path / "shim"), relative_to=ROOT)
    assert "csrc/vitkern_C.cpp" in cfg.sources
    assert any(s.endswith(".cu") for s in cfg.sources)
    assert all(not os.path.isabs(s) for s in cfg.sources)
    nv = cfg.nvcc_flags
    assert "-gencode=arch=compute_90a,code=sm_90a" in nv
    assert not any(f.startswith("-arch") for f in nv)
    assert "--use_fast_math" not in nv  # deliberately off (see _build_config.make_config)
    for flag in ("-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr", "-DVITKERN_CUDA_ARCHS=90a"):
        assert flag in nv, flag
    for flag in ("-O3", "-std=c++17", "-DVITKERN_CUDA_ARCHS=90a"):
        assert flag in cfg.cxx_flags, flag
    # the nvidia-* wheel headers are fallbacks (-isystem, searched after the toolkit's own -I dirs)
    for inc in cfg.fallback_include_dirs:
        assert nv[nv.index(inc) - 1] == "-isystem"
        assert "-I" + inc not in nv


def test_cudart_link_shim(tmp_path):
    toolkit = tmp_path / "cuda"  # a toolkit without lib64/libcudart.so (the minimal-image pitfall)
    (toolkit / "lib64").mkdir(parents=True)
    wheel_lib = tmp_path / "nvidia" / "cu13" / "lib"
    wheel_lib.mkdir(parents=True)
    (wheel_lib / "libcudart.so.13").write_bytes(b"")
    shim = bc.cudart_link_shim(str(tmp_path / "shim"), str(toolkit), [str(wheel_lib)])
    assert shim == str(tmp_path / "shim")
    assert os.path.realpath(os.path.join(shim, "libcudart.so")) == str(wheel_lib / "libcudart.so.13")
    # idempotent, and not needed at all once the toolkit has one
    assert bc.cudart_link_shim(str(tmp_path / "shim"), str(toolkit), [str(wheel_lib)]) == shim
    (toolkit / "lib64" / "libcudart.so").write_bytes(b"")
    assert bc.cudart_link_shim(str(tmp_path / "shim2"), str(toolkit), [str(wheel_lib)]) is None


def test_arch_covers():
    assert _arch_covers("sm_90a", 9, 0)
    assert not _arch_covers("sm_90a", 10, 0)  # arch-specific SASS runs only on its own CC
    assert not _arch_covers("sm_90a", 8, 0)
    assert _arch_covers("sm_80", 8, 6)  # same major, newer minor
    assert not _arch_covers("sm_80", 9, 0)  # no PTX shipped -> no forward compatibility
    assert not _arch_covers("sm_86", 8, 0)


# ---------------------------------------------------------------------------------------------------------------
# setup.py modes (subprocesses; the no-torch ones simulate pip's isolated build env)


def _run_setup(env_mode: str | None, *, hide_torch: bool, args=("--version",)):
    env = {k: v for k, v in os.environ.items() if k != "VITKERN_BUILD_CUDA"}
    if env_mode is not None:
        env["VITKERN_BUILD_CUDA"] = env_mode
    prelude = "import sys; sys.modules['torch'] = None; " if hide_torch else "import sys; "
    code = prelude + f"import runpy; sys.argv = ['setup.py', *{list(args)!r}]; runpy.run_path('setup.py', run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)


def test_setup_py_pure_install_without_torch():
    r = _run_setup(None, hide_torch=True)  # auto: the isolated build env of `pip install .`
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == bc_version()
    assert "not building the CUDA extension" in r.stderr and "torch is not importable" in r.stderr


def test_every_python_folder_of_vitkern_is_a_packaged_package():
    """pyproject's package find (include vitkern*) skips a folder without __init__.py: an installed vitkern would
    miss it while tests from the checkout still pass (they import it as a namespace package)."""
    from pathlib import Path

    from setuptools import find_packages

    packaged = set(find_packages(ROOT, include=["vitkern*"]))
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in Path(ROOT, "vitkern").rglob("*.py")}
    assert folders - packaged == set()


def test_setup_py_mode_0_skips():
    r = _run_setup("0", hide_torch=False)
    assert r.returncode == 0, r.stderr
    assert "VITKERN_BUILD_CUDA=0" in r.stderr


def test_setup_py_mode_1_fails_loudly_without_torch():
    r = _run_setup("1", hide_torch=True)
    assert r.returncode != 0
    assert "VITKERN_BUILD_CUDA=1" in r.stderr and "torch is not importable" in r.stderr


def test_setup_py_rejects_bad_mode():
    r = _run_setup("maybe", hide_torch=True)
    assert r.returncode != 0 and "VITKERN_BUILD_CUDA must be 0, 1 or auto" in r.stderr


def bc_version() -> str:
    spec = importlib.util.spec_from_file_location("_vk_version", os.path.join(ROOT, "vitkern", "version.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.__version__


# ---------------------------------------------------------------------------------------------------------------
# loader / status (CPU)


def test_extension_status_never_raises():
    st = extension_status()
    assert isinstance(st, ExtensionStatus)
    assert isinstance(st.reason, str) and st.reason.strip()
    if st.available:
        assert st.build_info and json.loads(st.build_info)
    else:
        assert st.build_info is None and not st.can_run
    assert extension_status() == st  # repeatable


def test_csrc_digest_follows_the_sources(tmp_path):
    """The digest baked into a build changes with any source or header byte and with renames, not with other files."""
    tree = tmp_path / "csrc"
    shutil.copytree(os.path.join(ROOT, "csrc"), tree)
    first = bc.csrc_digest(str(tree))
    assert first == bc.csrc_digest(os.path.join(ROOT, "csrc")) and len(first) == 16
    (tree / "notes.txt").write_text("not a source")
    assert bc.csrc_digest(str(tree)) == first
    header = tree / "common" / "config.h"
    header.write_text(header.read_text() + "\n")
    assert bc.csrc_digest(str(tree)) != first
    assert bc.digest_define(first) == f"-DVITKERN_CSRC_DIGEST=0x{first}"  # a pp-number: no quoting through nvcc
    edited = bc.csrc_digest(str(tree))
    cfg = bc.make_config(str(tree), shim_dir=str(tmp_path / "s"))
    assert cfg.csrc_digest == edited and bc.digest_define(edited) in cfg.nvcc_flags and bc.digest_define(edited) in cfg.cxx_flags


def test_built_extension_carries_the_checkouts_digest():
    """CI builds csrc/ in place before the tests: the library it built records these sources (file marker and
    build_info), which is what lets a later checkout find it stale."""
    spec = importlib.util.find_spec("vitkern._C")
    if spec is None or not spec.origin:
        pytest.skip("vitkern._C is not built here (CI builds it in place: bash scripts/build_csrc.sh --inplace)")
    digest = bc.csrc_digest(os.path.join(ROOT, "csrc"))
    assert bc.built_digest(spec.origin) == digest, "vitkern._C is stale: rebuild it (bash scripts/build_csrc.sh --inplace)"
    st = extension_status()
    assert st.available, st.reason
    assert st.info()["csrc_digest"] == f"0x{digest}"


def test_a_stale_extension_is_reported_not_imported(tmp_path):
    """Sources edited after the build (or a library carried to a checkout at another commit): the status says stale
    with both digests and how to rebuild, and vitkern._C is not imported, so load_jit can still build and load the
    current sources in that process."""
    if importlib.util.find_spec("vitkern._C") is None:
        pytest.skip("vitkern._C is not built here")
    tree = tmp_path / "csrc"
    shutil.copytree(os.path.join(ROOT, "csrc"), tree)
    (tree / "vitkern_C.cpp").write_text((tree / "vitkern_C.cpp").read_text() + "// edited after the build\n")
    code = ("import json, sys, dataclasses\n"
            "from vitkern._extension import extension_status\n"
            "st = extension_status()\n"
            "print(json.dumps([st.available, st.reason, 'vitkern._C' in sys.modules]))\n")
    env = dict(os.environ, VITKERN_CSRC_DIR=str(tree), PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    available, reason, imported = json.loads(r.stdout.strip().splitlines()[-1])
    assert not available and not imported, reason
    assert "is stale" in reason and bc.csrc_digest(str(tree)) in reason and "build_csrc.sh --inplace" in reason


def test_extension_status_when_not_built(run_without_extension):
    # In a fresh process where vitkern._C cannot be imported: not available, with a reason saying how to build it.
    out = run_without_extension(
        "import json, dataclasses\n"
        "from vitkern._extension import extension_status\n"
        "print(json.dumps(dataclasses.asdict(extension_status())))\n"
    )
    st = json.loads(out.strip().splitlines()[-1])
    assert st["available"] is False and st["can_run"] is False and st["build_info"] is None
    assert "not built" in st["reason"] and "--no-build-isolation" in st["reason"]


def test_explain_says_when_the_extension_is_not_built(run_without_extension):
    """Every op's CUDA backend, in a process where vitkern._C cannot be imported: rejected with that reason (the
    calls are `vitkern info`'s representative ones, one per op)."""
    out = run_without_extension(
        "from vitkern import cli, dispatch\n"
        "for label, op, args, kwargs in cli._probe_calls():\n"
        "    print('OP ' + op)\n"
        "    print(dispatch.explain(op, *args, **kwargs))\n"
    )
    sections = {s.split("\n", 1)[0]: s for s in out.split("OP ")[1:]}
    assert set(sections) == set(dispatch.ops()), out  # every op family: each has a CUDA backend
    for op, text in sections.items():
        line = next(ln for ln in text.splitlines() if ln.strip().startswith("cuda:"))
        assert "rejected: CUDA extension unavailable: vitkern._C is not built" in line, (op, text)


def test_import_vitkern_does_not_need_the_extension():
    import vitkern  # noqa: F401
    import vitkern._extension  # noqa: F401


# ---------------------------------------------------------------------------------------------------------------
# the loaded extension


def test_build_info(ext):
    info = ext.info()
    archs = info["cuda_archs"].split(",")
    assert "sm_90a" in archs, info
    assert info["torch"].split(".")[:2] == torch.__version__.split("+")[0].split(".")[:2], info
    assert info["cuda_runtime_headers"].split(".")[0] == torch.version.cuda.split(".")[0], info
    assert info["fast_math"] is False
    assert info["head_dims"] == list(HEAD_DIMS) == list(bc.HEAD_DIMS)
    assert set(info["dtypes"]) == {"float16", "bfloat16", "float32"}
    assert ext.path and os.path.exists(ext.path)


def test_dispatch_switches(ops):
    for dtype, prefix in DTYPES.items():
        for hd in HEAD_DIMS:
            assert ops._dispatch_selftest(dtype, hd) == f"{prefix}/{hd}"
    with pytest.raises(RuntimeError, match="unsupported head_dim 48"):
        ops._dispatch_selftest(torch.float16, 48)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        ops._dispatch_selftest(torch.float64, 64)


def test_add_rowwise_meta_shapes(ops):
    x = torch.empty(2, 197, 768, device="meta", dtype=torch.bfloat16)
    b = torch.empty(768, device="meta", dtype=torch.bfloat16)
    out = ops.add_rowwise(x, b)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device.type == "meta"


@pytest.mark.parametrize(
    "x_kw, b_kw, match",
    [
        (dict(size=(4, 8), dtype=torch.int32), dict(size=(8,), dtype=torch.int32),
         r"add_rowwise: x must have dtype float16, bfloat16 or float32, got Int"),
        (dict(size=(4, 8), dtype=torch.float16), dict(size=(8,), dtype=torch.float32),
         r"x and bias must have the same dtype, got float16 and float32"),
        (dict(size=(4, 8), dtype=torch.float16), dict(size=(7,), dtype=torch.float16),
         r"bias.size\(0\) must be 8, got 7"),
        (dict(size=(4, 8), dtype=torch.float16), dict(size=(1, 8), dtype=torch.float16), r"bias must be 1-D"),
    ],
)
def test_add_rowwise_checks_name_the_argument(ops, x_kw, b_kw, match):
    x = torch.empty(*x_kw["size"], device="meta", dtype=x_kw["dtype"])
    b = torch.empty(*b_kw["size"], device="meta", dtype=b_kw["dtype"])
    with pytest.raises(RuntimeError, match=match):
        ops.add_rowwise(x, b)


def test_add_rowwise_rejects_strided_last_dim(ops):
    x = torch.empty(8, 4, device="meta", dtype=torch.float32).t()  # stride(-1) == 4
    b = torch.empty(8, device="meta", dtype=torch.float32)
    with pytest.raises(RuntimeError, match="x must be contiguous in its last dim"):
        ops.add_rowwise(x, b)


def test_add_rowwise_has_no_cpu_kernel(ops):
    with pytest.raises(RuntimeError, match="CPU"):  # NotImplementedError from the dispatcher (a RuntimeError)
        ops.add_rowwise(torch.zeros(2, 3), torch.zeros(3))


# ---------------------------------------------------------------------------------------------------------------
# GPU


def _fresh_generator(device) -> tuple[torch.Generator, int]:
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator(device=device).manual_seed(seed), seed


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", [(2, 197, 768), (3, 50, 80), (7, 1), (1000,), (4, 0, 64)])
def test_add_rowwise_matches_torch(cuda_ops, dtype, shape):
    g, seed = _fresh_generator("cuda")
    x = torch.randn(shape, device="cuda", dtype=dtype, generator=g)
    b = torch.randn(shape[-1], device="cuda", dtype=dtype, generator=g)
    out = cuda_ops.add_rowwise(x, b)
    ref = x + b  # fp32 math, one rounding: identical to the kernel
    assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, ref), f"seed={seed} max|diff|={(out.float() - ref.float()).abs().max().item()}"


@pytest.mark.gpu
def test_add_rowwise_strided_rows_and_stream(cuda_ops):
    g, seed = _fresh_generator("cuda")
    big = torch.randn(4, 50, 1024, device="cuda", dtype=torch.bfloat16, generator=g)
    b = torch.randn(768, device="cuda", dtype=torch.bfloat16, generator=g)
    x_view = big[:, :, 128:128 + 768]  # uniform row stride 1024: no copy
    x_copy = big[:, :10, :768]  # non-uniform row strides: reshaped (copied) internally
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # the op must launch on the current stream
        out_view = cuda_ops.add_rowwise(x_view, b)
        out_copy = cuda_ops.add_rowwise(x_copy, b)
    s.synchronize()
    assert torch.equal(out_view, x_view + b), f"seed={seed}"
    assert torch.equal(out_copy, x_copy + b), f"seed={seed}"


@pytest.mark.gpu
def test_add_rowwise_cuda_input_checks(cuda_ops):
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(RuntimeError, match="bias must be a CUDA tensor, got a tensor on cpu"):
        cuda_ops.add_rowwise(x, torch.randn(8))
    with pytest.raises(RuntimeError, match="x must be contiguous in its last dim"):
        cuda_ops.add_rowwise(x.t(), torch.randn(4, device="cuda"))


@pytest.mark.gpu
def test_device_arch_probe(cuda_ops, ext):
    major, minor = torch.cuda.get_device_capability()
    arch, sm90a_features = cuda_ops._device_arch_probe(torch.device("cuda"))
    assert arch == major * 100 + minor * 10
    if (major, minor) == (9, 0) and "sm_90a" in ext.info()["cuda_archs"].split(","):
        assert sm90a_features == 1, "the sm_90a image (wgmma/setmaxnreg) should be the one running on sm_90"
