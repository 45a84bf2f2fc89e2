"""Patch embedding benchmark: image -> [B, 1 + Np, D] tokens (projection + bias + CLS token + position embedding).

Cases: bf16, B=256, 224x224: ViT-B/16 (p=16, D=768) and ViT-H/14 (p=14, D=1280), forward and forward+backward
(the backward a training step needs: weight, bias, pos_embed and cls_token gradients; the image does not
require grad). Providers, all on the same inputs:

- ``eager``: timm's path, ``Conv2d -> flatten -> transpose -> cat(cls) -> + pos_embed`` (the baseline);
- ``unfold+linear``: ``F.unfold -> transpose -> F.linear -> cat -> +`` (the im2col formulation);
- ``torch.compile``: the eager function compiled (default mode, fresh per case);
- ``vitkern``: ``vitkern.functional.patch_embed`` (one implicit-GEMM launch writes every row of the buffer);
- ``vitkern-cuda``: the same call with the CUDA C++ forward forced (csrc/ops/patch_embed.cu: gather kernel + one
  cuBLASLt GEMM writing the tokens in place, bias and pos embed fused; backward: Triton), to compare with ``vitkern``
  (Triton by default) and decide the backend ranking (vitkern/ops/patch_embed_cuda.py).

Targets (printed, not asserted): vitkern forward >= 2x eager and >= 1.2x torch.compile at both shapes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vitkern.bench.harness import (
    CPU_TIMER, FWD, FWD_BWD, Benchmark, Case, Context, Provider, Row, Work, compile_fresh,
    cuda_vs_triton_targets, run_benchmark, vitkern_backend_unavailable,
)

NAME = "patch_embed"
SHAPES = ((16, 768), (14, 1280))  # (patch, embed dim): ViT-B/16, ViT-H/14
BATCH, IMG, CHANS = 256, 224, 3
TARGET_EAGER, TARGET_COMPILE = 2.0, 1.2


def _vitkern() -> Any:
    import vitkern
    import vitkern.functional  # noqa: F401

    return vitkern


def make_inputs(case: Case, device: torch.device) -> dict[str, Tensor]:
    B, img, p, D = case.params["B"], case.params["img"], case.params["p"], case.params["D"]
    np_ = (img // p) ** 2
    grad = case.direction == FWD_BWD
    kw: dict[str, Any] = dict(device=device, dtype=case.dtype)
    return {  # random, never zeros; weight scaled like Conv2d's init so outputs are O(1)
        "x": torch.randn(B, CHANS, img, img, **kw),
        "weight": (torch.randn(D, CHANS, p, p, **kw) * (CHANS * p * p) ** -0.5).requires_grad_(grad),
        "bias": (0.1 * torch.randn(D, **kw)).requires_grad_(grad),
        "cls": (0.02 * torch.randn(1, 1, D, **kw)).requires_grad_(grad),
        "pos": (0.02 * torch.randn(1, 1 + np_, D, **kw)).requires_grad_(grad),
    }


def model(case: Case, provider: Provider) -> Work:
    """Fewest bytes / flops of the op (e = element size, M = B*Np, K = C*p*p, T = 1 + Np tokens).

    fwd:     read the image (B*C*H*W*e), W (D*K*e), bias, cls, pos (T*D*e); write the tokens (B*T*D*e);
             2*M*K*D flops.
    fwd+bwd: the fwd, plus reading dOut (B*T*D*e) and the image again for dW = dYᵀ·patches, and writing dW, dbias,
             dcls, dpos; 2*M*K*D more flops (no image gradient).
    """
    B, img, p, D = (case.params[k] for k in ("B", "img", "p", "D"))
    e = case.dtype.itemsize
    np_, K = (img // p) ** 2, CHANS * p * p
    image, out, params = B * CHANS * img * img * e, B * (1 + np_) * D * e, (D * K + 2 * D + (1 + np_) * D) * e
    flops = 2.0 * B * np_ * K * D
    if case.direction == FWD:
        return Work(bytes=float(image + params + out), flops=flops)
    return Work(bytes=float(2 * (image + params + out)), flops=2 * flops)


def eager(x: Tensor, weight: Tensor, bias: Tensor, cls: Tensor, pos: Tensor) -> Tensor:
    """timm: PatchEmbed (Conv2d, flatten, transpose) then _pos_embed (cat the class token, add)."""
    y = F.conv2d(x, weight, bias, stride=weight.shape[2:]).flatten(2).transpose(1, 2)
    return torch.cat([cls.expand(x.shape[0], -1, -1), y], dim=1) + pos


def unfold_linear(x: Tensor, weight: Tensor, bias: Tensor, cls: Tensor, pos: Tensor) -> Tensor:
    p = weight.shape[2:]
    patches = F.unfold(x, p, stride=p).transpose(1, 2)  # [B, Np, K] im2col copy
    y = F.linear(patches, weight.reshape(weight.shape[0], -1), bias)
    return torch.cat([cls.expand(x.shape[0], -1, -1), y], dim=1) + pos


def _args(inp: Any) -> tuple[Tensor, ...]:
    return inp["x"], inp["weight"], inp["bias"], inp["cls"], inp["pos"]


def _eager(case: Case, inp: Any):
    a = _args(inp)
    return lambda: eager(*a)


def _unfold(case: Case, inp: Any):
    a = _args(inp)
    return lambda: unfold_linear(*a)


def _compiled(case: Case, inp: Any):
    a, fn = _args(inp), compile_fresh(eager)
    return lambda: fn(*a)


def _vk(case: Case, inp: Any):
    x, w, b, cls, pos = _args(inp)
    pe = _vitkern().functional.patch_embed
    return lambda: pe(x, w, b, pos, cls)


def _vk_cuda(case: Case, inp: Any):
    """Strict check first, so a case the CUDA backend rejects is an error row, not a silent Triton measurement; then
    strict=False so the backward (which the CUDA backend rejects) falls to Triton."""
    x, w, b, cls, pos = _args(inp)
    vk, pe = _vitkern(), _vitkern().functional.patch_embed
    with vk.use_backend("cuda", op="patch_embed"):
        vk.explain("patch_embed", x, w, b, pos, cls)

    def fwd():
        with vk.use_backend("cuda", op="patch_embed", strict=False):
            return pe(x, w, b, pos, cls)

    return fwd


def _explain(case: Case, inp: Any) -> dict[str, Any]:
    x, w, b, cls, pos = _args(inp)
    choice = _vitkern().explain("patch_embed", x, w, b, pos, cls)
    return {"backend": str(choice.backend_name), "explain": str(choice)}


PROVIDERS = [
    Provider("eager", _eager),
    Provider("unfold+linear", _unfold),
    Provider("torch.compile", _compiled, smoke=False),
    Provider("vitkern", _vk, describe=_explain),
    Provider("vitkern-cuda", _vk_cuda, describe=lambda case, inp: {"backend": "cuda"},
             supports=vitkern_backend_unavailable("patch_embed")),
]


def cases(ctx: Context) -> list[Case]:
    if ctx.smoke:  # tiny shapes: exercises the code path on CPU in well under a second
        return [Case({"B": 2, "img": 32, "p": 8, "D": 32}, dt, d) for dt in (torch.bfloat16, torch.float32)
                for d in (FWD, FWD_BWD)]
    shapes = [{"B": BATCH, "img": IMG, "p": p, "D": D} for p, D in SHAPES]
    return [Case(params, torch.bfloat16, d) for params in shapes for d in (FWD, FWD_BWD)]


def run(ctx: Context) -> list[Row]:
    return run_benchmark(ctx, Benchmark(NAME, cases(ctx), PROVIDERS, make_inputs, baseline="eager", model=model))


def targets(rows: list[Row]) -> list[str]:
    """One line per target and shape: MET / NOT MET / not measured. Printed in the summary, never asserted."""
    if any(r.timer == CPU_TIMER for r in rows):
        return ["targets (vitkern fwd bf16 vs eager / torch.compile): not evaluated in CPU smoke mode"]
    out = []
    for p, D in SHAPES:
        what = f"vitkern fwd bf16 p={p} D={D}"

        def row(name: str):
            return next((r for r in rows if r.provider == name and r.direction == FWD and r.params.get("p") == p
                         and r.params.get("D") == D), None)

        vk, comp = row("vitkern"), row("torch.compile")
        if vk is None or vk.status != "ok" or not vk.median_ms:
            out.append(f"targets ({what}): not measured ({f'{vk.status}: {vk.error}' if vk else 'no such row'})")
            continue
        sp = vk.speedup
        out.append(f"target {what} >= {TARGET_EAGER}x eager: "
                   + (f"{sp:.2f}x {'MET' if sp >= TARGET_EAGER else 'NOT MET'}" if sp else "n/a (eager row failed)"))
        if comp is not None and comp.status == "ok" and comp.median_ms:
            sc = comp.median_ms / vk.median_ms
            out.append(f"target {what} >= {TARGET_COMPILE}x torch.compile: {sc:.2f}x "
                       + ("MET" if sc >= TARGET_COMPILE else "NOT MET"))
        else:
            out.append(f"target {what} >= {TARGET_COMPILE}x torch.compile: n/a (compile row "
                       f"{comp.status if comp else 'missing'})")
    return out + cuda_vs_triton_targets(rows)  # issue 8's bar for the CUDA C++ forward
