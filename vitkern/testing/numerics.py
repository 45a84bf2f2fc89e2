"""Numerics harness for kernel tests (CPU interpreter and GPU alike).

The rule every parity test uses:

    err(kernel) <= k * err(PyTorch in the same dtype) + atol(dtype) * scale

where err(.) is the max absolute difference to a float64 reference computed from the *same* inputs, and
``scale`` is the reference's max magnitude (at least 1). The PyTorch term makes the bound grow with the dtype and
with the problem (long reductions, large values) exactly as much as a well-implemented op's error does; ``k``
allows a different but equally sound summation order; ``atol`` is a floor for the cases where PyTorch happens to be
exact (e.g. it computes in a wider type than its output). NaN/Inf in the kernel output where the reference is
finite always fails.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Mapping, Sequence

import torch

from vitkern.memory import poison_outputs  # noqa: F401  (re-exported: tests poison kernel outputs)

# atol(dtype): a few ulp at magnitude 1 in the storage dtype (fp32: 8 ulp, for reductions summed in another order).
ATOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}
DEFAULT_K = 2.0


@dataclasses.dataclass(frozen=True)
class Tolerance:
    k: float = DEFAULT_K
    atol: float | None = None  # None: ATOL[dtype]

    def bound(self, torch_err: float, dtype: torch.dtype, scale: float) -> float:
        atol = ATOL[dtype] if self.atol is None else self.atol
        return self.k * torch_err + atol * max(scale, 1.0)


def seed_for(*key: Any) -> int:
    """A stable seed from a case's parameters: fresh inputs per case, reproducible across runs."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def randn(shape: Sequence[int], *, dtype: torch.dtype, device: str | torch.device, seed: int, scale: float = 1.0,
          mean: float = 0.0) -> torch.Tensor:
    """Normal random tensor drawn in fp32 on the CPU (same values on every device), then cast."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(tuple(shape), generator=g, dtype=torch.float32) * scale + mean
    return t.to(device=device, dtype=dtype)


def materialize(args: Any, *, device: str | torch.device, seed: int) -> Any:
    """``args`` with every meta tensor (also inside tuples / lists) replaced by a random tensor on ``device`` of the
    same sizes, strides and dtype: shape-only test arguments reused for a real run. ``torch.library.opcheck``, for
    one, checks nothing when an input is on the meta device."""
    g = torch.Generator().manual_seed(seed)

    def real(a: Any) -> Any:
        if isinstance(a, (tuple, list)):
            return type(a)(real(x) for x in a)
        if not isinstance(a, torch.Tensor) or a.device.type != "meta":
            return a
        out = torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=device)
        if a.dtype.is_floating_point:
            src = torch.randn(a.shape, generator=g)
        else:
            src = torch.randint(0, 256 if a.dtype == torch.uint8 else 100, a.shape, generator=g)
        return out.copy_(src)

    return real(args)


def max_abs_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.detach().double() - ref.detach().double()).abs().max().item() if out.numel() else 0.0


def assert_close(
    name: str,
    out: torch.Tensor,
    ref64: torch.Tensor,
    torch_out: torch.Tensor,
    tol: Tolerance = Tolerance(),
) -> dict[str, float]:
    """Check ``out`` against the float64 ``ref64`` with the PyTorch-relative rule (see module docstring).

    ``torch_out`` is what PyTorch computes in the kernel's dtype from the same inputs. Returns the numbers.
    """
    if out.shape != ref64.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}")
    ref_finite = torch.isfinite(ref64)
    bad = ~torch.isfinite(out.detach().double()) & ref_finite
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{name}: {int(bad.sum())} non-finite values where the reference is finite (first at {idx}); "
                             "an unwritten (poisoned) output or an overflow")
    err = max_abs_err(out, ref64)
    torch_err = max_abs_err(torch_out, ref64)
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    bound = tol.bound(torch_err, out.dtype, scale)
    info = {"err": err, "torch_err": torch_err, "bound": bound, "scale": scale}
    if not err <= bound:
        diff = (out.detach().double() - ref64).abs()
        idx = tuple(int(i) for i in (diff == diff.max()).nonzero()[0])
        raise AssertionError(
            f"{name}: max|err| {err:.3e} > bound {bound:.3e} (= {tol.k} x torch {out.dtype} err {torch_err:.3e} + "
            f"atol x scale {scale:.3g}); worst at {idx}: got {out.detach().double()[idx].item():.6g}, "
            f"ref {ref64[idx].item():.6g}"
        )
    return info


def clone_inputs(inputs: Mapping[str, torch.Tensor | None], dtype: torch.dtype | None = None,
                 requires_grad: Sequence[str] = ()) -> dict[str, torch.Tensor | None]:
    """Detached leaf copies (optionally cast) with requires_grad set on the named ones.

    Tests of non-contiguous layouts build the strided view inside the function under test, so that the
    gradient still lands on a leaf.
    """
    out: dict[str, torch.Tensor | None] = {}
    for k, v in inputs.items():
        if v is None:
            out[k] = None
            continue
        c = v.detach().clone() if dtype is None or not v.is_floating_point() else v.detach().to(dtype)
        out[k] = c.requires_grad_(k in requires_grad)
    return out


def _outputs(result: Any) -> list[torch.Tensor]:
    return list(result) if isinstance(result, (tuple, list)) else [result]


def check_forward_backward(
    fn: Callable[..., Any],
    ref_fn: Callable[..., Any],
    inputs: Mapping[str, torch.Tensor | None],
    grad_names: Sequence[str],
    *,
    seed: int,
    tol: Tolerance = Tolerance(),
    grad_tol: Tolerance | None = None,
    torch_fn: Callable[..., Any] | None = None,
) -> dict[str, dict[str, float]]:
    """Outputs and the gradients of every name in ``grad_names`` against float64 ``ref_fn``.

    ``fn`` is the kernel under test, called with ``inputs`` (in their dtype and layout) under output poisoning;
    ``ref_fn`` (default also the PyTorch baseline) is called once on float64 copies and once in the inputs' dtype.
    The upstream gradients are fresh random tensors, identical for all three runs.
    """
    torch_fn = torch_fn or ref_fn
    grad_tol = grad_tol or tol
    runs = {}
    for tag, f, dt in (("kernel", fn, None), ("ref64", ref_fn, torch.float64), ("torch", torch_fn, None)):
        args = clone_inputs(inputs, dt, grad_names)
        with poison_outputs(tag == "kernel"):
            outs = _outputs(f(**args))
            runs[tag] = (args, outs)
    _, ref_outs = runs["ref64"]
    g = torch.Generator().manual_seed(seed ^ 0x5EED)
    upstream = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in ref_outs]
    report: dict[str, dict[str, float]] = {}
    grads = {}
    for tag, (args, outs) in runs.items():
        if len(outs) != len(ref_outs):
            raise AssertionError(f"{tag} returned {len(outs)} outputs, reference {len(ref_outs)}")
        if grad_names:
            live = [(o, u) for o, u in zip(outs, upstream) if o.requires_grad]
            loss = sum((o.double() * u.to(o.device)).sum() for o, u in live)
            wrt = [args[n] for n in grad_names]
            with poison_outputs(tag == "kernel"):
                grads[tag] = torch.autograd.grad(loss, wrt, allow_unused=True)
    for i, (o, r, t) in enumerate(zip(runs["kernel"][1], ref_outs, runs["torch"][1])):
        report[f"out{i}"] = assert_close(f"output {i}", o.cpu(), r.cpu(), t.cpu(), tol)
    for j, n in enumerate(grad_names):
        gk, gr, gt = grads["kernel"][j], grads["ref64"][j], grads["torch"][j]
        if gr is None:
            continue
        if gk is None:
            raise AssertionError(f"grad of {n}: kernel gave None, reference has a gradient")
        report[f"grad_{n}"] = assert_close(f"grad of {n}", gk.cpu(), gr.cpu(), gt.cpu(), grad_tol)
    return report
