"""Test set-up shared by every test file.

Without a GPU the Triton kernels must run in the interpreter, and Triton decides that when a kernel is decorated,
so TRITON_INTERPRET is set here, before anything imports vitkern. GPU tests carry ``@pytest.mark.gpu`` and are
skipped with a stated reason when CUDA is unavailable; ``@pytest.mark.slow`` sweeps run only in the GPU suite or
with VITKERN_RUN_SLOW=1.
"""

import os
import subprocess
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pytest_configure(config):
    # a kernel fault ends the process it poisoned, so that the tests after it get a fresh CUDA context
    from vitkern.testing import pytest_cuda_context

    config.pluginmanager.register(pytest_cuda_context, "vitkern-cuda-context")


def pytest_collection_modifyitems(config, items):
    run_slow = os.environ.get("VITKERN_RUN_SLOW") == "1" or HAS_CUDA
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none visible: torch.cuda.is_available() is False)")
    skip_interp = pytest.mark.skip(reason="Triton interpreter tests need TRITON_INTERPRET=1 (set automatically without a GPU)")
    skip_slow = pytest.mark.skip(reason="slow sweep: runs in the GPU suite or with VITKERN_RUN_SLOW=1")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "interpreter" in item.keywords and not INTERPRETED:
            item.add_marker(skip_interp)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session", autouse=True)
def _interpreted_kernels_pass_memcheck():
    """In the interpreter every Triton load and store must stay inside its launch's tensor arguments, and no two
    programs of a launch may store, or store and load, one address (vitkern.testing.memcheck): what
    compute-sanitizer's memcheck, and no sanitizer for global memory races, would find on the GPU.
    VITKERN_CHECK_MEMORY=0 turns it off."""
    if not INTERPRETED or os.environ.get("VITKERN_CHECK_MEMORY") == "0":
        yield
        return
    from vitkern.testing.memcheck import check_memory

    with check_memory():
        yield


@pytest.fixture(scope="session", autouse=True)
def _interpreted_bf16_as_on_the_gpu():
    """The interpreter's bf16 dots, casts and arithmetic are wrong (dots multiply the raw bits, casts truncate);
    vitkern.testing.interpreter_bf16 makes them compute as the GPU does, so bf16 parity runs on CPU too."""
    if not INTERPRETED:
        yield
        return
    from vitkern.testing.interpreter_bf16 import exact_bf16

    with exact_bf16():
        yield


@pytest.fixture(autouse=True)
def _seed_global_rng(request):
    """Every test starts from the global RNG seeded by its own id: the modules it builds (timm, torchvision and HF
    initialise from the global RNG; vitkern.testing.randomize_ perturbs that init) are fresh per case and the same
    on every run, so a failure reproduces."""
    from vitkern.testing import seed_for

    torch.manual_seed(seed_for(request.node.nodeid))


# ------------------------------------------------------------------ the CUDA C++ extension (tests skip with the reason)
@pytest.fixture(scope="module")
def ext():
    from vitkern._extension import extension_status, load_jit

    st = extension_status()
    if not st.available and os.environ.get("VITKERN_BUILD_CUDA") == "1":
        st = load_jit()  # the GPU suite JIT-builds first; here that is a ninja no-op check
    if not st.available:
        pytest.skip(f"vitkern._C not loaded: {st.reason}")
    return st


@pytest.fixture(scope="module")
def ops(ext):
    return torch.ops.vitkern_C


@pytest.fixture(scope="module")
def cuda_ops(ext):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    if not ext.can_run:
        pytest.skip(f"vitkern._C cannot run on this device: {ext.reason}")
    return torch.ops.vitkern_C


def _run_without_extension(code: str) -> str:
    """Run ``code`` in a fresh Python process in which ``vitkern._C`` cannot be imported (as on a machine that
    never built it); returns its stdout, failing the test on a non-zero exit."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("TRITON_INTERPRET", "1" if not HAS_CUDA else "0")
    r = subprocess.run([sys.executable, "-c", "import sys; sys.modules['vitkern._C'] = None\n" + code],
                       cwd=root, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture
def run_without_extension():
    return _run_without_extension
