"""The reference models against timm: same state_dict keys (strict loading both ways), same outputs and gradients,
and the Swin window helpers against timm's own.

Tolerance: both sides run the same fp32 math; they differ only in operation order (timm's ViT uses
F.scaled_dot_product_attention, and summation orders inside fused CPU kernels differ), i.e. a few ulps per op
that accumulate through the blocks. fp32 ulp is ~1.2e-7, so we allow 1e-5 of the largest |expected| value
(observed: <= 4e-7 for ViT/DeiT, bit-exact for Swin). A wrong layout, mask or padding order is off by 1e-2 or
more; a wrong LayerNorm eps moves O(1) activations by only ~5e-6, so eps values are compared directly.
"""
from typing import Any, Dict, Tuple

import pytest
import torch
import torch.nn as nn

timm = pytest.importorskip('timm')
from timm.models import swin_transformer as timm_swin  # noqa: E402

import vitkern.reference as ref  # noqa: E402

REL_TOL = 1e-5  # of max |expected|; see the module docstring


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rel_tol: float = REL_TOL) -> float:
    assert actual.shape == expected.shape, f'{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}'
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert scale > 0, f'{what}: expected output is all zeros, the comparison would be vacuous'
    assert err <= rel_tol * scale, f'{what}: max abs error {err:.3g} > {rel_tol:g} * max|expected| ({scale:.3g})'
    return err / scale


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Fresh random values for every parameter, including those initialised to zero / one / a constant
    (position embeddings, tokens, bias tables, layer-scale gammas, norms, biases), sized so activations stay O(1)
    and every term matters."""
    gen = torch.Generator().manual_seed(seed)

    def randn(p: torch.Tensor) -> torch.Tensor:
        return torch.randn(p.shape, generator=gen)

    for name, p in model.named_parameters():
        leaf = name.rsplit('.', 1)[-1]
        if leaf == 'relative_position_bias_table':
            p.copy_(randn(p))  # O(1) logits offsets, so a wrong index would show
        elif leaf in ('pos_embed', 'cls_token', 'reg_token', 'dist_token'):
            p.copy_(0.5 * randn(p))
        elif leaf == 'gamma':
            p.copy_(0.5 + torch.rand(p.shape, generator=gen))
        elif p.ndim >= 2:  # Linear / Conv weights: fan-in scaling
            p.copy_(randn(p) * p[0].numel() ** -0.5)
        elif leaf == 'weight':  # LayerNorm scales
            p.copy_(1 + 0.2 * randn(p))
        else:  # biases
            p.copy_(0.2 * randn(p))
    return model


def layer_norm_eps(model: nn.Module) -> Dict[str, float]:
    return {name: m.eps for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)}


def random_input(seed: int, batch: int, img_size: Any, in_chans: int = 3) -> torch.Tensor:
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    return torch.randn(batch, in_chans, h, w, generator=torch.Generator().manual_seed(seed))


def build_pair(name: str, overrides: Dict[str, Any], seed: int, source: str) -> Tuple[nn.Module, nn.Module]:
    """(timm model, reference model) with the same random weights, randomised on `source` and loaded strictly
    into the other."""
    timm_model = timm.create_model(name, pretrained=False, **overrides)
    ref_model = ref.create_model(name, **overrides)
    src, dst = (timm_model, ref_model) if source == 'timm' else (ref_model, timm_model)
    randomize_(src, seed)
    dst.load_state_dict(src.state_dict(), strict=True)
    return timm_model.eval(), ref_model.eval()


TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
TINY_SWIN = dict(embed_dim=32, depths=(2, 2), num_heads=(2, 4))

# name -> (timm name, overrides, input size)
CASES: Dict[str, Tuple[str, Dict[str, Any], Any]] = {
    'vit': ('vit_tiny_patch16_224', TINY_VIT, 32),
    'vit_reg_noembed_ls_qknorm_avg': ('vit_small_patch16_224', dict(
        TINY_VIT, reg_tokens=4, no_embed_class=True, init_values=1e-5, qk_norm=True, global_pool='avg'), 32),
    'vit_noclass_headless_nonsquare': ('vit_base_patch16_224', dict(
        TINY_VIT, img_size=(32, 48), class_token=False, reg_tokens=2, global_pool='avg', num_classes=0,
        qkv_bias=False, mlp_ratio=2.), (32, 48)),
    'vit_huge_headdim80': ('vit_huge_patch14_224', dict(img_size=28, embed_dim=160, depth=1, num_heads=2), 28),
    'deit3': ('deit3_small_patch16_224', TINY_VIT, 32),
    'deit_distilled': ('deit_tiny_distilled_patch16_224', TINY_VIT, 32),
    # grid (11, 9): stage 0 pads 11x9 -> 12x12, stage 1 is 6x5 (odd-size merge) -> 8x8, every stage shifted
    'swin_pad_shift_nonsquare': ('swin_tiny_patch4_window7_224', dict(
        TINY_SWIN, img_size=(44, 36), window_size=4), (44, 36)),
    # stage 0: 14x14 with window 7 (shifted); stage 1: 7x7 is covered by one window -> no shift
    'swin_window7_clamped': ('swin_small_patch4_window7_224', dict(
        TINY_SWIN, img_size=56, embed_dim=48, num_heads=(3, 6), head_dim=8), 56),
    # non-square window (4, 6) on a 12x5 grid: height padded+shifted, width clamped to 5 and unshifted
    'swin_nonsquare_window_axis_clamp': ('swin_base_patch4_window7_224', dict(
        TINY_SWIN, img_size=(48, 20), window_size=(4, 6)), (48, 20)),
    # always_partition keeps window 7 / shift 3 on 8x8 and 4x4 maps: mostly padding; no pooling
    'swin_always_partition_nopool': ('swin_tiny_patch4_window7_224', dict(
        TINY_SWIN, img_size=32, always_partition=True, global_pool='', num_classes=5), 32),
    # built for 56, run at 40x52: the shifted-window mask is rebuilt per forward for the padded map
    'swin_dynamic_size': ('swin_tiny_patch4_window7_224', dict(
        TINY_SWIN, img_size=56, window_size=4, strict_img_size=False), (40, 52)),
}


@pytest.mark.parametrize('source', ['timm', 'reference'])
@pytest.mark.parametrize('case', list(CASES))
def test_matches_timm(case: str, source: str) -> None:
    name, overrides, input_size = CASES[case]
    seed = sum(map(ord, case + source))  # fixed per case and direction
    timm_model, ref_model = build_pair(name, overrides, seed, source)
    for buf_name, buf in timm_model.named_buffers():  # non-persistent buffers are rebuilt, not loaded
        assert torch.equal(dict(ref_model.named_buffers())[buf_name], buf), buf_name
    assert layer_norm_eps(ref_model) == layer_norm_eps(timm_model)
    x = random_input(seed + 1, 2, input_size)
    with torch.no_grad():
        assert_close(ref_model.forward_features(x), timm_model.forward_features(x), f'{case} features')
        assert_close(ref_model(x), timm_model(x), f'{case} output')


@pytest.mark.parametrize('case', ['vit_reg_noembed_ls_qknorm_avg', 'swin_pad_shift_nonsquare'])
def test_gradients_match_timm(case: str) -> None:
    name, overrides, input_size = CASES[case]
    timm_model, ref_model = build_pair(name, overrides, seed=7, source='timm')
    x = random_input(8, 2, input_size)
    grads = {}
    for label, model in (('timm', timm_model), ('ref', ref_model)):
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))  # non-uniform upstream grad
        (out * weights).sum().backward()
        grads[label] = {'input': xi.grad, **{n: p.grad for n, p in model.named_parameters()}}
    assert grads['timm'].keys() == grads['ref'].keys()
    for key, expected in grads['timm'].items():
        if key.endswith('k_norm.bias'):
            # exactly zero in exact arithmetic: a bias on every key adds the same q.b to a whole row of logits,
            # and softmax ignores that; both sides hold rounding noise, so only check it is negligible
            noise_floor = REL_TOL * grads['timm']['input'].abs().max()
            assert grads['ref'][key].abs().max() <= noise_floor and expected.abs().max() <= noise_floor, key
            continue
        assert_close(grads['ref'][key], expected, f'{case} grad {key}')


def test_distilled_training_outputs_match_timm() -> None:
    name, overrides, input_size = CASES['deit_distilled']
    timm_model, ref_model = build_pair(name, overrides, seed=11, source='timm')
    x = random_input(12, 2, input_size)
    with torch.no_grad():
        for model in (timm_model, ref_model):
            model.train()
            model.set_distilled_training(True)
        (ref_cls, ref_dist), (timm_cls, timm_dist) = ref_model(x), timm_model(x)
        assert_close(ref_cls, timm_cls, 'distilled class head')
        assert_close(ref_dist, timm_dist, 'distilled dist head')
        for model in (timm_model, ref_model):  # training without distillation: the average again
            model.set_distilled_training(False)
        assert_close(ref_model(x), timm_model(x), 'non-distilled training output')
        assert_close(ref_model(x), (ref_cls + ref_dist) / 2, 'average of the two heads')


def test_vit_returns_attention_probabilities() -> None:
    model = randomize_(ref.create_model('vit_tiny_patch16_224', **TINY_VIT), seed=13).eval()
    x = random_input(14, 2, 32)
    with torch.no_grad():
        out, maps = model(x, return_attn=True)
        assert torch.equal(out, model(x))
    tokens = 1 + (32 // 8) ** 2
    assert len(maps) == TINY_VIT['depth']
    for probs in maps:
        assert probs.shape == (2, TINY_VIT['num_heads'], tokens, tokens)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, TINY_VIT['num_heads'], tokens))


# --- Swin window helpers against timm's ------------------------------------------------------------------------

@pytest.mark.parametrize('window', [(4, 4), (4, 5), (3, 2)])
def test_window_partition_roundtrip(window: Tuple[int, int]) -> None:
    x = torch.randn(2, 12, 20, 3, generator=torch.Generator().manual_seed(15))
    windows = ref.window_partition(x, window)
    assert windows.shape == (2 * (12 // window[0]) * (20 // window[1]), *window, 3)
    assert torch.equal(windows, timm_swin.window_partition(x, window))
    assert torch.equal(ref.window_reverse(windows, window, 12, 20), x)


@pytest.mark.parametrize('window', [7, 12, (4, 6), (1, 3), (5, 1)])
def test_relative_position_index_matches_timm(window: Any) -> None:
    wh, ww = (window, window) if isinstance(window, int) else window
    assert torch.equal(ref.relative_position_index(window), timm_swin.get_relative_position_index(wh, ww))


# (feature resolution, window, shift): multiple of the window, padded, non-square, one axis clamped by timm
MASK_CASES = [((8, 8), 4, 2), ((14, 14), 7, 3), ((11, 9), 4, 2), ((6, 5), (4, 2), (2, 1)), ((12, 5), (4, 6), (2, 3))]


@pytest.mark.parametrize('resolution,window,shift', MASK_CASES)
def test_shifted_window_mask_matches_timm_buffer(resolution, window, shift) -> None:
    block = timm_swin.SwinTransformerBlock(dim=8, input_resolution=resolution, num_heads=2, window_size=window,
                                           shift_size=shift)
    mask = ref.shifted_window_mask(*resolution, block.window_size, block.shift_size)
    if any(block.shift_size):
        assert torch.equal(mask, block.attn_mask)
        assert {v.item() for v in mask.unique()} == {0.0, -100.0}
    else:  # timm clamped the window to the map: no shift, no mask
        assert block.attn_mask is None and not mask.any()
    # timm's dynamic path builds the mask from the padded map; same result
    Hp = -(-resolution[0] // block.window_size[0]) * block.window_size[0]
    Wp = -(-resolution[1] // block.window_size[1]) * block.window_size[1]
    dynamic = block.get_attn_mask(torch.zeros(1, Hp, Wp, 8))
    if dynamic is not None:
        assert torch.equal(mask, dynamic)


def test_window_attention_matches_timm() -> None:
    resolution, window, dim, heads, batch = (8, 12), (4, 4), 16, 2, 3
    block = timm_swin.SwinTransformerBlock(dim, resolution, heads, window_size=window, shift_size=2)
    timm_attn = randomize_(block.attn, seed=16).eval()
    ref_attn = ref.WindowAttention(dim, heads, window)
    ref_attn.load_state_dict(timm_attn.state_dict(), strict=True)
    num_windows = (8 // 4) * (12 // 4)
    x = torch.randn(batch * num_windows, 16, dim, generator=torch.Generator().manual_seed(17))
    with torch.no_grad():
        for mask in (None, block.attn_mask):
            expected = timm_attn(x, mask=mask)
            assert_close(ref_attn(x, mask=mask), expected, f'WindowAttention mask={mask is not None}')
            # the functional oracle on q, k, v gives the same
            q, k, v = ref.split_heads_qkv(ref_attn.qkv(x), heads)
            bias = ref.relative_position_bias(ref_attn.relative_position_bias_table, ref_attn.relative_position_index)
            out = ref.window_attention_reference(q, k, v, bias, mask)
            assert_close(ref_attn.proj(ref.merge_heads(out)), expected, 'window_attention_reference')


# --- registry ----------------------------------------------------------------------------------------------------

REQUIRED_NAMES = [
    'vit_tiny_patch16_224', 'vit_small_patch16_224', 'vit_base_patch16_224', 'vit_large_patch16_224',
    'vit_large_patch16_384', 'vit_huge_patch14_224', 'deit_tiny_distilled_patch16_224',
    'deit_small_distilled_patch16_224', 'deit_base_distilled_patch16_224', 'swin_tiny_patch4_window7_224',
    'swin_small_patch4_window7_224', 'swin_base_patch4_window7_224', 'swin_base_patch4_window12_384',
]


def test_registry_names_and_errors() -> None:
    assert set(REQUIRED_NAMES) <= set(ref.list_models())
    assert ref.list_models('swin_*') == sorted(n for n in ref.list_models() if n.startswith('swin_'))
    with pytest.raises(ValueError, match='unknown model'):
        ref.create_model('vit_nonexistent')
    with pytest.raises(ValueError, match='no pretrained weights'):
        ref.create_model('vit_tiny_patch16_224', pretrained=True)


def test_full_size_configs_match_timm_keys_and_shapes() -> None:
    """Every registered full-size model, built on the meta device (no memory), has timm's exact parameter and
    buffer names and shapes, and the same non-persistent buffers."""
    for name in ref.list_models():
        with torch.device('meta'):
            ours, theirs = ref.create_model(name), timm.create_model(name, pretrained=False)
        shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
        assert shapes(ours) == shapes(theirs), name
        assert {k for k, _ in ours.named_buffers()} == {k for k, _ in theirs.named_buffers()}, name
    with torch.device('meta'):
        huge = ref.create_model('vit_huge_patch14_224')
    assert huge.blocks[0].attn.head_dim == 80 and huge.blocks[0].attn.num_heads == 16


def test_block_with_window_clamped_on_one_axis_only():
    """Resolution (6, 10), window 7: clamped to (6, 7) on one axis, so window_partition returns a non-contiguous
    view; the block must still run (regression: it used .view on it) and match timm."""
    from timm.models.swin_transformer import SwinTransformerBlock as TimmBlock

    from vitkern.reference.swin import SwinTransformerBlock

    torch.manual_seed(0)
    timm_block = TimmBlock(dim=16, input_resolution=(6, 10), num_heads=2, window_size=7, shift_size=3).eval()
    ours = SwinTransformerBlock(16, (6, 10), 2, window_size=7, shift_size=3).eval()
    ours.load_state_dict(timm_block.state_dict(), strict=True)
    x = torch.randn(1, 6, 10, 16)  # batch 1: the permuted windows stay a (non-contiguous) view
    with torch.no_grad():
        torch.testing.assert_close(ours(x), timm_block(x), atol=1e-5, rtol=1e-5)
