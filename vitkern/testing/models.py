"""Checks every model integration repeats: optimize() keeps parameters, state_dict and outputs; restore() undoes it."""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
from torch import nn

from vitkern.testing.numerics import Tolerance, assert_close


def logits_of(output: Any) -> torch.Tensor:
    """The main tensor of a model's output (a tensor, a tuple's first item, or a HF ModelOutput's logits)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    if isinstance(output, (tuple, list)):
        return logits_of(output[0])
    raise TypeError(f"cannot find the output tensor in a {type(output).__name__}")


def randomize_(model: nn.Module, seed: int, std: float = 0.05) -> nn.Module:
    """Perturb every parameter (fresh values, never an init's zeros/ones) from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)
    return model


def check_optimized_model(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    optimize: Callable[[nn.Module], Any],
    restore: Callable[[nn.Module], int],
    *,
    grads: bool = True,
    tol: Tolerance = Tolerance(k=2.0),
    grad_tol: Tolerance = Tolerance(k=4.0),
    forward: Callable[..., Any] | None = None,
) -> Any:
    """optimize(model) in place and check it against a float64 copy of the original:

    - the state_dict has the same keys and the very same tensors (the swap shares parameters, copies nothing);
    - outputs and, with ``grads``, every parameter's gradient are within the numerics rule of the original
      model's own error in its dtype (err(optimized) <= k * err(original) + atol(dtype) * scale, both vs float64);
    - restore(model) brings back outputs bit for bit.
    Returns optimize's report. ``forward(model, *inputs)`` defaults to ``model(*inputs)``.
    """
    forward = forward or (lambda m, *xs: m(*xs))
    ref64 = copy.deepcopy(model).double()
    before_sd = model.state_dict(keep_vars=True)

    def run(m: nn.Module, xs: Sequence[torch.Tensor]):
        m.zero_grad(set_to_none=True)
        out = logits_of(forward(m, *xs))
        if grads:
            g = torch.Generator().manual_seed(1234)
            upstream = torch.randn(out.shape, generator=g, dtype=torch.float64)
            (out.double() * upstream).sum().backward()
        return out.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    xs64 = [x.double() if x.is_floating_point() else x for x in inputs]
    out64, grads64 = run(ref64, xs64)
    base, base_grads = run(model, inputs)

    report = optimize(model)
    after_sd = model.state_dict(keep_vars=True)
    assert list(after_sd) == list(before_sd), "optimize changed the state_dict keys: " + str(
        sorted(set(after_sd) ^ set(before_sd)))
    changed = [k for k in before_sd if after_sd[k] is not before_sd[k]]
    assert not changed, f"optimize replaced these tensors instead of sharing them: {changed[:5]}"

    out, opt_grads = run(model, inputs)
    assert_close("optimized output", out, out64, base, tol)
    if grads:
        assert set(opt_grads) == set(base_grads), f"gradient sets differ: {set(opt_grads) ^ set(base_grads)}"
        for name in base_grads:
            assert_close(f"grad of {name}", opt_grads[name], grads64[name], base_grads[name], grad_tol)

    restore(model)
    restored, _ = run(model, inputs)
    torch.testing.assert_close(restored, base, rtol=0, atol=0, msg="restore() did not bring back the original outputs")
    return report


def block_output_dtypes(model: nn.Module, run: Callable[[], Any], names: Sequence[str]) -> dict[str, torch.dtype]:
    """{block name: the dtype of its output} while ``run()`` runs: the residual stream's dtype after each block
    named in ``names``. A tuple output (HF layers) counts by its first tensor."""
    seen: dict[str, torch.dtype] = {}
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_hook(lambda mod, args, out, n=n: seen.__setitem__(n, logits_of(out).dtype))
             for n in names]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def check_autocast_matches_original(
    model: nn.Module, x: torch.Tensor, optimize: Callable[[nn.Module], Any], is_block: Callable[[str, nn.Module], bool],
    *, stream_dtype: torch.dtype | None = None, tol: Tolerance = Tolerance(k=2.0), check_compiled: bool = True,
) -> None:
    """An fp32 model optimized in place computes under bf16 autocast what the original computes under autocast
    (vitkern/functional/_autocast.py): every block's output in the original's dtype (``stream_dtype``, when given,
    for all of them: fp32 for ViTs), the output's dtype, and an error vs float64 within ``tol`` of the original's
    own autocast error. With ``check_compiled``, torch.compile(fullgraph) of the optimized model under autocast gives
    the very same output."""
    amp = lambda: torch.autocast(x.device.type, dtype=torch.bfloat16)  # noqa: E731
    blocks = [n for n, m in model.named_modules() if is_block(n, m)]  # the original's (a swap keeps the names)
    assert blocks, "is_block matched no module"
    with torch.no_grad():
        ref64 = logits_of(copy.deepcopy(model).double()(x.double()))
        with amp():
            original_dtypes = block_output_dtypes(model, lambda: model(x), blocks)
            original = logits_of(model(x))
        optimize(model)
        with amp():
            ours_dtypes = block_output_dtypes(model, lambda: model(x), blocks)
            out = logits_of(model(x))
            if check_compiled:
                torch._dynamo.reset()
                compiled = logits_of(torch.compile(model, fullgraph=True, backend="eager")(x))  # autocast is traced
    assert set(original_dtypes) == set(blocks), f"blocks that did not run: {sorted(set(blocks) - set(original_dtypes))}"
    assert ours_dtypes == original_dtypes, (ours_dtypes, original_dtypes)
    if stream_dtype is not None:
        assert set(ours_dtypes.values()) == {stream_dtype}, ours_dtypes
    assert out.dtype == original.dtype
    assert_close("autocast output", out, ref64, original, tol)
    if check_compiled:
        torch.testing.assert_close(compiled, out, atol=0, rtol=0)
