"""Shifted-window attention: the fused op and modules against the reference Swin block, timm's block, and float64.

Tolerance: vitkern.testing's rule, err <= 2 x (PyTorch's error in the same dtype) + atol(dtype) x scale, both against
the float64 oracle on the same inputs (vitkern/testing/numerics.py). The timm comparisons are fp32 vs fp32 of the
same math in another order: see TIMM_REL_TOL.
"""


import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import vitkern
from vitkern.functional.window_attention import window_attention
from vitkern.nn.window_attention import ShiftedWindowAttention, WindowAttention
from vitkern.ops import window_attention as wa_op
from vitkern.reference import swin as ref_swin
from vitkern.testing import (
    check_forward_backward, poison_outputs, randn, run_every_triton_config, run_in_gpu_geometry, seed_for,
)

OP = "window_attention"
PARAM_NAMES = ["qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "relative_position_bias_table"]
GRADS = ["x"] + [n.replace(".", "_") for n in PARAM_NAMES]
# fp32 both sides, same math in a different order (the kernel's exp2 softmax, fused reductions): a few ulp per op,
# ~1e-6 relative observed; a wrong index, region or padding rule is off by 1e-2 or more.
TIMM_REL_TOL = 2e-5


class _BlockAttnPath(torch.nn.Module):
    """The reference block's attention path (roll, pad, partition, attention, reverse, crop, unroll) on normed x."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block.window_attention(x)


def make_case(B, res, ws, shift, heads, D, dtype, device, dim=20, seed_key=()):
    """A reference SwinTransformerBlock (timm semantics, window/shift clamped like timm) and random inputs."""
    block = ref_swin.SwinTransformerBlock(dim, res, heads, head_dim=D, window_size=ws, shift_size=shift).to(device)
    seed = seed_for("window-attention", B, res, ws, shift, heads, D, dtype, *seed_key)
    inputs = {"x": randn((B, *res, dim), dtype=dtype, device=device, seed=seed)}
    scales = {"qkv.weight": dim ** -0.5, "qkv.bias": 0.5, "proj.weight": (heads * D) ** -0.5, "proj.bias": 0.2,
              "relative_position_bias_table": 1.0}  # O(1) bias so a wrong table index shows
    for i, name in enumerate(PARAM_NAMES):
        p = block.get_parameter("attn." + name)
        inputs[name.replace(".", "_")] = randn(p.shape, dtype=dtype, device=device, seed=seed + i + 1,
                                               scale=scales[name])
    return block, inputs, seed


def _params(**kw):
    return {name: kw[name.replace(".", "_")] for name in PARAM_NAMES}


def run_block_parity(B, res, ws, shift, heads, D, dtype, device, mask_value=-100.0):
    block, inputs, seed = make_case(B, res, ws, shift, heads, D, dtype, device)
    fused = ShiftedWindowAttention.from_timm_block(block)
    ref_path = _BlockAttnPath(block)

    def kernel(x, **kw):
        return torch.func.functional_call(fused, _params(**kw), (x,))

    with vitkern.use_backend("triton", op=OP):
        return check_forward_backward(kernel, _block_reference(ref_path), inputs, GRADS, seed=seed)


def _block_reference(path):
    def reference(x, **kw):
        state = {"block.attn." + k: v for k, v in _params(**kw).items()}
        if path.block.attn_mask is not None:  # the fp32 mask buffer would promote a half-precision run to fp32
            state["block.attn_mask"] = path.block.attn_mask.to(x.dtype)
        return torch.func.functional_call(path, state, (x,))

    return reference


# ----------------------------------------------------------------------------------------------- CPU interpreter
# (B, feature map, window, shift, heads, head_dim, dtype): divisible and padded maps, non-square maps, window >= map
# on one or both axes (timm clamps: window = map there, no shift), heads 1/2/3, D 16/32, ws 2/3/4/7.
BLOCK_CASES = [
    (2, (8, 8), 4, 2, 3, 16, torch.float32),  # divisible, shifted
    (1, (11, 9), 4, 2, 3, 16, torch.float32),  # padding on both axes + shift: regions off the roll's seam
    (1, (9, 6), 3, 1, 1, 32, torch.float16),  # divisible, non-square map, fp16
    (1, (10, 7), 3, 0, 3, 16, torch.float16),  # padding, no shift, fp16
    (1, (5, 7), 2, 1, 1, 16, torch.float32),  # ws 2, padding on H
    (1, (14, 14), 7, 3, 1, 32, torch.float32),  # Swin ws 7 (N = 49, BLOCK 64), 2 x 2 windows
    (1, (6, 10), 7, 3, 3, 16, torch.float32),  # window >= map on H only: window (6, 7), shift (0, 3), pad W
    (2, (5, 4), 7, 3, 1, 32, torch.float16),  # window >= map on both axes: one window, no shift
    (1, (6, 5), 2, 0, 2, 16, torch.float32),  # ws 2, no shift, padding on W
    (2, (8, 8), 4, 0, 3, 16, torch.float16),  # ws 4, no shift, divisible, fp16
    (1, (9, 15), 7, 0, 2, 16, torch.float32),  # ws 7, no shift, padding on both axes (2 x 3 windows)
    # fp16 across key blocks (interpreter: 32 keys, 16 queries): dQ and dK/dV add onto earlier blocks' fp16 stores
    (1, (14, 14), 7, 3, 2, 16, torch.float16),
    # bf16 (the interpreter's bf16 made exact by vitkern.testing.interpreter_bf16): shifted + padded, and across
    # key blocks, where dQ and dK/dV add onto earlier blocks' bf16 stores (8 mantissa bits: the coarsest rounding)
    (1, (11, 9), 4, 2, 3, 16, torch.bfloat16),
    (1, (14, 14), 7, 3, 2, 32, torch.bfloat16),
]

BLOCK_IDS = [f"{r[0]}x{r[1]}-ws{w}-s{s}-h{h}-d{d}-{str(t)[6:]}" for _, r, w, s, h, d, t in BLOCK_CASES]


@pytest.mark.interpreter
@pytest.mark.parametrize("B,res,ws,shift,heads,D,dtype", BLOCK_CASES, ids=BLOCK_IDS)
def test_interpreter_block_parity(B, res, ws, shift, heads, D, dtype):
    """Forward and gradients of x, qkv/proj weights and biases and the bias table vs the reference Swin block."""
    run_block_parity(B, res, ws, shift, heads, D, dtype, "cpu")


def _functional_case(B, res, window, shift, heads, D, dtype, device, bias=True, seed_key=()):
    seed = seed_for("wa-functional", B, res, window, shift, heads, D, dtype, bias, *seed_key)
    wh, ww = window
    inputs = {
        "qkv": randn((B, *res, 3 * heads * D), dtype=dtype, device=device, seed=seed),
        "table": randn(((2 * wh - 1) * (2 * ww - 1), heads), dtype=dtype, device=device, seed=seed + 1),
        "qkv_bias": randn((3 * heads * D,), dtype=dtype, device=device, seed=seed + 2) if bias else None,
    }
    return inputs, seed


def check_functional(B, res, window, shift, heads, D, dtype, device, mask_value=-100.0, bias=True, pad_first=False,
                     salt=()):
    """vitkern.functional.window_attention vs the op's plain-PyTorch reference, outputs and every gradient, on
    whichever backend the caller forces; ``salt`` makes the inputs differ from another backend's run of the case."""
    inputs, seed = _functional_case(B, res, window, shift, heads, D, dtype, device, bias,
                                    (*salt, mask_value, pad_first))

    def kernel(qkv, table, qkv_bias):
        return window_attention(qkv, table, heads, window, shift, qkv_bias=qkv_bias, mask_value=mask_value,
                                pad_first=pad_first)

    def reference(qkv, table, qkv_bias):  # plain PyTorch in the inputs' dtype (float64 for the oracle)
        return wa_op.reference_forward(qkv, qkv_bias, table, heads, window, shift, D ** -0.5, mask_value,
                                       pad_first)[0]

    return check_forward_backward(kernel, reference, inputs, [k for k, v in inputs.items() if v is not None],
                                  seed=seed)


def run_functional_parity(B, res, window, shift, heads, D, dtype, device, mask_value=-100.0, bias=True,
                          pad_first=False):
    with vitkern.use_backend("triton", op=OP):
        return check_functional(B, res, window, shift, heads, D, dtype, device, mask_value, bias, pad_first)


@pytest.mark.interpreter
@pytest.mark.parametrize("case", [
    ("non_square_window", dict(B=1, res=(7, 11), window=(3, 5), shift=(1, 2), heads=2, D=16)),
    ("neg_inf_mask", dict(B=1, res=(8, 9), window=(4, 4), shift=(2, 2), heads=1, D=16, mask_value=float("-inf"))),
    # ws 7 in the interpreter's 32-key blocks: in the last window, query (5, 5) sees no key of its region in keys
    # 0-31, so a whole block is -inf for it (the online softmax must not turn that into NaN)
    ("neg_inf_mask_whole_key_block", dict(B=1, res=(14, 14), window=(7, 7), shift=(3, 3), heads=1, D=16,
                                          mask_value=float("-inf"))),
    ("no_qkv_bias_padded", dict(B=1, res=(6, 5), window=(4, 4), shift=(2, 2), heads=2, D=16, bias=False)),
    ("head_dim_24", dict(B=1, res=(4, 4), window=(4, 4), shift=(0, 0), heads=1, D=24)),  # non-pow2 D (masked)
    ("pad_first", dict(B=1, res=(7, 6), window=(3, 4), shift=(1, 2), heads=2, D=16, pad_first=True)),
], ids=lambda c: c[0])
def test_interpreter_functional_parity(case):
    run_functional_parity(**case[1], dtype=torch.float32, device="cpu")


@pytest.mark.interpreter
def test_interpreter_backward_is_bitwise_repeatable():
    """Several window chunks per head (3 in the interpreter) reduce in a fixed order: identical bits on rerun."""
    inputs, _ = _functional_case(2, (9, 8), (4, 4), (2, 2), 2, 16, torch.float32, "cpu")
    leaves = [t.requires_grad_() for t in inputs.values()]
    dy = randn((2, 9, 8, 32), dtype=torch.float32, device="cpu", seed=seed_for("wa-det-dy"))
    with vitkern.use_backend("triton", op=OP):
        runs = [torch.autograd.grad(window_attention(inputs["qkv"], inputs["table"], 2, 4, 2,
                                                    qkv_bias=inputs["qkv_bias"]), leaves, dy) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.interpreter
def test_interpreter_outputs_fully_written_under_poison():
    inputs, _ = _functional_case(1, (11, 9), (4, 4), (2, 2), 1, 16, torch.float16, "cpu")
    with vitkern.use_backend("triton", op=OP), poison_outputs():
        out = window_attention(inputs["qkv"], inputs["table"], 1, 4, 2, qkv_bias=inputs["qkv_bias"])
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------- against timm
timm_swin = pytest.importorskip("timm.models.swin_transformer")


def _assert_rel_close(names, got, expected):
    for name, a, b in zip(names, got, expected, strict=True):
        err, scale = (a - b).abs().max().item(), b.abs().max().item()
        assert err <= TIMM_REL_TOL * max(scale, 1.0), f"{name}: {err:.3g} vs max {scale:.3g}"


def _timm_block(res, ws, shift, heads, D, dim=20, seed=0):
    block = timm_swin.SwinTransformerBlock(dim, res, heads, head_dim=D, window_size=ws, shift_size=shift).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in block.attn.named_parameters():  # O(1) bias table so a wrong index shows
            p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 if p.ndim == 2 and "table" not in name
                                                          else 1.0))
    return block


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("res,ws,shift,heads", [((11, 9), 4, 2, 3), ((6, 10), 7, 3, 1), ((8, 8), 4, 2, 2)])
def test_matches_timm_block_attention(backend, res, ws, shift, heads):
    """The fused module on timm's own block (shared parameters) equals ``block._attn`` forward and backward."""
    block = _timm_block(res, ws, shift, heads, 16, seed=seed_for("timm", res, ws) % 1000)
    # the kernel computes timm's relative_position_index arithmetically
    assert torch.equal(block.attn.relative_position_index.view(-1),
                       ref_swin.relative_position_index(block.window_size).view(-1))
    fused = ShiftedWindowAttention.from_timm_block(block)
    assert fused.relative_position_bias_table is block.attn.relative_position_bias_table
    x = randn((2, *res, 20), dtype=torch.float32, device="cpu", seed=seed_for("timm-x", res)).requires_grad_()
    dy = randn((2, *res, 20), dtype=torch.float32, device="cpu", seed=seed_for("timm-dy", res))
    params = [x] + list(block.attn.parameters())
    expected = block._attn(x)
    g_expected = torch.autograd.grad(expected, params, dy)
    with vitkern.use_backend(backend, op=OP):
        got = fused(x)
        g_got = torch.autograd.grad(got, params, dy)
    _assert_rel_close(["out", "x"] + [n for n, _ in block.attn.named_parameters()], [got, *g_got],
                      [expected, *g_expected])


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_window_attention_dropin_matches_timm(backend):
    timm_attn = _timm_block((8, 8), 4, 2, 2, 16, seed=3).attn
    mask = ref_swin.shifted_window_mask(8, 8, 4, 2)
    mine = WindowAttention(20, 2, head_dim=16, window_size=4)
    assert mine.state_dict().keys() == timm_attn.state_dict().keys()
    mine.load_state_dict(timm_attn.state_dict())
    shared = WindowAttention.from_timm(timm_attn)
    assert shared.qkv is timm_attn.qkv
    x = randn((2 * 4, 16, 20), dtype=torch.float32, device="cpu", seed=seed_for("dropin"))
    with torch.no_grad(), vitkern.use_backend(backend, op=OP):
        for m in (mine, shared):
            for msk in (None, mask):  # with a mask tensor: the plain PyTorch path
                expected = timm_attn(x, mask=msk)
                assert (m(x, mask=msk) - expected).abs().max() <= TIMM_REL_TOL * expected.abs().max()


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("res,ws,shift", [((11, 9), 4, 2), ((5, 7), 7, 3), ((8, 12), 4, 2)])
def test_matches_torchvision_shifted_window_attention(backend, res, ws, shift):
    """torchvision pads before the roll (HF too): ``pad_first``; parameters shared with its module."""
    tv_swin = pytest.importorskip("torchvision.models.swin_transformer")
    tv = tv_swin.ShiftedWindowAttention(32, [ws, ws], [shift, shift], 2).eval()
    g = torch.Generator().manual_seed(seed_for("tv", res, ws) % 1000)
    with torch.no_grad():
        for p in tv.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 if p.ndim == 2 and p.shape[0] != (
                2 * ws - 1) ** 2 else 1.0))
    fused = ShiftedWindowAttention.from_torchvision(tv)
    x = randn((2, *res, 32), dtype=torch.float32, device="cpu", seed=seed_for("tv-x", res)).requires_grad_()
    dy = randn((2, *res, 32), dtype=torch.float32, device="cpu", seed=seed_for("tv-dy", res))
    params = [x] + list(tv.parameters())
    expected = tv(x)
    g_expected = torch.autograd.grad(expected, params, dy)
    with vitkern.use_backend(backend, op=OP):
        got = fused(x)
        g_got = torch.autograd.grad(got, params, dy)
    _assert_rel_close(["out", "x"] + [n for n, _ in tv.named_parameters()], [got, *g_got], [expected, *g_expected])


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("res,ws,shift", [((11, 9), 4, 2), ((8, 8), 4, 2)])
def test_matches_hf_swin_layer(backend, res, ws, shift):
    """HF's SwinLayer (pad, then roll; separate query/key/value linears): its whole forward rebuilt around the
    functional with pad_first=True and the three linears concatenated into one qkv."""
    hf_swin = pytest.importorskip("transformers.models.swin.modeling_swin")
    from transformers import SwinConfig

    cfg = SwinConfig(embed_dim=32, window_size=ws, num_heads=[2], depths=[1], hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, drop_path_rate=0.0)
    layer = hf_swin.SwinLayer(cfg, dim=32, input_resolution=res, num_heads=2, shift_size=shift).eval()
    g = torch.Generator().manual_seed(seed_for("hf", res) % 1000)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 if p.ndim == 2 and "table" not in name
                                                          else 0.5))
    B, (H, W) = 2, res
    x = randn((B, H * W, 32), dtype=torch.float32, device="cpu", seed=seed_for("hf-x", res))
    with torch.no_grad():
        expected = layer(x, res)[0]
        sa = layer.attention  # transformers 5.x names (q_proj, k_proj, v_proj, o_proj)
        qkv_w = torch.cat([sa.q_proj.weight, sa.k_proj.weight, sa.v_proj.weight])
        qkv_b = torch.cat([sa.q_proj.bias, sa.k_proj.bias, sa.v_proj.bias])
        qkv = F.linear(layer.layernorm_before(x).view(B, H, W, 32), qkv_w, qkv_b)
        with vitkern.use_backend(backend, op=OP):
            attn = window_attention(qkv, sa.relative_position_bias.relative_position_bias_table, 2,
                                    layer.window_size, layer.shift_size, qkv_bias=qkv_b, pad_first=True)
        y = x + sa.o_proj(attn).view(B, H * W, 32)
        got = y + layer.mlp(layer.layernorm_after(y))
    assert (got - expected).abs().max() <= TIMM_REL_TOL * expected.abs().max()


def _table_rows(window, ws):
    """Row of the (2ws-1)² table that holds each entry of a ``window`` table: the same (dy, dx) offset."""
    h, w = window
    i = torch.arange((2 * h - 1) * (2 * w - 1))
    dy, dx = i // (2 * w - 1) - (h - 1), i % (2 * w - 1) - (w - 1)
    return (dy + ws - 1) * (2 * ws - 1) + dx + ws - 1


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("res,ws,shift,always_partition", [
    ((7, 7), 7, 3, False),  # map == window: timm keeps window 7, drops the shift
    ((4, 4), 4, 2, False),  # the same at ws 4
    ((5, 4), 7, 3, False),  # map < window on both axes: one 5x4 window, no shift
    ((6, 10), 7, 3, False),  # on H only: window (6, 7), shift (0, 3), W padded
    ((5, 4), 7, 3, True),  # always_partition: window 7 and shift 3 kept, the map padded up to 7x7
], ids=["7x7-ws7", "4x4-ws4", "5x4-ws7", "6x10-ws7", "5x4-ws7-always_partition"])
def test_module_on_map_within_window_matches_timm_block(backend, res, ws, shift, always_partition):
    """ShiftedWindowAttention built directly (no block) equals timm's SwinTransformerBlock built for that map: the
    window shrinks to the map and the shift is dropped where the map is no larger than the window. timm's block
    owns a table for its clamped window; it gets our entries of the same offsets (computed here independently of
    ShiftedWindowAttention.table_for), and our table's gradient must be its gradient there and zero elsewhere."""
    heads = 2
    block = timm_swin.SwinTransformerBlock(20, res, heads, head_dim=16, window_size=ws, shift_size=shift,
                                           always_partition=always_partition).eval()
    mine = ShiftedWindowAttention(20, heads, head_dim=16, window_size=ws, shift_size=shift,
                                  always_partition=always_partition)
    assert mine.window_and_shift_for(*res) == (tuple(block.window_size), tuple(block.shift_size))
    seed = seed_for("timm-direct", res, ws, shift, always_partition)
    with torch.no_grad():
        for i, name in enumerate(["qkv.weight", "qkv.bias", "proj.weight", "proj.bias"]):
            p = mine.get_parameter(name)
            p.copy_(randn(p.shape, dtype=torch.float32, device="cpu", seed=seed + i, scale=p.shape[-1] ** -0.5))
            block.attn.get_parameter(name).copy_(p)
        mine.relative_position_bias_table.copy_(randn(mine.relative_position_bias_table.shape, dtype=torch.float32,
                                                      device="cpu", seed=seed + 4))  # O(1): a wrong entry shows
        rows = _table_rows(tuple(block.window_size), ws)
        block.attn.relative_position_bias_table.copy_(mine.relative_position_bias_table[rows])
    x = randn((2, *res, 20), dtype=torch.float32, device="cpu", seed=seed + 5).requires_grad_()
    dy = randn((2, *res, 20), dtype=torch.float32, device="cpu", seed=seed + 6)
    names = ["x"] + [n for n, _ in mine.named_parameters()]
    assert names[1:] == [n for n, _ in block.attn.named_parameters()]
    expected = block._attn(x)
    g_expected = torch.autograd.grad(expected, [x, *block.attn.parameters()], dy)
    with vitkern.use_backend(backend, op=OP):
        got = mine(x)
        g_got = list(torch.autograd.grad(got, [x, *mine.parameters()], dy))
    t = names.index("relative_position_bias_table")
    outside = torch.ones(g_got[t].shape[0], dtype=torch.bool)
    outside[rows] = False
    # offsets the clamped window does not have get no gradient; the others compare with timm's table gradient
    assert torch.equal(g_got[t][outside], torch.zeros_like(g_got[t][outside]))
    g_got[t] = g_got[t][rows]
    _assert_rel_close(["out"] + names, [got, *g_got], [expected, *g_expected])


def test_attention_maps_path_clamps_like_the_kernel():
    """The eager (attention-maps) path uses the same clamped window, table slice and shift as the fused call."""
    mine = ShiftedWindowAttention(20, 2, head_dim=16, window_size=7, shift_size=3)
    with torch.no_grad():  # O(1) table so a wrong slice shows
        table = mine.relative_position_bias_table
        table.copy_(randn(table.shape, dtype=torch.float32, device="cpu", seed=seed_for("maps-clamp")))
    for res in [(5, 4), (6, 10)]:
        x = randn((2, *res, 20), dtype=torch.float32, device="cpu", seed=seed_for("maps-clamp", res))
        with torch.no_grad():
            fused = mine(x)
            with vitkern.nn.attention_maps(mine) as maps:
                eager = mine(x)
        (window, _), (probs,) = mine.window_and_shift_for(*res), maps[""]
        n_windows = 2 * -(-res[0] // window[0]) * -(-res[1] // window[1])
        assert probs.shape == (n_windows, 2, window[0] * window[1], window[0] * window[1])
        _assert_rel_close(["out"], [eager], [fused])


def test_shifted_module_state_dict_matches_timm_attention():
    timm_attn = _timm_block((8, 8), 4, 2, 2, 16, seed=4).attn
    mine = ShiftedWindowAttention(20, 2, head_dim=16, window_size=4, shift_size=2)
    assert mine.state_dict().keys() == timm_attn.state_dict().keys()
    mine.load_state_dict(timm_attn.state_dict(), strict=True)
    with pytest.raises(ValueError, match="window_size"):
        ShiftedWindowAttention.from_timm(timm_attn, window_size=7)


# ----------------------------------------------------------------------------------------------- errors, dispatch
def _good(**over):
    args = dict(qkv=torch.randn(1, 8, 8, 96), relative_position_bias_table=torch.randn(49, 2), num_heads=2,
                window_size=4, shift_size=2, qkv_bias=None)
    args.update(over)
    return args


@pytest.mark.parametrize("over, error, match", [
    (dict(qkv=torch.randn(8, 8, 96)), ValueError, "qkv must be 4-D"),
    (dict(qkv=torch.zeros(1, 8, 8, 96, dtype=torch.int32)), TypeError, "qkv has dtype torch.int32"),
    (dict(qkv=torch.randn(1, 8, 8, 95)), ValueError, "3 \\* num_heads"),
    (dict(relative_position_bias_table=torch.randn(48, 2)), ValueError, "relative_position_bias_table has shape"),
    (dict(relative_position_bias_table=torch.randn(49, 2, device="meta")), ValueError, "table is on meta"),
    (dict(qkv_bias=torch.randn(95)), ValueError, "qkv_bias has shape"),
    (dict(shift_size=4), ValueError, "shift_size"),
    (dict(window_size=0), ValueError, "window_size must be >= 1"),
    (dict(num_heads=0), ValueError, "num_heads must be a positive int"),
    (dict(mask_value=1.0), ValueError, "mask_value"),
])
def test_bad_input_errors_name_the_argument(over, error, match):
    with pytest.raises(error, match=match):
        window_attention(**_good(**over))


def test_module_rejects_rows_that_are_not_one_window():
    """timm's WindowAttention raises on x whose N is not the window's token count; a plain view would run on 15 of
    16 tokens and be silently wrong."""
    module = vitkern.nn.WindowAttention(32, 2, window_size=4)
    for x in (torch.randn(2, 15, 32), torch.randn(2, 4, 4, 32)):
        with pytest.raises(ValueError, match=r"expected \[B·num_windows, 16, C\]"):
            module(x)


def test_window_too_large_for_kernel_is_explained_and_falls_back():
    qkv, table = torch.randn(1, 17, 17, 48), torch.randn(33 * 33, 1)  # 17 x 17 = 289 tokens > 256
    choice = vitkern.explain(window_attention, qkv, table, 1, 17)
    assert choice.backend_name == "reference" and "289 tokens > 256" in str(choice)
    with vitkern.use_backend("triton", op=OP), pytest.raises(vitkern.BackendError, match="289 tokens"):
        window_attention(qkv, table, 1, 17)
    with vitkern.use_backend("triton", op=OP), pytest.raises(vitkern.BackendError, match="dtype"):
        window_attention(qkv.double(), table.double(), 1, 17)
    with vitkern.use_backend("triton", op=OP, strict=False):
        assert window_attention(qkv, table, 1, 17).shape == (1, 17, 17, 16)


@pytest.mark.interpreter
def test_fp32_windows_past_the_shared_memory_budget_fall_back_with_the_reason():
    """fp32 K/V tiles of a 12x12 window at head dim 128 need 288 KB of shared memory (compiled for sm_90): the
    Triton backend rejects them with the reason; the same window in fp16, or at head dim 64 in fp32, is taken."""
    table = torch.randn(23 * 23, 1)
    with vitkern.use_backend("triton", op=OP, strict=False):
        choice = vitkern.explain(window_attention, torch.randn(1, 12, 12, 3 * 128), table, 1, 12)
        assert choice.backend_name == "reference" and "K/V tiles of 128 KB > 64 KB" in str(choice)
        for qkv in (torch.randn(1, 12, 12, 3 * 128, dtype=torch.float16), torch.randn(1, 12, 12, 3 * 64)):
            assert vitkern.explain(window_attention, qkv, table.to(qkv.dtype), 1, 12).backend_name == "triton"


@pytest.mark.parametrize("kernel, ws, head_dim, warps", [
    ("bwd", 7, 32, {4, 8}),  # 2 warps: 288 live fp32 per thread, spilled 0.4-1.5 KB on sm_90
    ("bwd", 16, 32, {4, 8}),  # 64-key blocks: the same tiles as ws 7
    ("bwd", 16, 128, {8}),
    ("bwd", 16, 256, {8}),  # over the bound at every count: the most warps, not nothing
    ("fwd", 7, 32, {2, 4, 8}),
    ("fwd", 16, 32, {2, 4, 8}),  # 64-key blocks (online softmax): the same tiles as ws 7
    ("fwd", 16, 128, {4, 8}),
])
def test_gpu_configs_are_pruned_by_live_registers(kernel, ws, head_dim, warps):
    """The autotune prune keeps the warp counts whose live fp32 tiles fit MAX_FP32_PER_THREAD (beyond it ptxas
    spilled, see window_attention.py); the first config kept is what VITKERN_AUTOTUNE=0 runs."""
    from vitkern.kernels.triton import window_attention as win_k

    n = ws * ws
    kept = win_k._prune_for(kernel)(win_k._gpu_configs(), {}, BLOCK_M=win_k._block_m(n, False),
                                    BLOCK_N=win_k._block_kv(n, False), BLOCK_D=win_k._block_d(head_dim))
    assert {c.num_warps for c in kept} == warps


def test_cpu_default_is_reference_and_explain_lists_triton():
    choice = vitkern.explain(window_attention, **_good())
    assert choice.backend_name == "reference" and "triton" in str(choice)


def test_reference_backend_fp64_matches_block_oracle():
    """The reference backend (also the fallback) against the reference block, in float64 and bf16."""
    for dtype in (torch.float64, torch.bfloat16):
        block, inputs, seed = make_case(1, (11, 9), 4, 2, 2, 16, dtype, "cpu", seed_key=("ref",))
        fused, path = ShiftedWindowAttention.from_timm_block(block), _BlockAttnPath(block)
        with vitkern.use_backend("reference", op=OP):
            check_forward_backward(lambda x, **kw: torch.func.functional_call(fused, _params(**kw), (x,)),
                                   _block_reference(path), inputs, GRADS, seed=seed)


def test_custom_ops_pass_opcheck():
    inputs, _ = _functional_case(1, (5, 6), (4, 4), (2, 2), 2, 16, torch.float32, "cpu")
    qkv, table, bias = inputs["qkv"], inputs["table"], inputs["qkv_bias"]
    args = (qkv.requires_grad_(), bias.requires_grad_(), table.requires_grad_(), 2, [4, 4], [2, 2], 0.25, -100.0,
            False)
    torch.library.opcheck(torch.ops.vitkern.window_attention_fwd.default, args)
    out, lse = torch.ops.vitkern.window_attention_fwd(qkv.detach(), bias.detach(), table.detach(), *args[3:])
    torch.library.opcheck(torch.ops.vitkern.window_attention_bwd.default,
                          (torch.randn_like(out), qkv.detach(), bias.detach(), table.detach(), out, lse, 2, [4, 4],
                           [2, 2], 0.25, -100.0, False, True, True))


def _layout(t):
    """What a compiled graph checks of a custom op's output against its fake impl (inductor's assert_size_stride):
    size, dtype and the strides of dims longer than 1."""
    return tuple(t.shape), t.dtype, tuple(st for n, st in zip(t.shape, t.stride()) if n > 1)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_custom_op_outputs_have_the_fake_impl_strides(backend):
    """Every output of window_attention_fwd/bwd, on each backend, has the layout its fake impl promises (opcheck
    compares strides on CUDA tensors only, so it passed a transposed table gradient on CPU). heads = 2: with one
    head a transposed [T, 1] gradient has the contiguous strides."""
    for res, bias, dtype in [((5, 6), True, torch.float32), ((8, 8), False, torch.float16)]:  # padded / divisible
        inputs, seed = _functional_case(1, res, (4, 4), (2, 2), 2, 16, dtype, "cpu", bias, seed_key=("strides",))
        fwd_args = (inputs["qkv"], inputs["qkv_bias"], inputs["table"], 2, [4, 4], [2, 2], 0.25, -100.0, False)
        with vitkern.use_backend(backend, op=OP):
            out, lse = torch.ops.vitkern.window_attention_fwd(*fwd_args)
            dout = randn(out.shape, dtype=dtype, device="cpu", seed=seed + 3)
            calls = [(torch.ops.vitkern.window_attention_fwd, fwd_args, (out, lse))]
            for need in (True, False):
                args = (dout, *fwd_args[:3], out, lse, *fwd_args[3:], need, need)
                calls.append((torch.ops.vitkern.window_attention_bwd, args,
                              torch.ops.vitkern.window_attention_bwd(*args)))
        for op, args, real in calls:
            with FakeTensorMode() as mode:
                fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
            assert [_layout(t) for t in real] == [_layout(t) for t in fake], (op, res)


def test_inductor_compiled_backward_matches_eager():
    """The default torch.compile backend (inductor) checks the real output strides of the backward op against its
    fake impl: the table gradient once came back transposed and failed there. The functional alone, reference
    backend (the modules' linears would add ~30 s of C++ compilation on CPU for nothing the op does)."""
    torch._dynamo.reset()
    inputs, seed = _functional_case(1, (3, 5), (2, 2), (1, 1), 2, 8, torch.float32, "cpu", seed_key=("inductor",))
    leaves = [inputs[k].requires_grad_() for k in ("qkv", "table", "qkv_bias")]  # padded + shifted: all three
    dy = randn((1, 3, 5, 16), dtype=torch.float32, device="cpu", seed=seed + 3)

    def f(qkv, table, qkv_bias):
        return window_attention(qkv, table, 2, 2, 1, qkv_bias=qkv_bias)

    with vitkern.use_backend("reference", op=OP):
        eager = f(*leaves)
        g_eager = torch.autograd.grad(eager, leaves, dy)
        out = torch.compile(f, fullgraph=True)(*leaves)
        g_out = torch.autograd.grad(out, leaves, dy)
    # default fp32 tolerances: the op runs the same reference backend inside the graph, inductor only the copies
    torch.testing.assert_close([out, *g_out], [eager, *g_eager])


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_torch_compile_fullgraph_no_graph_breaks(backend):
    torch._dynamo.reset()
    m = ShiftedWindowAttention(20, 2, head_dim=16, window_size=4, shift_size=2)
    x = randn((1, 6, 7, 20), dtype=torch.float32, device="cpu", seed=seed_for("compile")).requires_grad_()
    with vitkern.use_backend(backend, op=OP):
        eager = m(x)
        (gx_eager,) = torch.autograd.grad(eager.sum(), x)
        out = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
        (gx,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(gx, gx_eager)


# ----------------------------------------------------------------------------------------------- GPU
# Swin V1 stage shapes (feature map, heads) at 224 (ws 7) and 384 (ws 12), head_dim 32: T/S heads 3-24, B heads 4-32.
SWIN_STAGES = {
    "swin_t_224": ((56, 3), (28, 6), (14, 12), (7, 24)), "swin_b_224": ((56, 4), (28, 8), (14, 16), (7, 32)),
    "swin_s_384": ((96, 3), (48, 6), (24, 12), (12, 24)), "swin_b_384": ((96, 4), (48, 8), (24, 16), (12, 32)),
}
GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("model", sorted(SWIN_STAGES))
def test_gpu_swin_stage_shapes(model, dtype):
    ws = 12 if model.endswith("384") else 7
    for res, heads in SWIN_STAGES[model]:
        window, _ = ref_swin.clamp_window_and_shift((res, res), (ws, ws), (0, 0))
        for shift in {0, window[0] // 2} if window[0] < res else {0}:
            run_functional_parity(2, (res, res), window, (shift, shift), heads, 32, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("B,res,ws,shift,heads,D", [
    (4, (56, 56), 7, 3, 3, 32), (3, (11, 9), 4, 2, 3, 16), (2, (30, 20), 8, 4, 2, 64), (2, (20, 26), 12, 6, 2, 128),
    (1, (32, 40), 16, 8, 2, 32), (2, (6, 10), 7, 3, 3, 16),
])
def test_gpu_block_parity(B, res, ws, shift, heads, D, dtype):
    run_block_parity(B, res, ws, shift, heads, D, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.timeout(300)  # compiles every autotune config: over the suite's 120 s per test on a cold cache
@pytest.mark.parametrize("dtype, ws", [(torch.bfloat16, 7), (torch.bfloat16, 12), (torch.float32, 7)],
                         ids=["bf16-ws7", "bf16-ws12", "fp32-ws7"])  # fp32: the exact (ieee) dots compile apart
def test_gpu_every_config(dtype, ws):
    """Every warps/stages config the forward and backward autotune over (the register bound prunes 2 warps from the
    backward, and from the forward at ws 12), shifted and padded, not only the one the autotuner picks or
    VITKERN_AUTOTUNE=0 runs."""
    run_every_triton_config(lambda: run_functional_parity(2, (2 * ws + 3, 2 * ws + 1), (ws, ws), (ws // 2, ws // 2), 3,
                                                          32, dtype, "cuda"))


@pytest.mark.interpreter
@pytest.mark.parametrize("B, res, ws, heads, num_sms, dtype", [
    (2, (17, 15), 7, 3, 2, torch.float32), (1, (27, 25), 12, 2, 132, torch.bfloat16)],
    ids=["ws7-6_windows_per_program-fp32", "ws12-64_blocks-bf16"])
def test_interpreter_gpu_geometry(B, res, ws, heads, num_sms, dtype):
    """Shifted and padded, in the interpreter with the GPU path's 64-query / 64-key blocks and its backward grid
    (2 SMs: 6 windows per program; vitkern.testing.gpu_geometry): parity, bounds and races of what
    test_gpu_every_config runs, before a GPU does. The configs differ only in warps / stages, which the interpreter
    does not model, so the first one runs."""
    run_in_gpu_geometry(lambda: run_functional_parity(B, res, (ws, ws), (ws // 2, ws // 2), heads, 32, dtype, "cpu"),
                        num_sms=num_sms, every_config=False)


@pytest.mark.gpu
def test_gpu_memory_is_only_the_outputs():
    """fwd+bwd allocates its outputs (out, lse, dout copy, dqkv) and small partials: no window copies of qkv, no
    score, probability or mask tensors (the eager path's [B·nW, heads, N, N] scores alone are 1.5x out here)."""
    B, res, heads, D = 32, 56, 3, 32
    inputs, _ = _functional_case(B, (res, res), (7, 7), (3, 3), heads, D, torch.bfloat16, "cuda")
    qkv, table = (inputs[k].requires_grad_() for k in ("qkv", "table"))
    window_attention(qkv, table, heads, 7, 3).sum().backward()  # warm up (autotune)
    qkv.grad = table.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    window_attention(qkv, table, heads, 7, 3).sum().backward()
    peak = torch.cuda.max_memory_allocated() - base
    out_bytes = B * res * res * heads * D * 2
    lse_bytes = B * 64 * heads * 49 * 4
    budget = out_bytes * (1 + 1 + 3) + lse_bytes + 16 * 2**20  # out, dout, dqkv, lse; partials and table < 16 MiB
    assert peak <= budget, f"peak {peak / 2**20:.1f} MiB > {budget / 2**20:.1f} MiB"


@pytest.mark.gpu
def test_gpu_backward_bitwise_repeatable():
    inputs, _ = _functional_case(8, (56, 56), (7, 7), (3, 3), 3, 32, torch.bfloat16, "cuda")
    leaves = [t.requires_grad_() for t in inputs.values()]
    dy = torch.randn(8, 56, 56, 96, device="cuda", dtype=torch.bfloat16)
    runs = [torch.autograd.grad(window_attention(inputs["qkv"], inputs["table"], 3, 7, 3,
                                                qkv_bias=inputs["qkv_bias"]), leaves, dy) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.gpu
def test_gpu_default_dispatch_is_triton_and_compiles():
    m = ShiftedWindowAttention(96, 3, window_size=7, shift_size=3, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, 56, 56, 96, device="cuda", dtype=torch.bfloat16)
    qkv = m.qkv(x)
    assert vitkern.explain(window_attention, qkv, m.relative_position_bias_table, 3, 7, 3).backend_name in (
        "triton", "cuda")
    eager = m(x)
    # inductor may pick other GEMM kernels for the two linears: bf16 rounding differences only
    torch.testing.assert_close(torch.compile(m, fullgraph=True)(x), eager, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_fuzz():
    g = torch.Generator().manual_seed(4321)

    def pick(options):
        return options[int(torch.randint(0, len(options), (1,), generator=g))]

    for _ in range(40):
        ws = pick([2, 3, 4, 5, 7, 8, 12, 16])
        res = tuple(int(torch.randint(1, 4 * ws + 3, (1,), generator=g)) for _ in range(2))
        window, shift = ref_swin.clamp_window_and_shift(res, (ws, ws), (ws // 2, ws // 2) if pick([0, 1]) else (0, 0))
        run_functional_parity(pick([1, 2, 5]), res, window, shift, pick([1, 2, 3, 4]), pick([16, 32, 64, 128]),
                              pick(GPU_DTYPES), "cuda", mask_value=pick([-100.0, float("-inf")]),
                              bias=bool(pick([0, 1])))


@pytest.mark.parametrize("res,ws,shift", [((11, 9), 4, 2), ((8, 8), 4, 0)], ids=["shift-pad", "noshift"])
def test_attention_dropout_in_training_runs_timms_math(res, ws, shift):
    """Training with attention dropout (the kernel has none) takes the eager path with dropout on the
    probabilities, as timm does: with the same seed the very same dropout mask, so timm's block._attn (explicit
    softmax path) is matched forward and backward; in eval the fused kernel runs again."""
    block = _timm_block(res, ws, shift, 2, 16, seed=seed_for("attn-drop", res) % 1000)
    block.attn.attn_drop.p, block.attn.fused_attn = 0.3, False  # timm's explicit path: dropout via nn.Dropout
    mine = ShiftedWindowAttention.from_timm(block.attn, block.window_size, block.shift_size)
    block.train(), mine.train()
    x = randn((2, *res, 20), dtype=torch.float32, device="cpu", seed=seed_for("attn-drop-x", res))
    torch.manual_seed(7)
    expected = block._attn(x)
    torch.manual_seed(7)
    got = mine(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, mine.eval()(x), atol=1e-3)  # dropout did act in training
