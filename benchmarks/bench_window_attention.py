"""Shifted-window attention benchmark: Swin window attention from the packed qkv output to the [B, H, W, C] output.

Cases (bf16, head_dim 32, window 7, fwd and fwd+bwd): Swin-T stage 1 (B=128, 56x56, shift 3, 3 heads) and stage 3
(B=128, 14x14, shift 3, 12 heads); stage 1 unshifted too when not --quick. Every provider takes the same inputs
(qkv [B, H, W, 3·heads·D], the relative position bias table and the qkv bias, all requiring grad for fwd+bwd) and
returns the attention output before the proj linear:

- ``timm-eager``: timm's path: roll + partition + (q·scale) kᵀ + gathered bias + mask + softmax + ·v + reverse +
  roll (the baseline; the mask is precomputed, as timm's buffer);
- ``sdpa-mask``: timm's ``fused_attn`` path: the same windowing, SDPA with bias + mask folded into one float
  [B·nW, heads, N, N] mask (so no flash backend);
- ``flex``: FlexAttention under torch.compile: score_mod adds the gathered bias, mask_mod keeps same-region
  pairs (the windowing compiled with it);
- ``vitkern``: ``vitkern.functional.window_attention`` (default dispatch; no roll/partition/mask tensors);
- ``vitkern-cuda``: the same with the CUDA C++ forward forced (backward: Triton), to compare with ``vitkern`` and
  decide the backend ranking (vitkern/ops/window_attention_cuda.py).

Every row's ``extra`` has ``peak_mib``: the peak memory one call (fwd, or fwd+bwd) allocates beyond its inputs.
Targets (printed, not asserted): vitkern >= 4x timm-eager, >= 2x sdpa-mask, >= 1.5x flex, fwd and fwd+bwd.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from vitkern.bench.harness import (
    CPU_TIMER, FWD, FWD_BWD, Benchmark, Case, Context, Provider, Row, Work, compile_fresh,
    cuda_vs_triton_targets, peak_mib, run_benchmark, vitkern_backend_unavailable,
)

NAME = "window_attention"
HEAD_DIM, WINDOW = 32, 7
STAGES = {"swin_t_stage1": (128, 56, 3), "swin_t_stage3": (128, 14, 12)}  # (batch, map side, heads)
TARGETS = {"timm-eager": 4.0, "sdpa-mask": 2.0, "flex": 1.5}
TARGET_CUDA_BEST = 1.15  # issue 7: the shape class the CUDA kernel is specialised for


def _vitkern() -> Any:
    import vitkern
    import vitkern.functional  # noqa: F401

    return vitkern


def _geometry(case: Case) -> tuple[int, int, int, int, int, int]:
    p = case.params
    return p["B"], p["HW"], p["heads"], p["D"], p["ws"], p["shift"]


def make_inputs(case: Case, device: torch.device) -> dict[str, Tensor]:
    B, hw, heads, d, ws, _ = _geometry(case)
    grad = case.direction == FWD_BWD
    kw: dict[str, Any] = dict(device=device, dtype=case.dtype)
    return {  # random, never zeros; O(1) q/k/v and bias entries as in a trained Swin
        "qkv": torch.randn(B, hw, hw, 3 * heads * d, **kw).requires_grad_(grad),
        "table": torch.randn((2 * ws - 1) ** 2, heads, **kw).requires_grad_(grad),
        "qkv_bias": (0.1 * torch.randn(3 * heads * d, **kw)).requires_grad_(grad),
    }


def model(case: Case, provider: Provider) -> Work:
    """Fewest bytes / flops (e = element size, T = B·H·W tokens, C = heads·D, N = ws², nW windows per image).

    fwd:     read qkv (3C·e per token), write out (C·e per token); QKᵀ and PV: 4·B·nW·heads·N²·D flops.
    fwd+bwd: plus read qkv, out and dout again and write dqkv (8C·e per token); backward matmuls counted as 2.5x
             the forward's (FlashAttention's convention, recomputation not counted). The table is negligible.
    """
    B, hw, heads, d, ws, _ = _geometry(case)
    e, tokens, c = case.dtype.itemsize, B * hw * hw, heads * d
    flops = 4.0 * tokens * heads * ws * ws * d  # B·nW·N = tokens
    if case.direction == FWD:
        return Work(bytes=4.0 * c * e * tokens, flops=flops)
    return Work(bytes=12.0 * c * e * tokens, flops=3.5 * flops)


# ------------------------------------------------------------------------------------------------ baselines
def _window_qkv(qkv: Tensor, heads: int, ws: int, shift: int) -> tuple[Tensor, Tensor, Tensor]:
    """timm: roll by -shift, partition: q, k, v [B·nW, heads, N, D] (maps here are window multiples: no pad)."""
    B, H, W, c3 = qkv.shape
    if shift:
        qkv = torch.roll(qkv, shifts=(-shift, -shift), dims=(1, 2))
    x = qkv.view(B, H // ws, ws, W // ws, ws, c3).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(-1, ws * ws, 3, heads, c3 // (3 * heads))
    return x.permute(2, 0, 3, 1, 4).unbind(0)


def _unwindow(o: Tensor, B: int, H: int, W: int, ws: int, shift: int) -> Tensor:
    c = o.shape[1] * o.shape[3]
    x = o.transpose(1, 2).reshape(B, H // ws, W // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, c)
    return torch.roll(x, shifts=(shift, shift), dims=(1, 2)) if shift else x


def _static(case: Case, device: torch.device) -> dict[str, Any]:
    """timm's buffers: relative_position_index [N, N], the shift mask [nW, N, N] (or None), region ids [nW, N]."""
    from vitkern.reference import swin as ref_swin

    B, hw, heads, _, ws, shift = _geometry(case)
    mask = ref_swin.shifted_window_mask(hw, hw, ws, shift, device=device, dtype=case.dtype) if shift else None
    ids = torch.arange(hw, device=device)
    ids = (torch.where(ids < hw - ws, 0, torch.where(ids < hw - shift, 1, 2)) if shift else torch.zeros_like(ids))
    labels = (ids[:, None] * 3 + ids[None, :])[None, :, :, None].float()
    labels = ref_swin.window_partition(labels, ws).reshape(-1, ws * ws).long()
    return {"index": ref_swin.relative_position_index(ws, device=device), "mask": mask, "labels": labels}


def _bias(table: Tensor, index: Tensor) -> Tensor:
    n = index.shape[0]
    return table[index.reshape(-1)].view(n, n, -1).permute(2, 0, 1)  # [heads, N, N]


def _timm_eager(case: Case, inp: Any) -> Callable[[], Tensor]:
    B, hw, heads, d, ws, shift = _geometry(case)
    st = _static(case, inp["qkv"].device)
    scale = d ** -0.5

    def fwd() -> Tensor:
        q, k, v = _window_qkv(inp["qkv"], heads, ws, shift)
        attn = (q * scale) @ k.transpose(-2, -1) + _bias(inp["table"], st["index"])
        if st["mask"] is not None:
            nw = st["mask"].shape[0]
            attn = (attn.view(-1, nw, heads, ws * ws, ws * ws) + st["mask"][None, :, None]).view(attn.shape)
        return _unwindow(attn.softmax(-1) @ v, B, hw, hw, ws, shift)

    return fwd


def _sdpa_mask(case: Case, inp: Any) -> Callable[[], Tensor]:
    B, hw, heads, _, ws, shift = _geometry(case)
    st = _static(case, inp["qkv"].device)
    n = ws * ws

    def fwd() -> Tensor:
        q, k, v = _window_qkv(inp["qkv"], heads, ws, shift)
        mask = _bias(inp["table"], st["index"]).unsqueeze(0)
        if st["mask"] is not None:  # timm's fused_attn: bias + mask expanded to [B·nW, heads, N, N]
            nw = st["mask"].shape[0]
            mask = (mask + st["mask"].view(1, nw, 1, n, n).expand(B, -1, heads, -1, -1).reshape(-1, heads, n, n))
        return _unwindow(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), B, hw, hw, ws, shift)

    return fwd


def _flex(case: Case, inp: Any) -> Callable[[], Tensor]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, hw, heads, d, ws, shift = _geometry(case)
    st = _static(case, inp["qkv"].device)
    index, labels, table, n = st["index"], st["labels"], inp["table"], ws * ws
    nw = labels.shape[0]

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[index[q_idx, kv_idx], h].to(score.dtype)

    def same_region(b, h, q_idx, kv_idx):
        return labels[b % nw, q_idx] == labels[b % nw, kv_idx]

    block_mask = create_block_mask(same_region, B * nw, None, n, n, device=str(inp["qkv"].device)) if shift else None

    def attn(qkv: Tensor) -> Tensor:
        q, k, v = _window_qkv(qkv, heads, ws, shift)
        o = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=d ** -0.5)
        return _unwindow(o, B, hw, hw, ws, shift)

    compiled = compile_fresh(attn)
    return lambda: compiled(inp["qkv"])


def _vk(case: Case, inp: Any) -> Callable[[], Tensor]:
    _, _, heads, _, ws, shift = _geometry(case)
    wa = _vitkern().functional.window_attention
    return lambda: wa(inp["qkv"], inp["table"], heads, ws, shift, qkv_bias=inp["qkv_bias"])


def _vk_cuda(case: Case, inp: Any) -> Callable[[], Tensor]:
    """The CUDA C++ forward (csrc/ops/window_attention.cu), Triton backward (the CUDA backend rejects backward
    problems). Strict check first: a case the CUDA backend rejects is an error row, not a silent Triton run."""
    _, _, heads, _, ws, shift = _geometry(case)
    vk = _vitkern()
    wa = vk.functional.window_attention
    with vk.use_backend("cuda", op="window_attention"):
        vk.explain("window_attention", inp["qkv"], inp["table"], heads, ws, shift, qkv_bias=inp["qkv_bias"])

    def fwd() -> Tensor:
        with vk.use_backend("cuda", op="window_attention", strict=False):
            return wa(inp["qkv"], inp["table"], heads, ws, shift, qkv_bias=inp["qkv_bias"])

    return fwd


# ------------------------------------------------------------------------------------------------ describe
_LAST_SETUP: dict[tuple[Any, int], Callable[[], Any]] = {}


def _remember(setup: Callable[[Case, Any], Callable[[], Any]]):
    """The harness calls setup, then describe: keep the callable so describe measures it without rebuilding."""
    def wrapped(case: Case, inp: Any) -> Callable[[], Any]:
        _LAST_SETUP.clear()
        fn = _LAST_SETUP[(setup, id(inp))] = setup(case, inp)
        return fn

    return wrapped


def _peak_mib(setup: Callable[[Case, Any], Callable[[], Any]], case: Case, inp: Any) -> dict[str, Any]:
    """Peak memory of one call beyond what is allocated before it (second call: compile/autotune excluded)."""
    if not torch.cuda.is_available() or inp["qkv"].device.type != "cuda":
        return {}
    fn = _LAST_SETUP.get((setup, id(inp))) or setup(case, inp)  # the harness's own callable: no second compile

    def once() -> None:
        out = fn()
        if case.direction == FWD_BWD:
            torch.autograd.backward(out, torch.ones_like(out))
        del out

    peak = peak_mib(once)
    for t in inp.values():
        t.grad = None
    return {"peak_mib": peak}


def _describe(setup, vitkern_backend: bool = False):
    def describe(case: Case, inp: Any) -> dict[str, Any]:
        extra = _peak_mib(setup, case, inp)
        if vitkern_backend:
            _, _, heads, _, ws, shift = _geometry(case)
            choice = _vitkern().explain("window_attention", inp["qkv"], inp["table"], heads, ws, shift,
                                        qkv_bias=inp["qkv_bias"])
            extra.update(backend=str(choice.backend_name), explain=str(choice))
        return extra

    return describe


PROVIDERS = [
    Provider("timm-eager", _remember(_timm_eager), describe=_describe(_timm_eager)),
    Provider("sdpa-mask", _remember(_sdpa_mask), describe=_describe(_sdpa_mask)),
    Provider("flex", _remember(_flex), describe=_describe(_flex), smoke=False),
    Provider("vitkern", _remember(_vk), describe=_describe(_vk, vitkern_backend=True)),
    Provider("vitkern-cuda", _remember(_vk_cuda), describe=_describe(_vk_cuda),
             supports=vitkern_backend_unavailable("window_attention")),
]


def cases(ctx: Context) -> list[Case]:
    if ctx.smoke:  # tiny shapes: exercises every code path on CPU in seconds
        return [Case({"B": 2, "HW": 14, "heads": 2, "D": HEAD_DIM, "ws": WINDOW, "shift": 3}, dt, d)
                for dt in (torch.bfloat16, torch.float32) for d in (FWD, FWD_BWD)]
    out = [Case({"B": B, "HW": hw, "heads": h, "D": HEAD_DIM, "ws": WINDOW, "shift": 3}, torch.bfloat16, d)
           for B, hw, h in STAGES.values() for d in (FWD, FWD_BWD)]
    if not ctx.quick:
        B, hw, h = STAGES["swin_t_stage1"]
        out += [Case({"B": B, "HW": hw, "heads": h, "D": HEAD_DIM, "ws": WINDOW, "shift": 0}, torch.bfloat16, d)
                for d in (FWD, FWD_BWD)]
    return out


def run(ctx: Context) -> list[Row]:
    spec = Benchmark(NAME, cases(ctx), PROVIDERS, make_inputs, baseline="timm-eager", model=model)
    return run_benchmark(ctx, spec)


def targets(rows: list[Row]) -> list[str]:
    """vitkern's speedup over each baseline per (case, direction): MET / NOT MET / not measured."""
    if any(r.timer == CPU_TIMER for r in rows):
        return ["targets (vitkern vs timm-eager / sdpa-mask / flex): not evaluated in CPU smoke mode"]
    lines = []
    keys = sorted({(r.case, r.direction) for r in rows}, key=lambda k: (k[0], k[1]))
    for case, direction in keys:
        by = {r.provider: r for r in rows if r.case == case and r.direction == direction}
        mine = by.get("vitkern")
        for other, goal in TARGETS.items():
            what = f"vitkern {case} {direction} >= {goal}x {other}"
            base = by.get(other)
            if mine is None or base is None or mine.status != "ok" or not (base.median_ms and mine.median_ms):
                why = mine.error if mine is not None and mine.status != "ok" else (base.error if base else "no row")
                lines.append(f"target {what}: not measured ({why})")
                continue
            sp = base.median_ms / mine.median_ms
            lines.append(f"target {what}: {sp:.2f}x {'MET' if sp >= goal else 'NOT MET'}")
    return lines + cuda_vs_triton_targets(rows, best_at_least=TARGET_CUDA_BEST)  # issue 7's bar
