"""Per-op parity of vitkern against float64 on a real (small) model: what ``vitkern check`` prints.

The model's own modules are hooked to capture the inputs each op sees; every backend that accepts those inputs
then recomputes the op and is held to the numerics rule of :mod:`vitkern.testing.numerics`. Finally the model is
run end to end with vitkern modules swapped in. Each op family adds an :class:`OpParity` to ``OP_PARITY``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from vitkern import dispatch
from vitkern.integrations import optimize
from vitkern.testing.numerics import assert_close, max_abs_err


@dataclasses.dataclass
class ParityRow:
    op: str
    where: str
    shape: str
    dtype: str
    backend: str
    err: float | None = None
    torch_err: float | None = None
    bound: float | None = None
    status: str = ""  # "ok", "FAIL: ...", "n/a: ..."


@dataclasses.dataclass(frozen=True)
class OpParity:
    op: str
    captures: Callable[[nn.Module], bool]  # which modules' inputs to capture
    # (backend name, module, captured args) -> (vitkern out, float64 reference, PyTorch out in the same dtype)
    compute: Callable[[nn.Module, tuple], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    problem: Callable[[nn.Module, tuple], dispatch.Problem]


def _layer_norm_compute(m: nn.LayerNorm, args: tuple):
    from vitkern.functional import layer_norm

    (x,) = args
    w = m.weight.detach() if m.weight is not None else None
    b = m.bias.detach() if m.bias is not None else None
    out = layer_norm(x, m.normalized_shape, w, b, m.eps)
    ref = F.layer_norm(x.double(), m.normalized_shape, None if w is None else w.double(), None if b is None else b.double(), m.eps)
    return out, ref, F.layer_norm(x, m.normalized_shape, w, b, m.eps)


def _layer_norm_problem(m: nn.LayerNorm, args: tuple) -> dispatch.Problem:
    from vitkern.functional.layer_norm import _describe

    return _describe(args[0], m.normalized_shape, m.weight, m.bias, m.eps)


def _is_plain_attention(m: nn.Module) -> bool:
    from vitkern.reference.layers import Attention

    return isinstance(m, Attention) and isinstance(m.q_norm, nn.Identity)  # qk_norm: covered by the module tests


def _attention_qkv(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, m.qkv.weight.detach(), None if m.qkv.bias is None else m.qkv.bias.detach())


def _attention_compute(m: nn.Module, args: tuple):
    """The attention core on the packed qkv output (the part the kernel replaces; the linears stay cuBLAS)."""
    from vitkern.functional.attention import attention
    from vitkern.reference.layers import attention_reference, merge_heads, split_heads_qkv

    qkv = _attention_qkv(m, args[0])

    def reference(t):
        return merge_heads(attention_reference(*split_heads_qkv(t, m.num_heads), scale=m.scale))

    return attention(qkv=qkv, num_heads=m.num_heads, scale=m.scale), reference(qkv.double()), reference(qkv)


def _attention_problem(m: nn.Module, args: tuple) -> dispatch.Problem:
    from vitkern.functional.attention import _describe

    return _describe(qkv=_attention_qkv(m, args[0]), num_heads=m.num_heads, scale=m.scale)


def _is_reference_vit(m: nn.Module) -> bool:
    from vitkern.reference.vit import VisionTransformer

    return isinstance(m, VisionTransformer)


def _patch_embed_compute(vit: nn.Module, args: tuple):
    """Patch projection + bias + prefix tokens + position embedding, from the image."""
    from vitkern.nn.patch_embed import ViTEmbed

    (image,) = args
    vit64 = copy.deepcopy(vit).double()

    def reference(model, x):
        return model.add_pos_embed(model.patch_embed(x))

    return ViTEmbed.from_timm(vit)(image), reference(vit64, image.double()), reference(vit, image)


def _patch_embed_problem(vit: nn.Module, args: tuple) -> dispatch.Problem:
    from vitkern.functional.patch_embed import _describe

    return _describe(args[0], vit.patch_embed.proj.weight, vit.patch_embed.proj.bias)


OP_PARITY: list[OpParity] = [
    OpParity("patch_embed", _is_reference_vit, _patch_embed_compute, _patch_embed_problem),
    OpParity("layer_norm", lambda m: isinstance(m, nn.LayerNorm), _layer_norm_compute, _layer_norm_problem),
    OpParity("attention", _is_plain_attention, _attention_compute, _attention_problem),
]


def _capture(model: nn.Module, x: torch.Tensor, per_op_limit: int) -> list[tuple[OpParity, str, nn.Module, tuple]]:
    seen: list[tuple[OpParity, str, nn.Module, tuple]] = []
    counts: dict[str, int] = {}
    hooks = []
    for path, module in model.named_modules():
        for spec in OP_PARITY:
            if spec.captures(module):
                def hook(mod, args, _path=path, _spec=spec):
                    if counts.get(_spec.op, 0) < per_op_limit:
                        counts[_spec.op] = counts.get(_spec.op, 0) + 1
                        seen.append((_spec, _path, mod, tuple(a.detach() for a in args)))
                hooks.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def op_rows(model: nn.Module, x: torch.Tensor, per_op_limit: int = 4) -> list[ParityRow]:
    rows = []
    for spec, path, module, args in _capture(model, x, per_op_limit):
        problem = spec.problem(module, args)
        for name, backend in dispatch.backends(spec.op).items():
            row = ParityRow(spec.op, path or "(model)", "x".join(map(str, args[0].shape)), str(args[0].dtype).replace("torch.", ""), name)
            reasons = [backend.availability()] if backend.availability() else backend.reject_reasons(problem)
            if reasons:
                row.status = "n/a: " + "; ".join(reasons)
            else:
                with dispatch.use_backend(name, op=spec.op), torch.no_grad():
                    out, ref, torch_out = spec.compute(module, args)
                try:
                    info = assert_close(f"{spec.op} {path}", out, ref, torch_out)
                    row.status = "ok"
                except AssertionError as exc:
                    info = {"err": max_abs_err(out, ref), "torch_err": max_abs_err(torch_out, ref), "bound": float("nan")}
                    row.status = f"FAIL: {exc}"
                row.err, row.torch_err, row.bound = info["err"], info["torch_err"], info["bound"]
            rows.append(row)
    return rows


def model_rows(model: nn.Module, x: torch.Tensor, prefer: str | None) -> list[ParityRow]:
    """End to end: the model with vitkern modules swapped in vs the original, both against the float64 model."""
    model64 = copy.deepcopy(model).double()
    fast = copy.deepcopy(model)
    report = optimize(fast)
    ctx = dispatch.use_backend(prefer, strict=False) if prefer else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        ref = model64(x.double())
        out = fast(x)
        base = model(x)
    row = ParityRow("model", f"{type(model).__name__} ({len(report.swapped)} modules swapped)",
                    "x".join(map(str, x.shape)), str(x.dtype).replace("torch.", ""), prefer or "default dispatch")
    try:
        info = assert_close("model logits", out, ref, base)
        row.status = "ok"
    except AssertionError as exc:
        info = {"err": max_abs_err(out, ref), "torch_err": max_abs_err(base, ref), "bound": float("nan")}
        row.status = f"FAIL: {exc}"
    row.err, row.torch_err, row.bound = info["err"], info["torch_err"], info["bound"]
    return [row]


def format_rows(rows: Iterable[ParityRow]) -> str:
    head = ("op", "where", "shape", "dtype", "backend", "max|err|", "torch err", "bound", "status")
    table = [head] + [
        (r.op, r.where, r.shape, r.dtype, r.backend,
         *("-" if v is None else f"{v:.2e}" for v in (r.err, r.torch_err, r.bound)),
         r.status if len(r.status) < 90 else r.status[:87] + "...")
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
