"""The two ways into a vitkern op run the same computation (vitkern.dispatch.CustomOp).

- the op object the functionals call (``vitkern.ops.<family>.<op>``): in inference mode or without gradients it
  goes below the autograd keys; with gradients it runs the op inside an autograd.Function;
- ``torch.ops.vitkern.<op>``: the dispatcher, with the op's Autograd kernel (what torch.compile traces).

Both must give bitwise-equal outputs and gradients (one backward formula, the same backends), and a no-grad call must
not record a graph even when its inputs require gradients.
"""

from __future__ import annotations

import pytest
import torch

from vitkern.testing import randn, seed_for
from vitkern.ops import attention as attn_op
from vitkern.ops import layer_norm as ln_op


def _layer_norm_case(seed: str):
    x, r = (randn((6, 48), dtype=torch.float32, device="cpu", seed=seed_for(seed, i)) for i in (0, 1))
    w, b = (randn((48,), dtype=torch.float32, device="cpu", seed=seed_for(seed, i)) for i in (2, 3))
    return ln_op.layer_norm_fwd, torch.ops.vitkern.layer_norm_fwd, (x, w, b, r, 1e-5), 2  # y and the sum


def _attention_case(seed: str):
    qkv = randn((2, 5, 3 * 2 * 16), dtype=torch.float32, device="cpu", seed=seed_for(seed))
    return attn_op.attention_fwd, torch.ops.vitkern.attention_fwd, (qkv, None, None, 2, "packed", 0.25), 1


CASES = {"layer_norm": _layer_norm_case, "attention": _attention_case}


def _with_grad(args):
    return tuple(a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("case", list(CASES))
def test_op_object_and_torch_ops_agree_with_gradients(case):
    op, torch_op, args, n_diff = CASES[case](f"entry-{case}")
    results = []
    for call in (op, torch_op):
        inputs = _with_grad(args)
        outs = call(*inputs)
        grads_out = [randn(o.shape, dtype=o.dtype, device="cpu", seed=seed_for(case, "dy", i))
                     for i, o in enumerate(outs[:n_diff])]
        tensors = [a for a in inputs if isinstance(a, torch.Tensor)]
        grads = torch.autograd.grad(outs[:n_diff], tensors, grads_out)
        results.append((outs, grads))
    (outs_a, grads_a), (outs_b, grads_b) = results
    for a, b in zip(outs_a + grads_a, outs_b + grads_b):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same kernels and formulas: bitwise


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "grad, no input requiring it"])
@pytest.mark.parametrize("case", list(CASES))
def test_op_object_without_gradients_records_nothing(case, mode):
    op, torch_op, args, _ = CASES[case](f"entry-nograd-{case}")
    inputs = _with_grad(args) if mode != "grad, no input requiring it" else args
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(mode, torch.enable_grad)
    with context():
        outs = op(*inputs)
        expected = torch_op(*inputs)
    assert all(o.grad_fn is None and not o.requires_grad for o in outs)
    for a, b in zip(outs, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_an_op_called_eagerly_inside_a_compiled_region_is_not_compiled_itself(case):
    """A frame dynamo skips (``disable(recursive=False)``) still runs under dynamo's callback: frames it calls are
    compiled as usual. The op's implementation must not be (dispatch.outside_dynamo): the only graph is the caller's
    ``* 2``. Without that wrapper dynamo traced the implementation's frames (370 frames for one LayerNorm call)."""
    op, _, args, n_out = CASES[case]("eager_in_compiled")
    graphs = []

    def backend(gm, example_inputs):
        graphs.append([n.op for n in gm.graph.nodes if n.op == "call_function"])
        return gm.forward

    def eager_part(*tensors):
        out = torch.ops.vitkern.__getattr__(op.qualname.split("::")[1])(*tensors)
        return out[0] if isinstance(out, (tuple, list)) else out

    skipped = torch._dynamo.disable(eager_part, recursive=False)
    for _ in range(2):  # and again after a reset of dynamo's caches
        torch._dynamo.reset()
        graphs.clear()
        got = torch.compile(lambda *a: skipped(*a) * 2, backend=backend)(*args)
        want = eager_part(*args) * 2
        assert torch.equal(got, want)
        assert graphs == [["call_function"]], graphs  # the multiply, nothing from inside the op
