"""``vitkern.functional.patch_embed``: image -> token buffer (patch GEMM + bias + pos embed + prefix tokens).

Semantics of the families it covers (pass the tensors; the rule follows from the shapes):
- timm ``VisionTransformer``: ``prefix = cat(cls_token, reg_token)`` (DeiT distilled: ``cat(cls_token,
  dist_token)``); ``pos_embed`` with ``P + Np`` rows adds to every token (concat, then add), with ``Np`` rows
  (``no_embed_class=True``) to the patches only (add, then concat).
- torchvision ``VisionTransformer``: ``conv_proj`` weights, ``prefix = class_token``, ``pos_embed =
  encoder.pos_embedding`` (1 + Np rows: added to all).
- HF ``ViTEmbeddings``: ``patch_embeddings.projection``, ``prefix = cls_token``, ``pos_embed =
  position_embeddings`` (1 + Np rows: added to all).
A position embedding for another grid must be resampled first (:func:`resample_pos_embed`, done once and cached
by :class:`vitkern.nn.ViTEmbed`); a mismatching one is an error, never silently interpolated.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vitkern import dispatch
from vitkern.functional._autocast import cast_gemm_inputs
from vitkern.ops import patch_embed as pe_op
from vitkern.validation import FLOAT_DTYPES, check_tensor

__all__ = ["patch_embed", "resample_pos_embed", "whole_patches"]

_NAME = "vitkern.patch_embed"


def whole_patches(x: Tensor, patch_size: tuple[int, int]) -> Tensor:
    """``x`` [..., H, W] as a stride-p Conv2d sees it: the last rows / columns that do not fill a patch dropped (a
    view; :func:`patch_embed` reads the image by strides). Unchanged when H and W are multiples of the patch."""
    (ph, pw), (H, W) = patch_size, x.shape[-2:]
    return x[..., : H - H % ph, : W - W % pw] if H % ph or W % pw else x


def _as_rows(op: str, name: str, t: Tensor, d: int, like: Tensor) -> Tensor:
    """[n, D] or [1, n, D] -> contiguous [n, D] (a view when already dense)."""
    check_tensor(op, name, t, like=like)
    if t.dim() == 3 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 2 or t.shape[1] != d:
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}; expected [n, {d}] or [1, n, {d}]")
    return t.contiguous()


def _channel_values(name: str, v, C: int, device, dtype) -> Tensor:
    t = torch.as_tensor(v, dtype=dtype).reshape(-1)  # host values stay on the host until checked
    if t.numel() == 1:
        t = t.expand(C)
    if t.numel() != C:
        raise ValueError(f"{_NAME}: {name} has {t.numel()} values; expected 1 or one per channel ({C})")
    # std must be positive; checked where that costs no device sync (host values; a device tensor is taken as is)
    if name == "std" and t.device.type == "cpu" and not torch.compiler.is_compiling() and not bool((t > 0).all()):
        raise ValueError(f"{_NAME}: std must be positive, got {t.tolist()}")
    return t.to(device)


def _norm(mean, std, C: int, device, compute_dtype: torch.dtype) -> Tensor | None:
    """[2, C] fp32 (fp64 for fp64 compute): the mean and 1/std the kernel applies to the pixels."""
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise ValueError(f"{_NAME}: pass both mean and std (or neither); got only {'mean' if std is None else 'std'}")
    dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    m, s = (_channel_values(n, v, C, device, dtype) for n, v in (("mean", mean), ("std", std)))
    return torch.stack([m, 1.0 / s])


def _validate(x, weight, bias, pos_embed, prefix):
    check_tensor(_NAME, "x", x, ndim=4, dtypes=FLOAT_DTYPES + (torch.uint8,))
    check_tensor(_NAME, "weight", weight, dtypes=FLOAT_DTYPES, ndim=4, like=x)
    D, C, ph, pw = weight.shape
    B, Cx, H, W = x.shape
    if Cx != C:
        raise ValueError(
            f"{_NAME}: x has {Cx} channels but weight [D, C, ph, pw] = {tuple(weight.shape)} expects C={C}"
        )
    if H % ph or W % pw:
        raise ValueError(f"{_NAME}: image size {H}x{W} is not divisible by the patch size {ph}x{pw} "
                         "(pad it, e.g. PatchEmbed(dynamic_img_pad=True), or resize)")
    if bias is not None:
        check_tensor(_NAME, "bias", bias, shape=(D,), like=x)
    prefix2 = _as_rows(_NAME, "prefix", prefix, D, weight) if prefix is not None else None
    num_prefix = prefix2.shape[0] if prefix2 is not None else 0
    np_ = (H // ph) * (W // pw)
    pos2, covers = None, False
    if pos_embed is not None:
        pos2 = _as_rows(_NAME, "pos_embed", pos_embed, D, weight)
        L = pos2.shape[0]
        if L == num_prefix + np_ and num_prefix:
            covers = True
        elif L != np_:
            raise ValueError(
                f"{_NAME}: pos_embed has {L} rows but the {H // ph}x{W // pw} patch grid has {np_} patches and "
                f"{num_prefix} prefix tokens (expected {np_} or {np_ + num_prefix} rows); resample it for this "
                "resolution with vitkern.functional.resample_pos_embed (ViTEmbed(dynamic_img_size=True) caches it)"
            )
    error = pe_op.token_dtype_error(weight, bias, pos2, prefix2)
    if error:
        raise TypeError(f"{_NAME}: {error}")
    return weight.contiguous(), prefix2, pos2, covers


def patch_embed(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    pos_embed: Tensor | None = None,
    prefix: Tensor | None = None,
    *,
    mean: Sequence[float] | Tensor | None = None,
    std: Sequence[float] | Tensor | None = None,
) -> Tensor:
    """Embed images ``x`` [B, C, H, W] (NCHW or channels_last; fp32/fp16/bf16/uint8) into tokens [B, P + Np, D].

    ``weight`` is a Conv2d weight [D, C, ph, pw] (its dtype is the compute dtype), ``bias`` [D],
    ``prefix`` the P prefix tokens [P, D] or [1, P, D] (class, distillation, register tokens, in order), and
    ``pos_embed`` [L, D] or [1, L, D] with L = P + Np (added to every token) or L = Np (patches only, timm's
    ``no_embed_class``). H and W must be multiples of ph and pw.

    Dtypes: bias in the weight's; pos_embed and prefix in one token dtype, the weight's or fp32 over an fp16/bf16
    weight; the result is in the token dtype (the weight's without them). Under autocast the weight and bias run in
    the autocast dtype and fp32 pos/prefix keep the tokens fp32, as the unfused ``cat(cls, conv(x)) + pos`` does.

    ``mean``/``std`` (one value or one per channel, in the image's units: e.g. 255·(0.485, 0.456, 0.406) for uint8
    ImageNet images) normalise the pixels, ``(x - mean) / std`` in fp32, inside the kernel's tile load: no
    normalised copy of the image is made. They get no gradient.
    """
    # x is cast in the tile load; pos/prefix carry the token stream (the GEMM family's policy, see _autocast)
    pos_embed, (weight, bias), (prefix,) = cast_gemm_inputs(pos_embed, (weight, bias), (prefix,))
    weight, prefix2, pos2, covers = _validate(x, weight, bias, pos_embed, prefix)
    norm = _norm(mean, std, x.shape[1], x.device, weight.dtype)
    return pe_op.patch_embed_fwd(x, norm, weight, bias, pos2, prefix2, covers)


patch_embed.__vitkern_op__ = pe_op.OP  # type: ignore[attr-defined]


def _describe(x, weight, bias=None, pos_embed=None, prefix=None, *, mean=None, std=None) -> dispatch.Problem:
    weight, prefix2, pos2, _ = _validate(x, weight, bias, pos_embed, prefix)
    norm = _norm(mean, std, x.shape[1], x.device, weight.dtype)
    return pe_op.problem(dispatch.FORWARD, x, weight, bias, (pos2, prefix2), (pos2, prefix2), norm)


dispatch.register_describer(pe_op.OP, _describe)


def _axis_resampling(n_in: int, n_out: int, mode: str, antialias: bool, like: Tensor) -> Tensor:
    """[n_out, n_in]: F.interpolate's weights along one axis (its 2-D resampling is separable: rows, then columns).
    Under torch.compile(dynamic=True) the grid sizes are symbolic and, in torch 2.11, the backward of antialiased
    bicubic interpolation fails on symbolic sizes; interpolating an identity needs no backward, and the position
    embedding's gradient then flows through two matmuls."""
    eye = torch.eye(n_in, dtype=like.dtype, device=like.device).view(1, 1, n_in, n_in)
    # resample the rows of a square identity (a width-1 image would not do: antialiasing mishandles it on CPU)
    return F.interpolate(eye, size=(n_out, n_in), mode=mode, antialias=antialias).view(n_out, n_in)


def resample_pos_embed(
    pos_embed: Tensor,  # [1, P + Ho*Wo, D] or [1, Ho*Wo, D]
    new_grid: Sequence[int],
    old_grid: Sequence[int],
    num_prefix: int = 0,
    mode: str = "bicubic",
    antialias: bool = True,
) -> Tensor:
    """Resample a [1, num_prefix + Ho·Wo, D] position embedding to ``new_grid`` (timm's ``resample_abs_pos_embed``
    rule: the prefix rows are kept, the grid part is interpolated in fp32, bicubic with antialiasing)."""
    check_tensor("vitkern.resample_pos_embed", "pos_embed", pos_embed, ndim=3)
    (gh, gw), (oh, ow) = tuple(new_grid), tuple(old_grid)
    if pos_embed.shape[1] != num_prefix + oh * ow:
        raise ValueError(f"vitkern.resample_pos_embed: pos_embed has {pos_embed.shape[1]} rows; expected "
                         f"{num_prefix} + {oh}x{ow}")
    if (gh, gw) == (oh, ow):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    D = pos_embed.shape[-1]
    grid = grid.float().reshape(1, oh, ow, D).permute(0, 3, 1, 2)
    if torch.compiler.is_compiling():  # the same interpolation as two matmuls (see _axis_resampling)
        rows, cols = _axis_resampling(oh, gh, mode, antialias, grid), _axis_resampling(ow, gw, mode, antialias, grid)
        grid = torch.einsum("ho,bdow,vw->bdhv", rows, grid, cols)
    else:
        grid = F.interpolate(grid, size=(gh, gw), mode=mode, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, D).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1) if num_prefix else grid

