"""Shifted-window attention op family: backends, ``vitkern::window_attention_fwd/bwd`` custom ops and autograd.

The op is Swin's ``pad + roll + partition + attention + reverse + crop + unroll`` on the output of the per-token
qkv linear (which commutes with the roll and the partition), with timm's exact semantics (vitkern/reference/swin.py):
roll by -shift first, then pad the bottom/right to a window multiple; padded tokens are zeros *before* the qkv
linear, so their q/k/v equal ``qkv_bias`` (zeros without one) and they are attended to; the shift-mask regions are
laid out on the padded size and add ``mask_value`` (Swin: -100; -inf for a true mask) across regions.

``pad_first`` selects torchvision's and HF's order instead (pad first, then roll the padded map).

Contract shared by every backend (so the forward and backward may be served by different backends):
  forward(qkv [B, H, W, 3·heads·D] (column order (3, heads, D)), qkv_bias [3·heads·D]?, table [(2wh-1)(2ww-1), heads],
          heads, window (wh, ww), shift (sh, sw), scale, mask_value, pad_first)
      -> out [B, H, W, heads·D] (qkv.dtype), lse [B·nW, heads, wh·ww] (natural-log logsumexp of each query's
         scores; fp32, fp64 for fp64 input)
  backward(dout, qkv, qkv_bias?, table, out, lse, heads, window, shift, scale, mask_value, pad_first, need_dtable,
           need_dbias)
      -> dqkv (qkv.dtype), dtable [T, heads] (table.dtype; empty if not needed), dqkv_bias [3·heads·D]
         (qkv_bias.dtype: the part of the bias gradient that reaches the padded tokens; empty if not needed)
Every output is contiguous, as the fake impls allocate them: compiled graphs assert real strides == fake strides.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vitkern import dispatch, memory
from vitkern.backends import ReferenceBackend, TritonBackend
from vitkern.reference import swin as ref_swin

OP = "window_attention"
MAX_TOKENS = 256  # window area the on-chip kernel holds (N = 256: ws 16)
MAX_HEAD_DIM = 128
# The Triton kernel keeps the window's whole K and V on chip, as [BLOCK_N, BLOCK_D] tiles (both padded to powers of
# two). Compiled for sm_90, tiles of 64 KB fit Hopper's 227 KB of shared memory (16-bit at 256 x 128: 144 KB forward,
# 176 KB backward) and 128 KB tiles do not (fp32 at 256 x 128, a 12x12 or 16x16 window at head dim 128: 288 KB).
MAX_KV_TILE_BYTES = 256 * 128 * 2


def _pow2_tile(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())  # the launcher's BLOCK_N / BLOCK_D


def num_windows(H: int, W: int, window: Sequence[int]) -> int:
    return -(-H // window[0]) * -(-W // window[1])


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def to_windows(x: Tensor, window, shift, pad: Optional[Tensor] = None, pad_first: bool = False) -> Tensor:
    """timm's roll by -shift -> pad bottom/right (with ``pad``, zeros if None) -> partition: [B·nW, N, C]
    (pad_first: pad, then roll)."""
    B, H, W, C = x.shape
    (wh, ww), (sh, sw) = window, shift

    def pad_to_window(t: Tensor) -> Tensor:
        if H % wh == 0 and W % ww == 0:
            return t
        t = F.pad(t, (0, 0, 0, (ww - W % ww) % ww, 0, (wh - H % wh) % wh))
        return t if pad is None else torch.where(_real_tokens(H, W, window, t.device)[..., None], t, pad.to(t.dtype))

    def roll(t: Tensor) -> Tensor:
        return torch.roll(t, shifts=(-sh, -sw), dims=(1, 2)) if sh or sw else t

    x = roll(pad_to_window(x)) if pad_first else pad_to_window(roll(x))
    return ref_swin.window_partition(x, window).reshape(-1, wh * ww, C)


def from_windows(windows: Tensor, H: int, W: int, window, shift, pad_first: bool = False) -> tuple[Tensor, Tensor]:
    """Inverse of to_windows: [B·nW, N, C] -> (reverse, crop, roll back: [B, H, W, C]; sum over padded tokens [C])."""
    (wh, ww), (sh, sw) = window, shift
    Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
    x = ref_swin.window_reverse(windows.reshape(-1, wh, ww, windows.shape[-1]), window, Hp, Wp)

    def roll_back(t: Tensor) -> Tensor:
        return torch.roll(t, shifts=(sh, sw), dims=(1, 2)) if sh or sw else t

    if pad_first:
        x = roll_back(x)
    pad_sum = x[:, ~_real_tokens(H, W, window, x.device)].sum((0, 1))
    x = x[:, :H, :W]
    if not pad_first:
        x = roll_back(x)
    return x.contiguous(), pad_sum


def _real_tokens(H: int, W: int, window, device) -> Tensor:
    Hp, Wp = -(-H // window[0]) * window[0], -(-W // window[1]) * window[1]
    real = torch.zeros(Hp, Wp, dtype=torch.bool, device=device)
    real[:H, :W] = True
    return real


def split_heads(windows: Tensor, parts: int, heads: int) -> list[Tensor]:
    """[B·nW, N, parts·heads·D] -> parts x [B·nW, heads, N, D]."""
    bw, n, c = windows.shape
    return list(windows.reshape(bw, n, parts, heads, c // (parts * heads)).permute(2, 0, 3, 1, 4).unbind(0))


def merge_heads(*parts: Tensor) -> Tensor:
    """parts x [B·nW, heads, N, D] -> [B·nW, N, parts·heads·D] (inverse of split_heads)."""
    x = torch.stack(parts, 0).permute(1, 3, 0, 2, 4)
    return x.reshape(x.shape[0], x.shape[1], -1)


def additive_mask(table: Tensor, H: int, W: int, window, shift, mask_value, dtype: torch.dtype) -> Tensor:
    """Relative position bias + shift mask, what the scores add: [nW, heads, N, N] with a shift, else
    [1, heads, N, N] (materialised: reference only)."""
    index = ref_swin.relative_position_index(window, device=table.device)
    bias = ref_swin.relative_position_bias(table, index).to(dtype).unsqueeze(0)
    if not any(shift):
        return bias
    mask = ref_swin.shifted_window_mask(H, W, window, shift, device=table.device, dtype=dtype)
    return bias + torch.where(mask != 0, torch.full_like(mask, mask_value), mask).unsqueeze(1)


def scores(q: Tensor, k: Tensor, table: Tensor, H: int, W: int, window, shift, scale, mask_value) -> Tensor:
    """q kᵀ·scale + relative position bias + shift mask: [B·nW, heads, N, N] (materialised: reference only)."""
    s = (q * scale) @ k.transpose(-2, -1)
    mask = additive_mask(table, H, W, window, shift, mask_value, q.dtype)
    return (s.view(-1, mask.shape[0], *s.shape[1:]) + mask).flatten(0, 1)


def reference_forward(qkv, qkv_bias, table, heads, window, shift, scale, mask_value,
                      pad_first=False) -> tuple[Tensor, Tensor]:
    """The op in plain PyTorch (differentiable), computed in qkv's dtype: (out, lse)."""
    B, H, W, _ = qkv.shape
    q, k, v = split_heads(to_windows(qkv, window, shift, qkv_bias, pad_first), 3, heads)
    s = scores(q, k, table, H, W, window, shift, scale, mask_value)
    o = torch.softmax(s, dim=-1) @ v
    return from_windows(merge_heads(o), H, W, window, shift, pad_first)[0], torch.logsumexp(s, dim=-1)


def cpu_flash_forward(qkv, qkv_bias, table, heads, window, shift, scale, mask_value,
                      pad_first=False) -> tuple[Tensor, Tensor]:
    """reference_forward through aten's CPU flash-attention kernel (no autograd): 2-3x faster at Swin-T's shapes.
    With a shift the additive mask is copied out over the images ([B·nW, heads, N, N], the scores' size; the
    explicit path materialises the scores, the probabilities and more); without one it is a stride-0 view."""
    B, H, W, _ = qkv.shape
    q, k, v = split_heads(to_windows(qkv, window, shift, qkv_bias, pad_first), 3, heads)
    mask = additive_mask(table, H, W, window, shift, mask_value, q.dtype)
    mask = mask.expand(q.shape[0] // mask.shape[0], *mask.shape).flatten(0, 1)  # [B·nW, heads, N, N]
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask, scale=scale)
    return from_windows(merge_heads(o), H, W, window, shift, pad_first)[0], lse.contiguous()  # as the fake's


@functools.lru_cache(maxsize=None)
def _table_gather(window: tuple[int, int], device: torch.device) -> Tensor:
    """[T, max pairs]: the flat (t1, t2) positions of each table entry, padded with N² (a zero column), for a
    fixed-order segment sum (index_add_ would use float atomics on CUDA)."""
    wh, ww = window
    n = wh * ww
    index = ref_swin.relative_position_index(window).reshape(-1)
    order = torch.argsort(index, stable=True)
    counts = torch.bincount(index, minlength=(2 * wh - 1) * (2 * ww - 1))
    gather = torch.full((counts.numel(), int(counts.max())), n * n, dtype=torch.long)
    slot = torch.arange(n * n) - (torch.cumsum(counts, 0) - counts)[index[order]]
    gather[index[order], slot] = order
    return gather.to(device)


def dense_to_table(dense: Tensor, window: tuple[int, int]) -> Tensor:
    """[heads, N, N] gradient of the gathered bias -> [T, heads] gradient of the table (deterministic), contiguous:
    the fake impl's strides (compiled graphs assert real strides == fake strides; a transposed view fails there)."""
    heads, n, _ = dense.shape
    flat = torch.cat([dense.reshape(heads, n * n), dense.new_zeros(heads, 1)], dim=1)
    return flat[:, _table_gather(window, dense.device)].sum(-1).t().contiguous()


class WindowAttentionReference(ReferenceBackend):
    """Plain PyTorch roll/pad/partition path in fp32 (fp64 for fp64 input): the CPU default and the fallback.
    On CPU the forward's attention runs in aten's flash kernel; the backward is explicit (it needs the scores'
    gradient for the bias table)."""

    def forward(self, qkv, qkv_bias, table, heads, window, shift, scale, mask_value, pad_first):
        acc = _acc_dtype(qkv)
        bias = qkv_bias.to(qkv.dtype).to(acc) if qkv_bias is not None else None  # pad q/k/v rounded like the linear's
        forward = cpu_flash_forward if qkv.device.type == "cpu" and qkv.numel() > 0 else reference_forward
        out, lse = forward(qkv.to(acc), bias, table.to(acc), heads, window, shift, scale, mask_value, pad_first)
        return out.to(qkv.dtype), lse

    def backward(self, dout, qkv, qkv_bias, table, out, lse, heads, window, shift, scale, mask_value, pad_first,
                 need_dtable, need_dbias):
        # the analytic backward (autograd is not recorded inside a custom op's implementation)
        acc = _acc_dtype(qkv)
        B, H, W, _ = qkv.shape
        bias = qkv_bias.to(qkv.dtype).to(acc) if qkv_bias is not None else None
        q, k, v = split_heads(to_windows(qkv.to(acc), window, shift, bias, pad_first), 3, heads)
        (do,), (o,) = (split_heads(to_windows(t.to(acc), window, shift, None, pad_first), 1, heads)
                       for t in (dout, out))
        p = torch.exp(scores(q, k, table.to(acc), H, W, window, shift, scale, mask_value) - lse.to(acc)[..., None])
        dv = p.transpose(-2, -1) @ do
        ds = p * (do @ v.transpose(-2, -1) - (do * o).sum(-1, keepdim=True))
        dq, dk = (ds @ k) * scale, (ds.transpose(-2, -1) @ q) * scale
        dqkv, dbias = from_windows(merge_heads(dq, dk, dv), H, W, window, shift, pad_first)
        dtable = dense_to_table(ds.sum(0), window) if need_dtable else None
        return dqkv.to(qkv.dtype), dtable, (dbias if need_dbias and qkv_bias is not None else None)


def input_reasons(problem: dispatch.Problem, max_tokens: int) -> list[str]:
    """The rules every kernel backend shares: one window of at most ``max_tokens`` (the backend's on-chip limit),
    dense inputs, a non-empty map."""
    reasons = []
    wh, ww = problem.attr("window")
    if wh * ww > max_tokens:
        reasons.append(f"window {wh}x{ww} has {wh * ww} tokens > {max_tokens} (one window must fit on chip)")
    if not problem.attr("contiguous", True):
        reasons.append("qkv/table/qkv_bias/dout are not contiguous")
    if 0 in problem.shape("qkv"):
        reasons.append("empty input")
    return reasons


class WindowAttentionTriton(TritonBackend):
    """One (image, window, head) per program on the un-partitioned layout; deterministic backward."""

    def reject_reasons(self, problem: dispatch.Problem) -> list[str]:
        reasons = self.device_reasons(problem) + input_reasons(problem, MAX_TOKENS)
        d = problem.attr("head_dim")
        if d > MAX_HEAD_DIM:
            reasons.append(f"head_dim {d} > {MAX_HEAD_DIM}")
        wh, ww = problem.attr("window")
        tile = _pow2_tile(wh * ww) * _pow2_tile(d) * problem.dtype.itemsize
        if d <= MAX_HEAD_DIM and tile > MAX_KV_TILE_BYTES:
            reasons.append(f"a {wh}x{ww} window at head_dim {d} in {problem.dtype} needs K/V tiles of {tile // 1024} KB "
                           f"> {MAX_KV_TILE_BYTES // 1024} KB (shared memory; 16-bit inputs fit)")
        return reasons

    def forward(self, qkv, qkv_bias, table, heads, window, shift, scale, mask_value, pad_first):
        from vitkern.kernels.triton import window_attention as k

        B, H, W, three_c = qkv.shape
        n = window[0] * window[1]
        out = memory.empty((B, H, W, three_c // 3), qkv.dtype, qkv.device)
        lse = memory.empty((B * num_windows(H, W, window), heads, n), torch.float32, qkv.device)
        k.window_attention_fwd(qkv, qkv_bias, table, heads, window, shift, scale, mask_value, pad_first, out, lse)
        return out, lse

    def backward(self, dout, qkv, qkv_bias, table, out, lse, heads, window, shift, scale, mask_value, pad_first,
                 need_dtable, need_dbias):
        from vitkern.kernels.triton import window_attention as k

        dqkv = memory.empty(qkv.shape, qkv.dtype, qkv.device)
        dense, dbias = k.window_attention_bwd(dout, qkv, qkv_bias, table, out, lse.float(), heads, window, shift,
                                              scale, mask_value, pad_first, dqkv, need_dtable, need_dbias)
        return dqkv, (dense_to_table(dense, window) if need_dtable else None), dbias


dispatch.register_backend(OP, WindowAttentionReference())
dispatch.register_backend(OP, WindowAttentionTriton())


def problem(direction: str, qkv: Tensor, table: Tensor, heads: int, window: Sequence[int], shift: Sequence[int],
            qkv_bias: Optional[Tensor] = None, dout: Optional[Tensor] = None) -> dispatch.Problem:
    return dispatch.tensor_problem(
        OP,
        direction,
        [("qkv", qkv), ("table", table)],
        attrs=[
            ("window", tuple(window)),
            ("shift", tuple(shift)),
            ("heads", heads),
            ("head_dim", qkv.shape[-1] // (3 * heads)),
            ("contiguous", all(t.is_contiguous() for t in (qkv, table, qkv_bias, dout) if t is not None)),
        ],
    )


@dispatch.custom_op("vitkern::window_attention_fwd", mutates_args=())
def window_attention_fwd(
    qkv: Tensor, qkv_bias: Optional[Tensor], table: Tensor, heads: int, window: Sequence[int], shift: Sequence[int],
    scale: float, mask_value: float, pad_first: bool,
) -> tuple[Tensor, Tensor]:
    window, shift = tuple(window), tuple(shift)
    backend = dispatch.select(problem(dispatch.FORWARD, qkv, table, heads, window, shift, qkv_bias)).backend
    return backend.forward(qkv, qkv_bias, table, heads, window, shift, scale, mask_value, pad_first)


@window_attention_fwd.register_fake
def _(qkv, qkv_bias, table, heads, window, shift, scale, mask_value, pad_first):
    B, H, W, three_c = qkv.shape
    lse = qkv.new_empty((B * num_windows(H, W, window), heads, window[0] * window[1]), dtype=_acc_dtype(qkv))
    return qkv.new_empty((B, H, W, three_c // 3)), lse


@dispatch.custom_op("vitkern::window_attention_bwd", mutates_args=())
def window_attention_bwd(
    dout: Tensor, qkv: Tensor, qkv_bias: Optional[Tensor], table: Tensor, out: Tensor, lse: Tensor, heads: int,
    window: Sequence[int], shift: Sequence[int], scale: float, mask_value: float, pad_first: bool,
    need_dtable: bool, need_dbias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    window, shift = tuple(window), tuple(shift)
    dout = dout.contiguous()  # autograd may hand us expanded or strided gradients
    backend = dispatch.select(problem(dispatch.BACKWARD, qkv, table, heads, window, shift, qkv_bias, dout)).backend
    dqkv, dtable, dbias = backend.backward(dout, qkv, qkv_bias, table, out, lse, heads, window, shift, scale,
                                          mask_value, pad_first, need_dtable, need_dbias)
    dtable = dtable.to(table.dtype) if dtable is not None else table.new_empty(0)
    if need_dbias and qkv_bias is not None:
        dbias = dbias.to(qkv_bias.dtype) if dbias is not None else torch.zeros_like(qkv_bias)
    else:
        dbias = qkv.new_empty(0)
    return dqkv, dtable, dbias


@window_attention_bwd.register_fake
def _(dout, qkv, qkv_bias, table, out, lse, heads, window, shift, scale, mask_value, pad_first, need_dtable,
      need_dbias):
    dbias = qkv_bias.new_empty(qkv_bias.shape) if need_dbias and qkv_bias is not None else qkv.new_empty(0)
    return qkv.new_empty(qkv.shape), (table.new_empty(table.shape) if need_dtable else table.new_empty(0)), dbias


def _setup_context(ctx, inputs, output):
    qkv, qkv_bias, table, heads, window, shift, scale, mask_value, pad_first = inputs
    out, lse = output
    ctx.attrs = (heads, tuple(window), tuple(shift), scale, mask_value, pad_first)
    ctx.has_bias = qkv_bias is not None
    ctx.save_for_backward(qkv, qkv_bias, table, out, lse)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    qkv, qkv_bias, table, out, lse = ctx.saved_tensors
    need_dbias = ctx.has_bias and ctx.needs_input_grad[1]
    need_dtable = ctx.needs_input_grad[2]
    dqkv, dtable, dbias = torch.ops.vitkern.window_attention_bwd(
        dout, qkv, qkv_bias, table, out, lse, *ctx.attrs, need_dtable, need_dbias)
    return dqkv, (dbias if need_dbias else None), (dtable if need_dtable else None), None, None, None, None, None, None


dispatch.register_autograd(window_attention_fwd, _backward, setup_context=_setup_context)
