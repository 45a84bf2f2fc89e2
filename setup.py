"""Build script for vitkern: metadata lives in pyproject.toml; this file only decides whether to build ``vitkern._C``.

``vitkern._C`` is the CUDA C++ extension compiled from ``csrc/**/*.cpp|*.cu`` with torch's CUDAExtension/BuildExtension
(ninja). Everything else in vitkern is pure Python/Triton and works without it.

    pip install .                                  # pure-Triton package (isolated build env has no torch -> no _C)
    pip install --no-build-isolation .             # + vitkern._C, built against the torch already installed
    VITKERN_BUILD_CUDA=1 python setup.py build_ext --inplace   # dev build: vitkern/_C*.so next to the sources
    bash scripts/build_csrc.sh                     # CI compile check (temp build dir, timing, cuobjdump check)

Environment:
    VITKERN_BUILD_CUDA   auto (default): build _C when torch is importable, is a CUDA build, and nvcc is found;
                         otherwise print why and build the pure-Python package.
                         1: must build; exit with an error if torch or nvcc is missing.   0: never build.
    VITKERN_CUDA_ARCHS   SM targets, default "90a" (H100/H200, wgmma/TMA-capable). e.g. "90a;80" adds A100.
                         (TORCH_CUDA_ARCH_LIST is ignored: we pass explicit -gencode flags.)
    MAX_JOBS             parallel ninja compile jobs (honoured by torch's BuildExtension; ~1.5 GB RAM per nvcc job).
    CUDA_HOME            toolkit to use (else nvcc on PATH, else /usr/local/cuda).

The extension uses only libtorch (ops registered through the dispatcher, no pybind) and the stable Python ABI, so it
is built with ``py_limited_api``: one ``vitkern/_C.abi3.so`` (and an abi3 wheel) serves every CPython >= 3.10 for the
torch/CUDA it was built against, as FlashAttention 3's wheels do.

The flags, sources and include/library dirs come from vitkern/_build_config.py, shared with the JIT path
(``vitkern._extension.load_jit``). It is loaded here by file path so that neither torch nor the vitkern package is
imported unless we actually build.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(msg: str) -> None:
    print(f"[vitkern setup] {msg}", file=sys.stderr, flush=True)


def _version() -> str:
    with open(os.path.join(ROOT, "vitkern", "version.py"), encoding="utf-8") as f:
        m = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", f.read(), re.M)
    if m is None:
        raise SystemExit("setup.py: cannot find __version__ in vitkern/version.py")
    return m.group(1)


def _load_build_config():
    path = os.path.join(ROOT, "vitkern", "_build_config.py")
    spec = importlib.util.spec_from_file_location("_vitkern_build_config", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def _mode() -> str:
    raw = os.environ.get("VITKERN_BUILD_CUDA", "auto").strip().lower()
    if raw in ("0", "false", "off", "no"):
        return "0"
    if raw in ("1", "true", "on", "yes"):
        return "1"
    if raw in ("", "auto"):
        return "auto"
    raise SystemExit(f"setup.py: VITKERN_BUILD_CUDA must be 0, 1 or auto, got {raw!r}")


def _cuda_extension() -> tuple[list, dict]:
    mode = _mode()
    if mode == "0":
        _say("VITKERN_BUILD_CUDA=0: not building the CUDA extension vitkern._C (pure-Python/Triton package).")
        return [], {}

    bc = _load_build_config()
    problems: list[str] = []
    torch = None
    try:
        import torch  # noqa: F811  (only imported when we may build)
    except Exception as e:  # ImportError, or a broken torch install
        problems.append(f"torch is not importable in this build environment ({type(e).__name__}: {e}); "
                        "use `pip install --no-build-isolation .` to build against the installed torch")
    cuda_home = bc.find_cuda_home()
    nvcc = bc.find_nvcc(cuda_home)
    if nvcc is None:
        problems.append("no CUDA toolkit found (no nvcc under $CUDA_HOME, on PATH or in /usr/local/cuda)")
    if torch is not None and getattr(torch.version, "cuda", None) is None:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    if problems:
        msg = "; ".join(problems)
        if mode == "1":
            raise SystemExit(f"setup.py: VITKERN_BUILD_CUDA=1 but vitkern._C cannot be built: {msg}")
        _say(f"not building the CUDA extension vitkern._C: {msg}. Installing the pure-Python/Triton package; "
             "set VITKERN_BUILD_CUDA=1 to make this an error.")
        return [], {}

    try:
        archs = bc.parse_cuda_archs()
    except ValueError as e:
        raise SystemExit(f"setup.py: {e}")
    # torch.utils.cpp_extension reads CUDA_HOME once, at import: make it agree with what we found.
    os.environ.setdefault("CUDA_HOME", cuda_home)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    # setuptools wants source paths relative to setup.py's dir (pip runs us there); absolute if run from elsewhere.
    rel = ROOT if os.path.realpath(os.getcwd()) == os.path.realpath(ROOT) else None
    cfg = bc.make_config(os.path.join(ROOT, "csrc"), shim_dir=os.path.join(ROOT, "build", "vitkern_cudart_shim"),
                         relative_to=rel, archs_spec=";".join(archs))
    if not cfg.sources:
        if mode == "1":
            raise SystemExit("setup.py: VITKERN_BUILD_CUDA=1 but there are no csrc/**/*.cpp|*.cu sources")
        _say("not building the CUDA extension vitkern._C: no csrc/ sources in this tree (an sdist without csrc/?).")
        return [], {}
    _say(f"building vitkern._C with torch {torch.__version__} (CUDA {torch.version.cuda}): {cfg.describe()}")
    ext = CUDAExtension(
        name="vitkern._C",
        sources=cfg.sources,
        include_dirs=cfg.include_dirs,
        library_dirs=cfg.library_dirs,
        extra_compile_args={"cxx": cfg.cxx_flags, "nvcc": cfg.nvcc_flags},
        py_limited_api=True,  # torch adds -DPy_LIMITED_API and does not link libtorch_python
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()

setup(
    version=_version(),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # the wheel's tag says what the extension is: cp310-abi3 (pure-Python wheels keep py3-none-any)
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
