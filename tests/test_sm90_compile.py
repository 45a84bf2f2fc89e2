"""Every Triton kernel compiles for Hopper (sm_90a) at ViT shapes, with no GPU needed.

The interpreter parity tests cannot see GPU-only failures (a ``tl.dot`` side < 16, shared memory beyond the 227 KB
one block may use, operand dtype mismatches, ...). Here each launcher is called with ``meta`` tensors at ViT/Swin
shapes; ``vitkern.testing.sm90_compile.launches`` records every kernel launch it would make on the GPU with the
autotune configs it would try (after the launcher's ``early_config_prune``), and each (launch, config, dtype) is
compiled by the real compiler down to a cubin (Triton's bundled ptxas) for ``GPUTarget("cuda", 90, 32)``.

Asserted per case: it compiles; shared memory <= 232448 bytes, or else the launch is autotuned over several
configs (Triton's autotuner skips a config that raises OutOfResources at run time: reported as "skip@run") and
``test_some_config_fits`` checks another config of it fits; every 16-bit ``tl.dot`` runs on tensor cores, as wgmma
(Hopper's warpgroup MMA) wherever Triton allows it (whole warpgroups, M % 64 == 0: ``wgmma_possible``), else as
mma.sync. The table's wgmma column counts wgmma dots / all dots; fp32 dots use ``input_precision="ieee"`` (FMA).

CI runs the first config the launcher would try (the one ``VITKERN_AUTOTUNE=0`` runs, which must fit) at every shape
in fp32 and at one shape per op family in bf16; the whole matrix (every config, bf16/fp16/fp32) is ``slow``. ``pytest -s`` prints the table.
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
import triton
import triton.language as tl

from vitkern.kernels.triton import attention as attn_k
from vitkern.kernels.triton import layer_norm as ln_k
from vitkern.kernels.triton import ln_linear as lnl_k
from vitkern.kernels.triton import patch_embed as pe_k
from vitkern.kernels.triton import window_attention as win_k
from vitkern.testing.sm90_compile import (
    FRESH_PROCESS_ENV, SMEM_LIMIT_SM90, CompileInfo, Launch, compile_many, compile_sm90, launches, wgmma_possible,
)

# Running Triton kernels in the interpreter (the parity tests) leaves triton.language patched in that process, which
# breaks real compilation: these tests run in a process of their own, started by test_sm90_compile_isolated.py.
pytestmark = pytest.mark.skipif(
    os.environ.get(FRESH_PROCESS_ENV) != "1",
    reason="runs in a fresh process (tests/test_sm90_compile_isolated.py), away from the Triton interpreter",
)

META = torch.device("meta")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CI_DTYPES = ("bf16", "fp32")


def _t(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device=META)


# ---------------------------------------------------------------------------------- launches per op family / shape
def layer_norm_launches(width: int, dtype, residual: bool):
    M = 197 * 8  # ViT-B/16 at batch 8
    x, w = _t(M, width, dtype=dtype), _t(width, dtype=dtype)
    mean, rstd = _t(M), _t(M)
    out = launches(ln_k, ln_k.layer_norm_fwd, x, w, w, None, 1e-6, _t(M, width, dtype=dtype), None, mean, rstd)
    if residual:  # pre-norm block with the residual add fused
        out += launches(ln_k, ln_k.layer_norm_fwd, x, w, w, x, 1e-6, _t(M, width, dtype=dtype),
                        _t(M, width, dtype=dtype), mean, rstd)
    out += launches(ln_k, ln_k.layer_norm_bwd, x, None, x, w, mean, rstd, _t(M, width, dtype=dtype), True, True)
    return _tag(out, ["fwd", "fwd+res", "bwd"] if residual else ["fwd", "bwd"])


def attention_launches(head_dim: int, dtype, n: int = 197, batch: int = 8):
    heads = {32: 6, 64: 12, 72: 16, 80: 16, 96: 8, 128: 16, 160: 4, 256: 4}[head_dim]  # DeiT-S, ViT-B, so400m, ...
    qkv = _t(batch, n, 3, heads, head_dim, dtype=dtype)  # the packed qkv linear output, read per head as views
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    o = _t(batch, n, heads, head_dim, dtype=dtype).transpose(1, 2)  # written straight into the proj input layout
    lse = _t(batch, heads, n)
    dqkv = _t(batch, n, 3, heads, head_dim, dtype=dtype)
    dq, dk, dv = (dqkv[:, :, i].transpose(1, 2) for i in range(3))
    out = launches(attn_k, attn_k.attention_fwd, q, k, v, head_dim ** -0.5, o, lse)
    out += launches(attn_k, attn_k.attention_bwd, o, q, k, v, o, lse, head_dim ** -0.5, dq, dk, dv)
    return out


def window_attention_launches(ws: int, dtype, head_dim: int = 32):
    # (map side, heads): Swin-T stage 1 (ws 7), Swin-B @384 stage 1 (ws 12), SwinV2 @256 stage 1 (ws 16); D = 32
    # (every Swin's), and D = 128, the widest the backend takes (in fp32 only up to 64 KB K/V tiles: not at ws 12/16)
    side, heads, batch = {7: (56, 3), 12: (96, 4), 16: (64, 3)}[ws] + (2,)
    qkv = _t(batch, side, side, 3 * heads * head_dim, dtype=dtype)
    bias = _t(3 * heads * head_dim, dtype=dtype)
    table = _t((2 * ws - 1) ** 2, heads, dtype=dtype)
    out = _t(batch, side, side, heads * head_dim, dtype=dtype)
    nw = math.ceil(side / ws) ** 2
    lse = _t(batch * nw, heads, ws * ws)
    geo = (heads, (ws, ws), (ws // 2, ws // 2), head_dim ** -0.5, -100.0, False)  # shifted block, timm semantics
    res = launches(win_k, win_k.window_attention_fwd, qkv, bias, table, *geo, out, lse)
    res += launches(win_k, win_k.window_attention_bwd, out, qkv, bias, table, out, lse, *geo, _t(*qkv.shape, dtype=dtype),
                    True, True)
    return res


def ln_linear_launches(width: int, dtype, stream_dtype=None):
    """``stream_dtype``: the residual stream's dtype (x, the residual, fc2's output and its gradient) when it is not
    the weights' (fp32 under bf16 autocast: fp32 A tiles, rounded in the prologue or on load)."""
    M, hidden = 197 * 8, 4 * width
    x = _t(M, width, dtype=stream_dtype or dtype)
    mean, rstd, g = _t(M), _t(M), _t(width, dtype=dtype)
    w_qkv, w1, w2 = _t(3 * width, width, dtype=dtype), _t(hidden, width, dtype=dtype), _t(width, hidden, dtype=dtype)
    h, pre = _t(M, hidden, dtype=dtype), _t(M, hidden, dtype=dtype)
    out = launches(lnl_k, lnl_k.ln_stats, x, 1e-6, mean, rstd)
    out += launches(lnl_k, lnl_k.ln_apply, x, mean, rstd, g, g, _t(M, width, dtype=dtype))  # LN(x) for dW
    out += launches(lnl_k, lnl_k.fused_linear, x, w_qkv.t(), _t(M, 3 * width, dtype=dtype), ln=(mean, rstd, g, g),
                    bias=_t(3 * width, dtype=dtype))  # LN + qkv
    out += launches(lnl_k, lnl_k.fused_linear, x, w1.t(), h, ln=(mean, rstd, g, g), bias=_t(hidden, dtype=dtype),
                    act=lnl_k.ACT_GELU_ERF, pre=pre)  # LN + fc1 + GELU
    out += launches(lnl_k, lnl_k.fused_linear, h, w2.t(), _t(M, width, dtype=x.dtype), bias=g, residual=x,
                    layer_scale=g)  # fc2 + layer scale + residual
    out += launches(lnl_k, lnl_k.fused_linear, x, w2, _t(M, hidden, dtype=dtype), act=lnl_k.ACT_GELU_ERF, pre=pre,
                    act_bwd=True)  # backward through fc2 and GELU
    out += launches(lnl_k, lnl_k.fused_linear, x, w2, _t(M, hidden, dtype=dtype), a_scale=g, act=lnl_k.ACT_GELU_ERF,
                    pre=pre, act_bwd=True)  # the same with a layer scale on dy in the prologue (fp16's)
    out += launches(lnl_k, lnl_k.fused_linear, h, w1, _t(M, width, dtype=dtype))  # backward through fc1
    out += launches(lnl_k, lnl_k.fused_linear, x, w_qkv[:width].t(), _t(M, width, dtype=x.dtype), bias=g,
                    residual=x)  # linear_residual: proj + residual (Swin: no layer scale); mixed: fp32 dy @ W
    return _tag(out, ["stats", "apply", "qkv", "fc1", "fc2", "fc2-bwd", "fc2-bwd-scaled", "fc1-bwd", "proj"])


def patch_embed_launches(patch: int, dtype, uint8_norm: bool = False, token_dtype=None):
    """``token_dtype``: pos, prefix and the output's dtype when not the weight's (fp32 tokens under autocast)."""
    B, D, side = 8, 768, 224
    x = _t(B, 3, side, side, dtype=torch.uint8 if uint8_norm else dtype)
    norm = _t(2, 3) if uint8_norm else None
    weight = _t(D, 3, patch, patch, dtype=dtype)
    np_ = (side // patch) ** 2
    pos, prefix = _t(1 + np_, D, dtype=token_dtype or dtype), _t(1, D, dtype=token_dtype or dtype)
    out = _t(B, 1 + np_, D, dtype=token_dtype or dtype)
    res = launches(pe_k, pe_k.patch_embed_fwd, x, norm, weight, _t(D, dtype=dtype), pos, prefix, True, out)
    if not uint8_norm:
        dout = _t(B, 1 + np_, D, dtype=dtype)  # the op hands the GEMM kernels dout in the weight's dtype
        res += launches(pe_k, pe_k.patch_embed_dx, dout, weight, norm, _t(B, 3, side, side, dtype=dtype), 1)
        res += launches(pe_k, pe_k.patch_embed_dw, dout, x, norm, weight, 1)
    return res


def _tag(launch_list: list[Launch], tags: list[str]) -> list[Launch]:
    assert len(launch_list) == len(tags), [la.name for la in launch_list]
    for la, tag in zip(launch_list, tags):
        la.tag = tag
    return launch_list


# (family, shape id, builder(dtype), dtypes, in CI)
SHAPES = (
    [("layer_norm", f"N{w}", lambda dt, w=w: layer_norm_launches(w, dt, residual=w == 768), DTYPES, w == 768)
     for w in (384, 768, 1024, 1280)]
    + [("attention", f"D{d}-N197", lambda dt, d=d: attention_launches(d, dt), DTYPES, d == 64)
       for d in (32, 64, 72, 80, 96, 128, 160, 256)]
    + [("window_attention", f"ws{ws}-D32", lambda dt, ws=ws: window_attention_launches(ws, dt), DTYPES, ws == 7)
       for ws in (7, 12, 16)]
    + [("window_attention", f"ws{ws}-D128", lambda dt, ws=ws: window_attention_launches(ws, dt, head_dim=128),
        ("bf16", "fp16"), ws == 16) for ws in (12, 16)]
    + [("ln_linear", f"C{c}-H{4 * c}", lambda dt, c=c: ln_linear_launches(c, dt), DTYPES, c == 768) for c in (768, 1024)]
    + [("patch_embed", f"p{p}-D768", lambda dt, p=p: patch_embed_launches(p, dt), DTYPES, p == 16) for p in (14, 16)]
    + [("patch_embed", "p16-D768-uint8norm", lambda dt: patch_embed_launches(16, dt, uint8_norm=True),
        ("bf16", "fp32"), False)]
    # mixed precision (autocast of an fp32 model): fp32 residual stream / tokens over 16-bit weights
    + [("ln_linear", "C768-H3072-fp32stream", lambda dt: ln_linear_launches(768, dt, torch.float32), ("bf16",), True),
       ("patch_embed", "p16-D768-fp32tokens", lambda dt: patch_embed_launches(16, dt, token_dtype=torch.float32),
        ("bf16",), True)]
)


@dataclasses.dataclass
class Case:
    family: str
    shape: str
    dtype: str
    launch: Launch
    index: int  # which config of the launch
    ci: bool

    @property
    def kernel(self) -> str:
        return self.launch.name + (f"[{self.launch.tag}]" if self.launch.tag else "")

    @property
    def config(self) -> str:
        """e.g. "M128 N64 w8 s3": the tile sizes (autotune config, or the fixed launch's) and warps / stages."""
        kw, warps, stages = self.launch.configs[self.index]
        tiles = {**{k: v for k, v in self.launch.kwargs.items() if k.startswith("BLOCK_")}, **kw}
        if tiles.get("BLOCK_D2"):  # a head dim in two chunks (attention): "D64+16"
            tiles["BLOCK_D"] = f"{tiles['BLOCK_D']}+{tiles['BLOCK_D2']}"
        tiles.pop("BLOCK_D2", None)
        order = {"BLOCK_M": 0, "BLOCK_N": 1, "BLOCK_K": 2, "BLOCK_D": 3}
        return " ".join([f"{k.removeprefix('BLOCK_')}{tiles[k]}" for k in sorted(tiles, key=lambda k: order.get(k, 9))]
                        + [f"w{warps}", f"s{stages}"])

    @property
    def id(self) -> str:
        return f"{self.family}-{self.shape}-{self.dtype}-{self.kernel}-{self.index}"


def _launch_key(c: Case) -> str:
    return f"{c.family}-{c.shape}-{c.dtype}-{c.kernel}"


def _collect() -> list[Case]:
    cases = []
    for family, shape, build, dtypes, ci_shape in SHAPES:
        for dt in dtypes:
            for launch in build(DTYPES[dt]):
                for i in range(len(launch.configs)):
                    # CI: the first config at one shape per family in bf16/fp32, and at every shape in fp32 (the
                    # dtype needing the most shared memory): the first config must fit everywhere (see tuning.py)
                    ci = i == 0 and ((ci_shape and dt in CI_DTYPES) or dt == "fp32")
                    cases.append(Case(family, shape, dt, launch, i, ci))
    return cases


CASES = _collect()

# Known GPU-compile failures (strict xfail: fixing the kernel turns them into an XPASS to remove from here).
# Key: a prefix of Case.id; value: the reason.
KNOWN_FAILURES: dict[str, str] = {}


def _param(c: Case):
    marks = [] if c.ci else [pytest.mark.slow]
    reason = next((r for k, r in KNOWN_FAILURES.items() if c.id.startswith(k)), None)
    if reason:
        marks.append(pytest.mark.xfail(strict=True, reason=reason))
    return pytest.param(c, id=c.id, marks=marks)


# ------------------------------------------------------------------------------------------------ compile + table
_RESULTS: dict[str, CompileInfo | Exception] = {}
_ROWS: list[tuple] = []


def _compile(c: Case) -> CompileInfo:
    if c.id not in _RESULTS:
        _RESULTS[c.id] = compile_many([_job(c)], workers=1)[0]
    res = _RESULTS[c.id]
    if isinstance(res, Exception):
        raise res
    return res


def _job(c: Case):
    kw, warps, stages = c.launch.configs[c.index]
    return lambda: compile_sm90(c.launch.kernel, c.launch.args, {**c.launch.kwargs, **kw}, num_warps=warps,
                                num_stages=stages)


@pytest.fixture(scope="module", autouse=True)
def _compile_selected_and_print_table(request):
    """Compile every case the session will run up front, on a thread pool (the whole matrix takes minutes on
    one core); the tests then read the results. Prints the table at the end (visible with ``pytest -s``)."""
    selected = {}
    for item in request.session.items:
        if item.module is request.module and not item.get_closest_marker("skip"):
            spec = getattr(item, "callspec", None)
            c = spec.params.get("case") if spec else None  # (test_some_config_fits compiles lazily: it stops early)
            if c is not None and c.id not in _RESULTS:
                selected[c.id] = c
    cases = list(selected.values())
    for c, res in zip(cases, compile_many([_job(c) for c in cases])):
        _RESULTS[c.id] = res
    yield
    if not _ROWS:
        return
    head = ("kernel", "shape", "config", "dtype", "smem KB", "regs", "spill B", "wgmma", "note")
    rows = [head] + sorted(_ROWS)
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    print("\n\nsm_90a compile table (GPUTarget cuda 90; smem limit 227 KB):")
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_compiles_for_sm90(case: Case):
    info = _compile(case)
    note = ""
    if not info.fits:
        note = "skip@run (OutOfResources)" if case.launch.autotuned and case.index > 0 else "TOO BIG"
    elif info.dots and case.dtype == "fp32":
        note = "fp32 dots on FMA (ieee)"
    wgmma = f"{sum(k == 'wgmma' for k, _, _ in info.dots)}/{len(info.dots)}" if info.dots else "-"
    _ROWS.append((case.kernel, f"{case.family}:{case.shape}", case.config, case.dtype, f"{info.shared / 1024:.1f}",
                  info.regs, info.spill_bytes, wgmma, note))
    if not info.fits:
        # a config over the limit is fine only when the autotuner has others to fall back on, and it is not the
        # first: that one is all VITKERN_AUTOTUNE=0 runs (vitkern/kernels/triton/tuning.py)
        assert case.launch.autotuned and len(case.launch.configs) > 1 and case.index > 0, (
            f"{case.id}: {info.shared} B of shared memory > {SMEM_LIMIT_SM90} B, and it is the launch's only or "
            f"first config (OutOfResources at launch; the first is what VITKERN_AUTOTUNE=0 runs)")
    if case.dtype != "fp32" and case.launch.name == "fused_linear_kernel":
        # the GEMM epilogue runs on column slices of the accumulator (ln_linear.py); over the whole 128×128 tile per
        # warpgroup it spilled 0.3 KB (GELU) to 1.3 KB (GELU') per thread. What is left: ≤ 32 B, from the fp32-stream
        # LN prologue of one config. The stack frame counts spills even when Triton's cache hid the ptxas log.
        assert info.stack <= 64, f"{case.id}: {info.stack} B of stack per thread (register spills) in the GEMM"
    if case.dtype != "fp32":
        for kind, m, n in info.dots:
            assert kind != "fma", f"{case.id}: a 16-bit {m}x{n} tl.dot compiled to FMA, not tensor cores"
            if wgmma_possible(m, n, info.num_warps):
                assert kind == "wgmma", f"{case.id}: a 16-bit {m}x{n} tl.dot with {info.num_warps} warps is not wgmma"


def _launch_groups():
    groups: dict[str, list[Case]] = {}
    for c in CASES:
        groups.setdefault(_launch_key(c), []).append(c)
    out = []
    for key, cs in groups.items():
        if len(cs) < 2:
            continue  # a single config is fully checked by test_compiles_for_sm90
        in_ci = any(c.ci for c in cs)
        out.append(pytest.param(cs, id=key, marks=[] if in_ci else [pytest.mark.slow]))
    return out


@pytest.mark.parametrize("cases", _launch_groups())
def test_some_config_fits(cases: list[Case]):
    """Some config of each autotuned launch compiles within the shared-memory limit (else every launch fails)."""
    fitting = []
    for c in cases:
        try:
            info = _compile(c)
        except Exception:  # noqa: BLE001 - reported by test_compiles_for_sm90
            continue
        if info.fits:
            fitting.append(c.config)
            break
    assert fitting, f"{_launch_key(cases[0])}: no config compiles within {SMEM_LIMIT_SM90} B of shared memory"


# ------------------------------------------------------------------------------------ the checker catches failures
@triton.jit
def _small_dot_kernel(A, B, C, BLOCK: tl.constexpr):
    # [BLOCK, BLOCK] @ [BLOCK, BLOCK]: runs in the interpreter at any size, needs BLOCK >= 16 on the GPU
    idx = tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    tl.store(C + idx, tl.dot(tl.load(A + idx), tl.load(B + idx)))


@pytest.mark.parametrize("block", [8, 16])
def test_checker_rejects_a_dot_below_16(block):
    """What the interpreter accepts and the sm_90 compiler rejects is reported as a compile error."""
    a = _t(block, block, dtype=torch.float16)
    if block < 16:
        with pytest.raises(Exception, match="K >= 16"):  # triton.compiler.errors.CompilationError
            compile_sm90(_small_dot_kernel, (a, a, _t(block, block)), dict(BLOCK=block), num_warps=4)
    else:
        info = compile_sm90(_small_dot_kernel, (a, a, _t(block, block)), dict(BLOCK=block), num_warps=4)
        assert info.fits and info.dots and info.dots[0][0] == "mma"  # 16 rows: mma.sync (wgmma needs 64)


# ------------------------------------------------------------------------------------------ VITKERN_AUTOTUNE=0 launches
@pytest.mark.parametrize("family, shape, build", [(f, s, b) for f, s, b, _, _ in SHAPES],
                         ids=[f"{f}-{s}" for f, s, *_ in SHAPES])
def test_autotune_off_launches_only_the_first_config(monkeypatch, family, shape, build):
    """With VITKERN_AUTOTUNE=0 every autotuned launch runs one config: the first of the list it tunes over (which
    test_compiles_for_sm90 checks fits). Recorded without compiling, so every op family's launcher is covered."""
    monkeypatch.delenv("VITKERN_AUTOTUNE", raising=False)
    tuned = build(torch.bfloat16)
    monkeypatch.setenv("VITKERN_AUTOTUNE", "0")
    first_only = build(torch.bfloat16)
    assert [la.name for la in first_only] == [la.name for la in tuned]
    assert any(la.autotuned for la in tuned), f"{family}: no autotuned launch recorded"
    for off, on in zip(first_only, tuned):
        assert off.configs == on.configs[:1], (off.name, off.configs, on.configs)
