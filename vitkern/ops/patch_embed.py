"""Patch embedding op family: backends, the ``vitkern::patch_embed_fwd/bwd`` custom ops and their autograd.

Contract shared by every backend (so the forward and backward may be served by different backends):
  forward(x [B, C, H, W] (any strides, float or uint8; H % ph == W % pw == 0), norm [2, C] fp32? (per-channel
          mean and 1/std: the pixels are (x - mean) · istd, computed in fp32), weight [D, C, ph, pw] (contiguous,
          the compute dtype), bias [D]?, pos [L, D]?, prefix [P, D]?, pos_covers_prefix)
      -> out [B, P + Np, D] (the token dtype, contiguous), Np = (H / ph)·(W / pw):
         out[:, :P]  = prefix (+ pos[:P] when pos_covers_prefix)
         out[:, P:]  = conv2d(x, weight, bias, stride=(ph, pw)) flattened to tokens + pos[P:] (or pos when it covers
                       the patches only, L = Np)
  backward(dout [B, P + Np, D], x, norm?, weight, num_prefix, has_pos, pos_covers_prefix, need_dx, need_dw, need_db,
           need_dpos, need_dprefix)
      -> dx (x's shape and dtype, contiguous), dweight [D, C, ph, pw], dbias [D], dpos [L, D], dprefix [P, D]
         (each an empty tensor when not needed; dpos and dprefix in dout's dtype, the others in the weight's)
  Backends compute dx and dweight from dout rounded to the weight's dtype; the op sums dbias, dpos, dprefix.

Dtypes: the weight's is the compute dtype; bias in it. pos and prefix share the token dtype: the weight's, or fp32
over an fp16/bf16 weight (what autocast leaves of an fp32 model: the GEMM in bf16, the token stream fp32, as the
unfused ``cat(cls, conv(x)) + pos`` promotes it). The output is in the token dtype (the weight's when neither is
given).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vitkern import dispatch, memory
from vitkern.backends import ReferenceBackend, TritonBackend
from vitkern.validation import MIXED_COMPUTE_DTYPES

OP = "patch_embed"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _param_grads(dout: Tensor, num_prefix: int, has_pos: bool, pos_covers_prefix: bool, need_db, need_dpos,
                 need_dprefix) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """dbias, dpos, dprefix: sums of dout rows over the batch (torch reductions in fp32; deterministic)."""
    acc = _acc_dtype(dout.dtype)
    d = dout.to(acc) if dout.dtype != acc else dout
    db = d[:, num_prefix:].sum((0, 1)) if need_db else None
    dpos = None
    if need_dpos and has_pos:
        dpos = d.sum(0) if pos_covers_prefix else d[:, num_prefix:].sum(0)
    dprefix = d[:, :num_prefix].sum(0) if need_dprefix and num_prefix else None
    return db, dpos, dprefix


def _pixels(x: Tensor, norm: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """The image as the GEMM sees it: normalised in fp32 (fp64 for fp64 compute) when ``norm``, then cast."""
    if norm is None:
        return x.to(dtype)
    acc = _acc_dtype(dtype)
    return ((x.to(acc) - norm[0].to(acc)[:, None, None]) * norm[1].to(acc)[:, None, None]).to(dtype)


class PatchEmbedReference(ReferenceBackend):
    """Conv2d + flatten + cat + add in plain PyTorch (the compute dtype; fp64 in, fp64 out)."""

    def forward(self, x, norm, weight, bias, pos, prefix, pos_covers_prefix):
        ph, pw = weight.shape[2:]
        y = F.conv2d(_pixels(x, norm, weight.dtype), weight, bias, stride=(ph, pw)).flatten(2).transpose(1, 2)
        num_prefix = prefix.shape[0] if prefix is not None else 0
        if pos is not None and not pos_covers_prefix:
            y = y + pos
        if num_prefix:
            y = torch.cat([prefix.unsqueeze(0).expand(x.shape[0], -1, -1), y], dim=1)
        if pos is not None and pos_covers_prefix:
            y = y + pos
        return y.contiguous()

    def backward(self, dout, x, norm, weight, num_prefix, need_dx, need_dw):
        acc = _acc_dtype(weight.dtype)
        D, C, ph, pw = weight.shape
        dy = dout[:, num_prefix:].to(acc)  # [B, Np, D]
        dx = dw = None
        if need_dx:
            cols = (dy @ weight.reshape(D, -1).to(acc)).transpose(1, 2)  # [B, K, Np]
            dx = F.fold(cols, x.shape[2:], (ph, pw), stride=(ph, pw))
            dx = (dx * norm[1].to(acc)[:, None, None] if norm is not None else dx).to(x.dtype)
        if need_dw:
            # [B, K, Np] patches as the forward GEMM saw them, K in Conv2d's (c, i, j) order
            patches = F.unfold(_pixels(x, norm, weight.dtype).to(acc), (ph, pw), stride=(ph, pw))
            dw = torch.einsum("bnd,bkn->dk", dy, patches).reshape(weight.shape)
        return dx, dw


def input_reasons(problem: dispatch.Problem, image_dtypes: tuple[torch.dtype, ...]) -> list[str]:
    """The rules every kernel backend shares, from the attributes :func:`problem` records (``image_dtypes``: the
    image dtypes the backend reads)."""
    reasons = []
    x_dtype = problem.attr("x_dtype")
    if x_dtype not in image_dtypes:
        reasons.append(f"image dtype {x_dtype} not in {[str(d) for d in image_dtypes]}")
    B, C, H, W = problem.shape("x")
    D, _, ph, pw = problem.shape("weight")
    if B * (H // ph) * (W // pw) == 0 or D == 0:
        reasons.append("empty input (no patches or D = 0)")
    if H % ph or W % pw:
        reasons.append(f"image {H}x{W} is not a multiple of the patch {ph}x{pw}")
    if not problem.attr("dense_params", True):
        reasons.append("weight/pos/prefix (and dout in the backward) are not contiguous")
    if problem.attr("param_dtypes_ok") is False:
        reasons.append("bias dtype differs from the weight's, or pos/prefix are in neither the weight's dtype nor "
                       "float32 (over a float16/bfloat16 weight) or differ from each other")
    if problem.attr("norm_ok") is False:
        reasons.append("norm is not a contiguous float32 [2, C] tensor")
    return reasons


class PatchEmbedTriton(TritonBackend):
    """Implicit-GEMM forward with the prefix rows from the same launch; Triton dX and dW (deterministic)."""

    def reject_reasons(self, problem: dispatch.Problem) -> list[str]:
        return self.device_reasons(problem) + input_reasons(problem, self.dtypes + (torch.uint8,))

    def forward(self, x, norm, weight, bias, pos, prefix, pos_covers_prefix):
        from vitkern.kernels.triton import patch_embed as k

        B, _, H, W = x.shape
        D, _, ph, pw = weight.shape
        num_prefix = prefix.shape[0] if prefix is not None else 0
        out = memory.empty((B, num_prefix + (H // ph) * (W // pw), D), token_dtype(weight, pos, prefix), x.device)
        k.patch_embed_fwd(x, norm, weight, bias, pos, prefix, pos_covers_prefix, out)
        return out

    def backward(self, dout, x, norm, weight, num_prefix, need_dx, need_dw):
        from vitkern.kernels.triton import patch_embed as k

        dx = dw = None
        if need_dx:
            dx = memory.empty(x.shape, x.dtype, x.device)
            k.patch_embed_dx(dout, weight, norm, dx, num_prefix)
        if need_dw:
            dw = k.patch_embed_dw(dout, x, norm, weight, num_prefix).reshape(weight.shape)
        return dx, dw


dispatch.register_backend(OP, PatchEmbedReference())
dispatch.register_backend(OP, PatchEmbedTriton())


def token_dtype_error(weight: Tensor, bias: Optional[Tensor], pos: Optional[Tensor], prefix: Optional[Tensor]
                      ) -> str | None:
    """The family's dtype rule (module docstring), as a message naming the offending argument; None when it holds."""
    weight, bias = weight.dtype, bias.dtype if bias is not None else None
    tokens = {n: t.dtype for n, t in (("pos_embed", pos), ("prefix", prefix)) if t is not None}
    if bias is not None and bias != weight:
        return f"bias has dtype {bias}; expected the weight's {weight}"
    allowed = (weight, torch.float32) if weight in MIXED_COMPUTE_DTYPES else (weight,)
    for name, d in tokens.items():
        if d not in allowed:
            return f"{name} has dtype {d}; expected the weight's {weight}" + (
                " or torch.float32 (fp32 tokens over a 16-bit GEMM)" if len(allowed) > 1 else "")
    if len(set(tokens.values())) > 1:
        return "pos_embed and prefix must share one dtype (the token stream's), got " + ", ".join(
            f"{n} {d}" for n, d in tokens.items())
    return None


def token_dtype(weight: Tensor, pos: Optional[Tensor], prefix: Optional[Tensor]) -> torch.dtype:
    """The output's dtype: pos/prefix's (the token stream's), the weight's when neither is given."""
    return pos.dtype if pos is not None else prefix.dtype if prefix is not None else weight.dtype


def problem(direction: str, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
            tokens: tuple[Optional[Tensor], Optional[Tensor]] = (None, None),
            dense: tuple[Optional[Tensor], ...] = (), norm: Optional[Tensor] = None) -> dispatch.Problem:
    """The dispatch problem: dtype is the compute (weight) dtype; the image dtype is an attribute. ``tokens``: pos
    and prefix (or, in the backward, dout)."""
    return dispatch.Problem(
        op=OP,
        direction=direction,
        device=x.device.type,
        dtype=weight.dtype,
        shapes=(("x", tuple(x.shape)), ("weight", tuple(weight.shape))),
        attrs=(
            ("x_dtype", x.dtype),
            ("dense_params", all(t.is_contiguous() for t in (weight, *dense) if t is not None)),
            ("param_dtypes_ok", token_dtype_error(weight, bias, *tokens) is None),
            ("mixed", any(t is not None and t.dtype != weight.dtype for t in tokens)),
            ("norm_ok", norm is None or (norm.dtype == torch.float32 and norm.is_contiguous())),
        ) + ((("device_index", x.device.index),) if x.device.type == "cuda" else ()),
    )


def _empty_if_none(t: Optional[Tensor], like: Tensor) -> Tensor:
    return t if t is not None else like.new_empty(0)


@dispatch.custom_op("vitkern::patch_embed_fwd", mutates_args=())
def patch_embed_fwd(
    x: Tensor, norm: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], pos: Optional[Tensor],
    prefix: Optional[Tensor], pos_covers_prefix: bool,
) -> Tensor:
    backend = dispatch.select(problem(dispatch.FORWARD, x, weight, bias, (pos, prefix), (pos, prefix), norm)).backend
    return backend.forward(x, norm, weight, bias, pos, prefix, pos_covers_prefix)


@patch_embed_fwd.register_fake
def _(x, norm, weight, bias, pos, prefix, pos_covers_prefix):
    B, _, H, W = x.shape
    D, _, ph, pw = weight.shape
    num_prefix = prefix.shape[0] if prefix is not None else 0
    return weight.new_empty((B, num_prefix + (H // ph) * (W // pw), D), dtype=token_dtype(weight, pos, prefix))


@dispatch.custom_op("vitkern::patch_embed_bwd", mutates_args=())
def patch_embed_bwd(
    dout: Tensor, x: Tensor, norm: Optional[Tensor], weight: Tensor, num_prefix: int, has_pos: bool,
    pos_covers_prefix: bool, need_dx: bool, need_dw: bool, need_db: bool, need_dpos: bool, need_dprefix: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dout = dout.contiguous()  # autograd may hand us expanded (stride-0) gradients
    dgemm = dout.to(weight.dtype)  # fp32 tokens over a bf16 GEMM: its gradients take dout in bf16 (as autocast's)
    backend = dispatch.select(problem(dispatch.BACKWARD, x, weight, None, (dgemm, None), (dgemm,), norm)).backend
    dx, dw = backend.backward(dgemm, x, norm, weight, num_prefix, need_dx, need_dw)
    db, dpos, dprefix = _param_grads(dout, num_prefix, has_pos, pos_covers_prefix, need_db, need_dpos, need_dprefix)
    wdt, tdt = weight.dtype, dout.dtype
    return (
        dx.contiguous() if dx is not None else x.new_empty(0),
        dw.to(wdt) if dw is not None else weight.new_empty(0),
        db.to(wdt) if db is not None else weight.new_empty(0),
        dpos.to(tdt) if dpos is not None else weight.new_empty(0),
        dprefix.to(tdt) if dprefix is not None else weight.new_empty(0),
    )


@patch_embed_bwd.register_fake
def _(dout, x, norm, weight, num_prefix, has_pos, pos_covers_prefix, need_dx, need_dw, need_db, need_dpos,
      need_dprefix):
    B, T, D = dout.shape
    np_ = T - num_prefix
    pos_rows = T if pos_covers_prefix else np_
    return (
        x.new_empty(x.shape) if need_dx else x.new_empty(0),
        weight.new_empty(weight.shape) if need_dw else weight.new_empty(0),
        weight.new_empty((D,)) if need_db else weight.new_empty(0),
        dout.new_empty((pos_rows, D)) if need_dpos and has_pos else weight.new_empty(0),
        dout.new_empty((num_prefix, D)) if need_dprefix and num_prefix else weight.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, norm, weight, bias, pos, prefix, pos_covers_prefix = inputs
    ctx.num_prefix = prefix.shape[0] if prefix is not None else 0
    ctx.has = (bias is not None, pos is not None, prefix is not None)
    ctx.pos_covers_prefix = pos_covers_prefix
    ctx.x_float = x.is_floating_point()
    ctx.save_for_backward(x, norm, weight)


def _backward(ctx, dout):
    x, norm, weight = ctx.saved_tensors
    has_bias, has_pos, has_prefix = ctx.has
    g = ctx.needs_input_grad
    need = (g[0] and ctx.x_float, g[2], g[3] and has_bias, g[4] and has_pos, g[5] and has_prefix)
    dx, dw, db, dpos, dprefix = torch.ops.vitkern.patch_embed_bwd(
        dout, x, norm, weight, ctx.num_prefix, has_pos, ctx.pos_covers_prefix, *need
    )
    dx, dw, db, dpos, dprefix = (gr if n else None for gr, n in zip((dx, dw, db, dpos, dprefix), need))
    return dx, None, dw, db, dpos, dprefix, None  # norm (mean/std) gets no gradient


dispatch.register_autograd(patch_embed_fwd, _backward, setup_context=_setup_context)
