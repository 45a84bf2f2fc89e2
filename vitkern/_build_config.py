"""Single source of truth for how ``csrc/`` is compiled (sources, archs, nvcc/g++ flags, include/lib dirs).

Used by ``setup.py`` (ahead-of-time build of ``vitkern._C``) and by ``vitkern._extension.load_jit`` (JIT build with
``torch.utils.cpp_extension.load``), so both produce the same binary.

Constraints:
  * standard library only, and it must not import torch or the ``vitkern`` package: ``setup.py`` loads this file by
    path (importlib) inside pip's isolated build env, where neither exists;
  * nothing here runs at import time except constant definitions.

Environment knobs (read by :func:`make_config`):
  * ``VITKERN_CUDA_ARCHS``  ``;``/``,``/space separated list of SM targets, default ``90a``. Examples: ``90a``,
    ``90a;80``, ``9.0a 8.0``. Each ``NN`` becomes ``-gencode=arch=compute_NN,code=sm_NN`` (SASS only, no PTX:
    arch-specific ``a`` PTX cannot be JIT-ed forward anyway, and shipping PTX for the others would only hide a missing
    target behind a slow first-launch JIT).
  * ``CUDA_HOME`` / ``CUDA_PATH``, else the toolkit that the ``nvcc`` on PATH belongs to, else ``/usr/local/cuda``
    (see :func:`find_cuda_home`).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import re
import shutil
from dataclasses import dataclass, field

DEFAULT_CUDA_ARCHS = "90a"

# The head dims / dtypes that csrc/common/dispatch.h instantiates; keep in sync (tests compare against the build).
HEAD_DIMS = (32, 64, 80, 96, 128)

_ARCH_RE = re.compile(r"^(\d+)\.?(\d)([af]?)$")


def parse_cuda_archs(spec: str | None = None) -> list[str]:
    """Parse a ``VITKERN_CUDA_ARCHS`` string into normalised SM names without the ``sm_`` prefix (``['90a', '80']``).

    Accepts ``90a``, ``9.0a``, ``sm_90a``, ``compute_90a``; separators ``;``, ``,`` or whitespace. Order is kept,
    duplicates dropped. Raises ``ValueError`` with the offending token on anything else.
    """
    if spec is None:
        spec = os.environ.get("VITKERN_CUDA_ARCHS", "") or DEFAULT_CUDA_ARCHS
    out: list[str] = []
    for tok in re.split(r"[;,\s]+", spec.strip()):
        if not tok:
            continue
        t = tok.lower()
        for prefix in ("sm_", "compute_"):
            if t.startswith(prefix):
                t = t[len(prefix):]
        m = _ARCH_RE.match(t)
        if m is None or int(m.group(1)) < 7:
            raise ValueError(
                f"VITKERN_CUDA_ARCHS: cannot parse {tok!r}; expected SM targets like '90a', '80' or '9.0a' "
                f"separated by ';' (got {spec!r})"
            )
        arch = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        if arch not in out:
            out.append(arch)
    if not out:
        raise ValueError(f"VITKERN_CUDA_ARCHS is empty (got {spec!r}); e.g. '90a' or '90a;80'")
    return out


def gencode_flags(archs: list[str]) -> list[str]:
    """``-gencode=arch=compute_X,code=sm_X`` per arch.

    Deliberately not ``-arch=sm_90a``: that shorthand also embeds compute_90a PTX and, with some nvcc versions, runs a
    plain sm_90 pass that rejects wgmma/setmaxnreg. One explicit gencode per target compiles exactly what we ship.
    """
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


def archs_define(archs: list[str]) -> str:
    """``-DVITKERN_CUDA_ARCHS=90a+80``, stringified in C++ (csrc/common/config.h) for build_info / error messages.

    The value must survive the shell (ninja runs commands through sh), nvcc's option parser and the preprocessor:
    nvcc splits option values at commas (``-DX=a,b`` defines ``X=a`` *and* ``b``), ``;`` ends a shell command, and
    identifiers could collide with macros. ``90a+80`` is just pp-numbers and ``+``: safe in all three.
    """
    return "-DVITKERN_CUDA_ARCHS=" + "+".join(archs)


def _is_toolkit(home: str) -> bool:
    return (os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h"))
            and os.path.isfile(os.path.join(home, "bin", "nvcc")))


def find_cuda_home() -> str | None:
    """The CUDA toolkit root: ``$CUDA_HOME``/``$CUDA_PATH`` if set, else the toolkit the ``nvcc`` on PATH belongs to,
    else ``/usr/local/cuda``.

    Unlike ``torch.utils.cpp_extension._find_cuda_home`` (``dirname(dirname(which nvcc))``) this checks that the
    candidate really is a toolkit (``include/cuda_runtime_api.h`` + ``bin/nvcc``): on images where
    ``/usr/local/bin/nvcc`` is a wrapper script around ``/usr/local/cuda-13.0/bin/nvcc``, torch's guess is
    ``/usr/local``, which has neither the CUDA headers nor ``lib64/libcudart.so``. setup.py / load_jit export the
    result as ``CUDA_HOME`` so torch uses it too.
    """
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home if os.path.isdir(home) else None
    candidates: list[str] = []
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates += [os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), os.path.dirname(os.path.dirname(nvcc))]
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if _is_toolkit(home):
            return home
    return None


def find_nvcc(cuda_home: str | None) -> str | None:
    if cuda_home:
        nvcc = os.path.join(cuda_home, "bin", "nvcc")
        if os.path.isfile(nvcc) and os.access(nvcc, os.X_OK):
            return nvcc
    return shutil.which("nvcc")


def nvidia_pip_dirs() -> tuple[list[str], list[str]]:
    """Include and lib dirs of the ``nvidia`` namespace pip packages that torch pulled in (cu13: ``nvidia/cu13``;
    cu12: ``nvidia/<lib>``). Found without importing torch. Empty lists if the packages are absent.

    Why: a minimal system CUDA toolkit (e.g. nvcc-only images) lacks cusparse.h/cublas_v2.h, which
    ATen/cuda/CUDAContext.h includes, and sometimes the unversioned libcudart.so the link step asks for. The pip
    wheels carry both. They are added *after* the toolkit's own dirs (see :class:`BuildConfig`), so a header present
    in both always comes from the toolkit that nvcc belongs to.
    """
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        spec = None
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    incs: list[str] = []
    libs: list[str] = []
    for root in roots:
        for sub in sorted(glob.glob(os.path.join(root, "*"))):
            inc, lib = os.path.join(sub, "include"), os.path.join(sub, "lib")
            if os.path.isdir(inc) and inc not in incs:
                incs.append(inc)
            if os.path.isdir(lib) and lib not in libs:
                libs.append(lib)
    # Put the CUDA-runtime package first: it is the one whose headers we actually need (cusparse, cublas, ...).
    incs.sort(key=lambda p: 0 if os.sep + "cu13" + os.sep in p or os.sep + "cu12" + os.sep in p else 1)
    libs.sort(key=lambda p: 0 if os.sep + "cu13" + os.sep in p or os.sep + "cu12" + os.sep in p else 1)
    return incs, libs


def cudart_link_shim(shim_dir: str, cuda_home: str | None, pip_lib_dirs: list[str]) -> str | None:
    """torch links extensions with ``-lcudart``, which needs an unversioned ``libcudart.so`` in a ``-L`` dir.

    If the toolkit has one, return None (nothing to do). Otherwise, if a pip wheel has ``libcudart.so.<N>``, create
    ``shim_dir/libcudart.so -> that file`` and return ``shim_dir`` to be added as a library dir. The resulting .so
    records the SONAME ``libcudart.so.<N>``, i.e. at run time it binds to the cudart torch has already loaded.
    """
    if cuda_home:
        for d in (os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib"),
                  os.path.join(cuda_home, "targets", "x86_64-linux", "lib")):
            if os.path.exists(os.path.join(d, "libcudart.so")):
                return None
    for d in pip_lib_dirs:
        if os.path.exists(os.path.join(d, "libcudart.so")):
            return d
    for d in pip_lib_dirs:
        versioned = sorted(glob.glob(os.path.join(d, "libcudart.so.[0-9]*")))
        if versioned:
            os.makedirs(shim_dir, exist_ok=True)
            link = os.path.join(shim_dir, "libcudart.so")
            target = os.path.realpath(versioned[0])
            if os.path.realpath(link) != target:
                if os.path.lexists(link):
                    os.remove(link)
                os.symlink(target, link)
            return shim_dir
    return None


def csrc_sources(csrc_dir: str, relative_to: str | None = None) -> list[str]:
    """All ``*.cpp`` and ``*.cu`` under ``csrc_dir`` (recursive, sorted). Relative to ``relative_to`` if given
    (setuptools wants paths relative to setup.py)."""
    files: list[str] = []
    for ext in ("cpp", "cu"):
        files += glob.glob(os.path.join(csrc_dir, "**", f"*.{ext}"), recursive=True)
    files = sorted(os.path.abspath(f) for f in files)
    if relative_to is not None:
        files = [os.path.relpath(f, relative_to) for f in files]
    return files


CSRC_SUFFIXES = (".cpp", ".cu", ".cuh", ".h", ".hpp")
DIGEST_MARKER = b"VITKERN_CSRC_DIGEST="  # in the built library's bytes, before the digest and a ';' (csrc/vitkern_C.cpp)


def csrc_digest(csrc_dir: str) -> str:
    """16 hex digits of SHA-256 over every source and header under ``csrc_dir`` (relative paths and bytes, sorted):
    baked into the binary, so a library built from other sources is found stale before it is imported."""
    h = hashlib.sha256()
    files = sorted(f for f in glob.glob(os.path.join(csrc_dir, "**", "*"), recursive=True)
                   if f.endswith(CSRC_SUFFIXES) and os.path.isfile(f))
    for f in files:
        h.update(os.path.relpath(f, csrc_dir).replace(os.sep, "/").encode() + b"\0")
        with open(f, "rb") as fh:
            h.update(fh.read() + b"\0")
    return h.hexdigest()[:16]


def digest_define(digest: str) -> str:
    """``-DVITKERN_CSRC_DIGEST=0x<hex>``: a pp-number, stringified in C++ (csrc/common/config.h) like the archs."""
    return f"-DVITKERN_CSRC_DIGEST=0x{digest}"


def built_digest(library_path: str) -> str | None:
    """The digest baked into a built library (None: none found, e.g. built before digests existed)."""
    with open(library_path, "rb") as fh:
        data = fh.read()
    at = data.find(DIGEST_MARKER + b"0x")
    if at < 0:
        return None
    start = at + len(DIGEST_MARKER) + 2
    end = data.find(b";", start, start + 64)
    return data[start:end].decode("ascii", "replace") if end > start else None


@dataclass
class BuildConfig:
    archs: list[str]
    cuda_home: str | None
    nvcc: str | None
    csrc_dir: str
    sources: list[str]
    include_dirs: list[str]  # -I, searched first: csrc/ itself (absolute)
    fallback_include_dirs: list[str] = field(default_factory=list)  # -isystem, after torch's and the toolkit's
    library_dirs: list[str] = field(default_factory=list)
    cxx_flags: list[str] = field(default_factory=list)
    nvcc_flags: list[str] = field(default_factory=list)
    csrc_digest: str = ""

    def describe(self) -> str:
        return (f"archs={';'.join(self.archs)} cuda_home={self.cuda_home} nvcc={self.nvcc} "
                f"sources={len(self.sources)} fallback_includes={self.fallback_include_dirs} "
                f"library_dirs={self.library_dirs} csrc_digest={self.csrc_digest}")


def make_config(csrc_dir: str, *, shim_dir: str, relative_to: str | None = None,
                archs_spec: str | None = None) -> BuildConfig:
    """Compute everything needed to compile ``csrc_dir``. ``shim_dir``: where a libcudart.so link may be created.

    Flags (both setup.py and load_jit get exactly these; torch adds its own -I/-L/-l, -fPIC, ABI defines and
    ``COMMON_NVCC_FLAGS`` on top):
      * ``-O3``; ``-std=c++17``; ``-lineinfo`` (source lines in SASS for ncu/compute-sanitizer, no runtime cost);
      * ``--expt-relaxed-constexpr`` (constexpr host fns in device code; CUTLASS/cute need it) and
        ``--expt-extended-lambda`` (``__device__`` lambdas in dispatch code);
      * ``-U__CUDA_NO_HALF_OPERATORS__`` & co.: torch defines these to disable ``__half``/``__nv_bfloat16``
        operators and implicit conversions; our kernels want them (FlashAttention does the same);
      * NO ``--use_fast_math``: it makes every ``expf``/``/``/``sqrtf`` in every kernel approximate and flushes
        denormals, which silently loosens LayerNorm/GELU/softmax against the PyTorch reference. Kernels that want the
        fast path use explicit intrinsics (``__expf``, ``exp2f`` with a pre-scaled log2e, ``__fdividef``) locally.
    """
    archs = parse_cuda_archs(archs_spec)
    cuda_home = find_cuda_home()
    nvcc = find_nvcc(cuda_home)
    pip_incs, pip_libs = nvidia_pip_dirs()
    lib_dirs: list[str] = []
    shim = cudart_link_shim(shim_dir, cuda_home, pip_libs)
    if shim is not None:
        lib_dirs.append(shim)

    digest = csrc_digest(csrc_dir)
    defines = [archs_define(archs), digest_define(digest)]
    fallback = [f for inc in pip_incs for f in ("-isystem", inc)]
    cxx = ["-O3", "-std=c++17", *defines, *fallback]
    nvcc_flags = [
        "-O3",
        "-std=c++17",
        "-lineinfo",
        "--expt-relaxed-constexpr",
        "--expt-extended-lambda",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_HALF2_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        *gencode_flags(archs),
        *defines,
        *fallback,
    ]
    return BuildConfig(
        archs=archs,
        cuda_home=cuda_home,
        nvcc=nvcc,
        csrc_dir=os.path.abspath(csrc_dir),
        sources=csrc_sources(csrc_dir, relative_to),
        include_dirs=[os.path.abspath(csrc_dir)],
        fallback_include_dirs=pip_incs,
        library_dirs=lib_dirs,
        cxx_flags=cxx,
        nvcc_flags=nvcc_flags,
        csrc_digest=digest,
    )
