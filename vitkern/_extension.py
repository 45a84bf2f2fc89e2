"""Loader and status for the optional CUDA C++ extension ``vitkern._C`` (sources in ``csrc/``).

The extension registers its ops under ``torch.ops.vitkern_C`` (see csrc/vitkern_C.cpp). It gets into a process in
one of two ways:

* ahead of time: ``pip install --no-build-isolation .`` or ``VITKERN_BUILD_CUDA=1 python setup.py build_ext
  --inplace`` (or ``bash scripts/build_csrc.sh --inplace``) produce ``vitkern/_C.<abi>.so``; ``import vitkern._C``
  loads it (:func:`extension_status` does that);
* just in time: :func:`load_jit` compiles the same sources with the same flags (``vitkern/_build_config.py``) via
  ``torch.utils.cpp_extension.load`` + ninja and loads the result — for machines where a pip install is inconvenient
  (e.g. the GPU box, which has no network). Rebuilds only when sources or flags changed.

Nothing here raises at import time, and :func:`extension_status` never raises: it reports why the extension is not
usable instead. The two ways are mutually exclusive within one process (both register the ``vitkern_C`` library).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import json
import os
import sys
import threading
from typing import Any

__all__ = ["ExtensionStatus", "extension_status", "load_jit", "build_info_dict"]

_OPS_NAMESPACE = "vitkern_C"
_JIT_NAME = "vitkern_C_jit"
_BUILD_HINT = ("build it with `pip install --no-build-isolation .` or `VITKERN_BUILD_CUDA=1 python setup.py build_ext "
               "--inplace` (needs torch + nvcc), or JIT-build it in-process with vitkern._extension.load_jit()")

_lock = threading.Lock()
_jit_path: str | None = None  # set once load_jit() has loaded a library into this process


@dataclasses.dataclass(frozen=True)
class ExtensionStatus:
    """What is known about ``vitkern._C`` in this process.

    available: the extension is loaded and its ops are registered (``torch.ops.vitkern_C.*`` callable).
    can_run:   available AND a CUDA device is visible whose arch the binary was compiled for (so CUDA ops launch).
    reason:    one human-readable line: why not available / not runnable, or where it was loaded from.
    build_info: the JSON string from ``torch.ops.vitkern_C.build_info()`` (None when not available).
    path:      the loaded shared library (None when not available).
    """

    available: bool
    reason: str
    build_info: str | None = None
    path: str | None = None
    can_run: bool = False

    def info(self) -> dict[str, Any]:
        """``build_info`` parsed (empty dict when not available)."""
        return build_info_dict(self.build_info)


def build_info_dict(build_info: str | None) -> dict[str, Any]:
    if not build_info:
        return {}
    try:
        return json.loads(build_info)
    except ValueError:
        return {"raw": build_info}


def _ops_registered() -> bool:
    try:
        import torch

        getattr(torch.ops, _OPS_NAMESPACE).build_info  # noqa: B018  (raises if not registered)
        return True
    except Exception:
        return False


def _arch_covers(arch: str, major: int, minor: int) -> bool:
    """Can SASS compiled for ``arch`` (e.g. 'sm_90a', 'sm_80') run on a device of compute capability major.minor?
    Arch-specific 'a' targets run only on exactly that CC; family 'f' targets on the same major with minor >= theirs;
    plain targets on the same major with minor >= theirs (no PTX is shipped, so no forward JIT)."""
    a = arch.strip().lower().removeprefix("sm_")
    suffix = a[-1] if a and a[-1] in "af" else ""
    digits = a[:-1] if suffix else a
    if len(digits) < 2 or not digits.isdigit():
        return False
    amaj, amin = int(digits[:-1]), int(digits[-1])
    if suffix == "a":
        return (amaj, amin) == (major, minor)
    return amaj == major and minor >= amin


def _runnable(info: dict[str, Any]) -> tuple[bool, str]:
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA device visible (torch.cuda.is_available() is False): its CUDA ops cannot run here"
        major, minor = torch.cuda.get_device_capability()
        archs = [a for a in str(info.get("cuda_archs", "")).split(",") if a.strip()]
        if not any(_arch_covers(a, major, minor) for a in archs):
            return False, (f"compiled for [{','.join(archs)}] but the current device is sm_{major}{minor}; rebuild with "
                           f"VITKERN_CUDA_ARCHS=\"90a;{major}{minor}\"")
        return True, f"CUDA ops can run on sm_{major}{minor}"
    except Exception as e:  # broken driver etc.
        return False, f"cannot query the CUDA device ({type(e).__name__}: {e})"


def _status_from_loaded(path: str | None, how: str) -> ExtensionStatus:
    import torch

    try:
        info_str = str(getattr(torch.ops, _OPS_NAMESPACE).build_info())
    except Exception as e:
        return ExtensionStatus(False, f"{how} but build_info() failed ({type(e).__name__}: {e})", None, path)
    ok, why = _runnable(build_info_dict(info_str))
    return ExtensionStatus(True, f"{how} ({path}); {why}", info_str, path, can_run=ok)


def extension_status() -> ExtensionStatus:
    """Load ``vitkern._C`` if possible and report on it. Never raises."""
    try:
        try:
            import torch  # noqa: F401  (must be loaded before the extension: it links against libtorch)
        except Exception as e:
            return ExtensionStatus(False, f"torch is not importable ({type(e).__name__}: {e})")
        with _lock:
            if _jit_path is not None:
                return _status_from_loaded(_jit_path, "loaded from the JIT build")
            stale = _stale_reason()
            if stale is not None:
                return ExtensionStatus(False, stale)
            try:
                mod = importlib.import_module("vitkern._C")
            except ModuleNotFoundError as e:
                if e.name not in ("vitkern._C", "vitkern"):
                    return ExtensionStatus(False, f"importing vitkern._C failed: {type(e).__name__}: {e}")
                if _ops_registered():  # e.g. a library loaded by hand with torch.ops.load_library
                    return _status_from_loaded(None, "vitkern_C ops registered by another loader")
                return ExtensionStatus(False, f"vitkern._C is not built (no vitkern/_C*.so); {_BUILD_HINT}")
            except ImportError as e:
                # Typically: built against another torch/CUDA/Python (undefined symbol), or a missing libcudart.
                return ExtensionStatus(
                    False,
                    f"vitkern._C exists but failed to load: {e}. It was probably built against a different torch "
                    f"({torch.__version__} now); rebuild it: {_BUILD_HINT}",
                )
            path = getattr(mod, "__file__", None)
            if not _ops_registered():
                return ExtensionStatus(False, f"vitkern._C imported from {path} but registered no "
                                              f"torch.ops.{_OPS_NAMESPACE} ops", None, path)
            return _status_from_loaded(path, "loaded vitkern._C")
    except Exception as e:  # never raise from a status query
        return ExtensionStatus(False, f"unexpected error while loading vitkern._C: {type(e).__name__}: {e}")


def _stale_reason() -> str | None:
    """Why the built ``vitkern._C`` must not be imported: it was built from other ``csrc/`` sources than the checkout's
    (a library carried to another machine, or sources edited after the build). None when it is current, not built,
    or there are no sources to compare with (an installed wheel). Read from the file, before importing it: once
    imported, its ops are registered and a JIT build can no longer replace them in this process."""
    if "vitkern._C" in sys.modules:
        return None
    try:
        spec = importlib.util.find_spec("vitkern._C")
    except (ImportError, ValueError):
        return None
    csrc = _default_csrc_dir()
    if spec is None or not spec.origin or csrc is None:
        return None
    return _compare_digests(spec.origin, csrc, *_file_stamp(spec.origin), *_tree_stamp(csrc))


def _file_stamp(path: str) -> tuple[float, int]:
    st = os.stat(path)
    return st.st_mtime, st.st_size


def _tree_stamp(csrc: str) -> tuple[float, int]:
    """(newest mtime, file count) of the sources: the cache key, so an edit after the first check is seen."""
    newest, count = 0.0, 0
    for root, _, files in os.walk(csrc):
        for f in files:
            newest, count = max(newest, os.stat(os.path.join(root, f)).st_mtime), count + 1
    return newest, count


@functools.lru_cache(maxsize=8)
def _compare_digests(library: str, csrc: str, *_stamps) -> str | None:
    bc = _load_build_config()
    built, now = bc.built_digest(library), bc.csrc_digest(csrc)
    if built == now:
        return None
    what = f"csrc digest {built}" if built else "no csrc digest (built before vitkern recorded one)"
    return (f"vitkern._C at {library} is stale: built from other sources ({what}; {csrc} is now {now}); rebuild it "
            f"(bash scripts/build_csrc.sh --inplace), or JIT-build it in-process with vitkern._extension.load_jit()")


def _default_csrc_dir() -> str | None:
    env = os.environ.get("VITKERN_CSRC_DIR")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    cand = os.path.join(os.path.dirname(here), "csrc")  # repo checkout / editable install
    return cand if os.path.isdir(cand) else None


def _load_build_config():
    # Same module setup.py uses; imported normally here (we are inside the package).
    from vitkern import _build_config

    return _build_config


def load_jit(verbose: bool = False, build_directory: str | None = None) -> ExtensionStatus:
    """JIT-compile ``csrc/`` with ``torch.utils.cpp_extension.load`` (ninja) and load it into this process.

    Same sources, flags, archs (``VITKERN_CUDA_ARCHS``) and include/library dirs as setup.py. The build directory
    defaults to torch's extension cache (``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions/...``), so a second
    process reuses the build (only a ninja no-op check, ~1 s). If ``vitkern._C`` (or an earlier JIT build) is already
    loaded, returns its status without building. Raises RuntimeError if there is nothing to build or compilation
    fails (this is an explicit request, unlike :func:`extension_status`). ``MAX_JOBS`` limits parallel compiles.
    """
    global _jit_path
    import torch

    with _lock:
        if _jit_path is not None:
            return _status_from_loaded(_jit_path, "loaded from the JIT build")
    if "vitkern._C" in sys.modules or _ops_registered():
        return extension_status()
    try:
        has_aot = importlib.util.find_spec("vitkern._C") is not None
    except (ImportError, ValueError):
        has_aot = False
    if has_aot:  # a built .so exists: prefer it, if it loads
        st = extension_status()
        if st.available:
            return st

    bc = _load_build_config()
    csrc = _default_csrc_dir()
    if csrc is None:
        raise RuntimeError("vitkern.load_jit: csrc/ sources not found (not a repo checkout?); set VITKERN_CSRC_DIR")
    cuda_home = bc.find_cuda_home()
    if cuda_home is None or bc.find_nvcc(cuda_home) is None:
        raise RuntimeError("vitkern.load_jit: no CUDA toolkit (nvcc) found; set CUDA_HOME or put nvcc on PATH")
    if torch.version.cuda is None:
        raise RuntimeError(f"vitkern.load_jit: torch {torch.__version__} is not a CUDA build")
    os.environ.setdefault("CUDA_HOME", cuda_home)
    import torch.utils.cpp_extension as cpp_ext

    if not cpp_ext.CUDA_HOME:  # the module was imported before CUDA_HOME was known
        cpp_ext.CUDA_HOME = cuda_home
    if build_directory is None:
        build_directory = os.environ.get("VITKERN_JIT_BUILD_DIR")
    if build_directory is None:
        try:  # torch's cache dir, e.g. ~/.cache/torch_extensions/py311_cu130/vitkern_C_jit
            build_directory = cpp_ext._get_build_directory(_JIT_NAME, verbose)
        except Exception:
            build_directory = os.path.join(cpp_ext.get_default_build_root(), _JIT_NAME)
    os.makedirs(build_directory, exist_ok=True)
    cfg = bc.make_config(csrc, shim_dir=os.path.join(build_directory, "cudart_shim"))
    if not cfg.sources:
        raise RuntimeError(f"vitkern.load_jit: no *.cpp/*.cu sources under {csrc}")
    if verbose:
        print(f"[vitkern.load_jit] {cfg.describe()} build_directory={build_directory}", flush=True)
    with _lock:
        if _jit_path is None:
            path = cpp_ext.load(
                name=_JIT_NAME,
                sources=cfg.sources,
                extra_cflags=cfg.cxx_flags,
                extra_cuda_cflags=cfg.nvcc_flags,
                extra_ldflags=[f"-L{d}" for d in cfg.library_dirs],
                extra_include_paths=cfg.include_dirs,
                build_directory=build_directory,
                verbose=verbose,
                with_cuda=True,
                is_python_module=False,  # torch.ops.load_library: registers the ops, no Python module needed
            )
            _jit_path = str(path)
        return _status_from_loaded(_jit_path, "loaded from the JIT build")
