"""vitkern's ops fix their own precision (fp32 accumulation, fp32 softmax and LayerNorm statistics), under autocast
too: the caller's autocast must not reach inside an op's backend. Before, the reference attention's fp32 matmuls
ran under the caller's autocast, which rounded its logits to bf16 before the logsumexp: 13% error where SDPA has
0.3%, and gradients as wrong (found by a timm-wide sweep: pit, crossvit, pvt under bf16 autocast).

Each op is called on inputs already in bf16 (what autocast hands it), inside ``torch.autocast("cpu", bf16)`` and
outside it: the outputs and every gradient must be bitwise equal (reference backend, CPU; autocast has nothing to
cast on these inputs, so any difference is autocast inside the op).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vitkern
from vitkern import functional as VF
from vitkern.testing import randn, seed_for

BF16 = torch.bfloat16


def _inputs(case: str, shapes: dict[str, tuple[int, ...]], scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {name: randn(shape, dtype=BF16, device="cpu", seed=seed_for("autocast-op", case, name), scale=scale)
            .requires_grad_() for name, shape in shapes.items()}


CASES = {  # op -> (input shapes, call)
    "attention": ({"qkv": (2, 50, 3 * 4 * 32)}, lambda t: VF.attention(qkv=t["qkv"] * 5, num_heads=4)),
    "window_attention": ({"qkv": (1, 7, 9, 3 * 2 * 16), "table": ((2 * 4 - 1) ** 2, 2)},
                         lambda t: VF.window_attention(t["qkv"] * 3, t["table"], 2, 4, 2)),
    "layer_norm": ({"x": (3, 96), "w": (96,), "b": (96,), "r": (3, 96)},
                   lambda t: VF.layer_norm(t["x"], (96,), t["w"], t["b"], 1e-6, residual=t["r"])[0]),
    "ln_linear": ({"x": (5, 64), "lw": (64,), "lb": (64,), "w": (96, 64), "b": (96,)},
                  lambda t: VF.ln_linear(t["x"], t["lw"], t["lb"], t["w"], t["b"], 1e-6)),
    "ln_mlp": ({"x": (5, 64), "lw": (64,), "lb": (64,), "w1": (128, 64), "b1": (128,), "w2": (64, 128),
                "b2": (64,), "g": (64,)},
               lambda t: VF.ln_mlp(t["x"], t["lw"], t["lb"], t["w1"], t["b1"], t["w2"], t["b2"], t["g"], 1e-6)),
    "linear_residual": ({"x": (5, 64), "w": (48, 64), "b": (48,), "r": (5, 48), "g": (48,)},
                        lambda t: VF.linear_residual(t["x"], t["w"], t["b"], t["r"], t["g"])),
    "patch_embed": ({"img": (2, 3, 16, 16), "w": (32, 3, 8, 8), "b": (32,), "pos": (1, 5, 32), "cls": (1, 1, 32)},
                    lambda t: VF.patch_embed(t["img"], t["w"], t["b"], t["pos"], t["cls"])),
}


@pytest.mark.parametrize("op", list(CASES))
def test_op_computes_the_same_inside_and_outside_autocast(op):
    shapes, call = CASES[op]
    results = []
    for under_autocast in (False, True):
        tensors = _inputs(op, shapes)
        with vitkern.use_backend("reference"), torch.autocast("cpu", dtype=BF16, enabled=under_autocast):
            out = call(tensors)
            grad_out = randn(out.shape, dtype=out.dtype, device="cpu", seed=seed_for("autocast-op", op, "dout"))
            out.backward(grad_out)
        results.append((out.detach(), {name: t.grad for name, t in tensors.items()}))
    (out, grads), (out_ac, grads_ac) = results
    assert out_ac.dtype == out.dtype
    torch.testing.assert_close(out_ac, out, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads_ac[name], grads[name], rtol=0, atol=0, msg=f"d{name}")


def test_attention_under_autocast_is_as_accurate_as_sdpa():
    """Against float64 on the same bf16 inputs: within 2x SDPA's own error under autocast (fp32 softmax in both)."""
    B, N, H, D = 2, 50, 4, 32
    qkv = randn((B, N, 3 * H * D), dtype=BF16, device="cpu", seed=seed_for("autocast-sdpa"), scale=5.0)
    q, k, v = qkv.double().view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    truth = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, H * D)
    with torch.autocast("cpu", dtype=BF16):
        sdpa = F.scaled_dot_product_attention(*qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4))
        sdpa = sdpa.transpose(1, 2).reshape(B, N, H * D)
        with vitkern.use_backend("reference"):
            ours = VF.attention(qkv=qkv, num_heads=H)
    err_sdpa = (sdpa.double() - truth).abs().max().item()
    err_ours = (ours.double() - truth).abs().max().item()
    assert err_ours <= 2 * err_sdpa + 1e-3 * truth.abs().max().item(), (err_ours, err_sdpa)
