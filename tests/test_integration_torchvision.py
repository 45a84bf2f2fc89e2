"""vitkern.optimize on torchvision ViT / Swin V1, a CNN + nn.MultiheadAttention classifier, and
vitkern.nn.MultiheadAttention on its own (fused path and every fallback).

Tolerance: vitkern.testing's rule against a float64 copy of the original model on the same inputs,
err <= k x (the original fp32 model's error) + atol(fp32) x scale. Model outputs k=2 (each fused op is within 2x
of PyTorch; the model adds no error of its own). Parameter/input gradients k=3: every block's backward chains
several fused backwards whose reductions run in another order than autograd's (as in the module-level attention
tests). Where the optimized model runs exactly PyTorch's code (fallbacks) the comparison is bitwise.
"""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.func import functional_call
from torchvision.models import swin_transformer as tv_swin

import vitkern
from vitkern.nn import multihead_attention as mha_module
from vitkern.nn.torchvision_blocks import TorchvisionEncoderBlock, TorchvisionShiftedWindowAttention, \
    TorchvisionSwinBlock
from vitkern.nn.torchvision_embed import TorchvisionSwinPatchEmbed, TorchvisionViTConvProj
from vitkern.reference.cnn_attention import CNNAttentionClassifier
from vitkern.testing import Tolerance, assert_close, check_forward_backward, randn, seed_for
from vitkern.testing.backends import ran_on, record_choices

GRAD_TOL = Tolerance(k=3)  # chained fused backwards (module docstring)


# ----------------------------------------------------------------------------------------------- models
def _randomize(model: nn.Module, tag: str) -> nn.Module:
    """Perturb every parameter (torchvision zero-inits heads and biases: a zero head hides every error)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(randn(p.shape, dtype=p.dtype, device="cpu", seed=seed_for(tag, name), scale=0.05))
    return model


def tv_vit(**kw) -> nn.Module:
    torch.manual_seed(0)
    cfg = dict(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=10)
    return _randomize(torchvision.models.VisionTransformer(**{**cfg, **kw}), "vit").eval()


SWIN_IMG = 40  # 10x10 tokens then 5x5: neither a multiple of the 4x4 window -> every block pads, odd blocks shift


def tv_swin_model(**kw) -> nn.Module:
    torch.manual_seed(0)
    cfg = dict(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=10,
               stochastic_depth_prob=0.0)
    return _randomize(torchvision.models.SwinTransformer(**{**cfg, **kw}), "swin").eval()


def cnn_model(**kw) -> nn.Module:
    torch.manual_seed(0)
    cfg = dict(img_size=16, dim=32, depth=2, num_heads=2, num_classes=10)
    return _randomize(CNNAttentionClassifier(**{**cfg, **kw}), "cnn").eval()


MODELS = {"vit": (tv_vit, 32), "swin": (tv_swin_model, SWIN_IMG), "cnn": (cnn_model, 16)}


def image(name: str, size: int, batch: int = 2) -> torch.Tensor:
    return randn((batch, 3, size, size), dtype=torch.float32, device="cpu", seed=seed_for("img", name, size))


def snapshot(model: nn.Module):
    """state_dict keys in order, and the storage each value lives in (same tensors, not copies)."""
    return [(k, v.data_ptr(), tuple(v.shape), v.dtype) for k, v in model.state_dict().items()]


def outputs_and_grads(model: nn.Module, x: torch.Tensor, upstream: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    out = model(x)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad((out * upstream.to(out.dtype)).sum(), [x, *params.values()])
    return out, dict(zip(["input", *params], grads))


def check_against_original(name, optimized, original, x, tol=Tolerance(), grad_tol=GRAD_TOL):
    """Output and every gradient of ``optimized`` vs a float64 copy of ``original`` (baseline: original fp32)."""
    ref64 = copy.deepcopy(original).double()
    upstream = randn((x.shape[0], 10), dtype=torch.float64, device="cpu", seed=seed_for("upstream", name))
    out, grads = outputs_and_grads(optimized, x, upstream)
    out_b, grads_b = outputs_and_grads(original, x, upstream)
    out_r, grads_r = outputs_and_grads(ref64, x.double(), upstream)
    assert_close(f"{name} logits", out, out_r, out_b, tol)
    assert grads.keys() == grads_r.keys()
    for key in grads:
        assert_close(f"{name} grad {key}", grads[key], grads_r[key], grads_b[key], grad_tol)
    return out


# ----------------------------------------------------------------------------------------------- optimize
VIT_OPTIONS = {
    "all": ({}, {"block": 2, "mha": 0, "embed": 1}),
    "no_ln_mlp": ({"ln_mlp": False}, {"block": 0, "mha": 2, "embed": 1}),  # per-layer rules: MHA + LayerNorms
    "no_attention": ({"attention": False}, {"block": 2, "mha": 0, "embed": 1}),  # blocks fuse the MLP half only
    "no_patch_embed": ({"patch_embed": False}, {"block": 2, "mha": 0, "embed": 0}),
}


@pytest.mark.parametrize("option_set", VIT_OPTIONS)
def test_vit_optimize_matches_original(option_set):
    options, expect = VIT_OPTIONS[option_set]
    model, x = tv_vit(), image("vit", 32)
    original = copy.deepcopy(model)
    before = snapshot(model)
    report = vitkern.optimize(model, **options)

    assert report.count("torchvision.EncoderBlock") == expect["block"]
    assert report.count("torch.nn.MultiheadAttention") == expect["mha"]
    assert report.count("torch.nn.LayerNorm") == (5 if option_set == "no_ln_mlp" else 1)  # encoder.ln + blocks'
    assert report.count("torchvision.VisionTransformer.conv_proj") == expect["embed"]
    assert isinstance(model.conv_proj, TorchvisionViTConvProj) == bool(expect["embed"])
    assert ("forward" in vars(model)) == bool(expect["embed"]) and "forward" not in vars(model.encoder)
    assert snapshot(model) == before
    block = model.encoder.layers[0]
    if expect["block"]:
        assert isinstance(block, TorchvisionEncoderBlock)
        fused = set(block.vitkern_ops)
        attention_on = option_set != "no_attention"
        assert fused == ({"ln_linear", "attention", "linear_residual", "ln_mlp"} if attention_on
                         else {"ln_mlp", "layer_norm"})
        assert block.unfused_parts() == ({} if attention_on else
                                         {"attention": "not swapped (attention=False)",
                                          "ln_1+in_proj": "not swapped (attention=False)",
                                          "out_proj+residual": "not swapped (attention=False)"})
        assert type(block.self_attention) is (vitkern.nn.MultiheadAttention if attention_on
                                              else nn.MultiheadAttention)
    else:
        assert isinstance(block.self_attention, vitkern.nn.MultiheadAttention)
        assert isinstance(block.ln_1, vitkern.nn.LayerNorm)
    text = str(report)
    assert "encoder.layers.encoder_layer_1" in text and "encoder.ln" in text

    check_against_original(f"vit-{option_set}", model, original, x)
    with torch.no_grad():
        eager_before = original(x)
    assert vitkern.restore(model) == len(report.swapped)
    assert not any(type(m).__module__.startswith("vitkern") for m in model.modules())
    assert "forward" not in vars(model) and "forward" not in vars(model.encoder)
    assert snapshot(model) == before
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager_before, atol=0, rtol=0)


def test_vit_fused_embedding_keeps_conv_proj_and_size_check():
    """conv_proj alone is still the Conv2d; a wrong image size fails as torchvision's does; hooks on conv_proj fire;
    a deep copy and a pickled copy of the optimized model run and restore on their own (the undo holds no reference
    to the original; the replaced forwards pickle)."""
    model, x = tv_vit(), image("vit-embed", 32)
    original = copy.deepcopy(model)
    seen = []
    model.conv_proj.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
    vitkern.optimize(model)
    with torch.no_grad():
        torch.testing.assert_close(model.conv_proj(x), original.conv_proj(x), atol=0, rtol=0)
        model(x)
    assert seen == [(2, 64, 4, 4), (2, 64, 4, 4)]  # hooked: the ViT calls conv_proj as torchvision does
    with pytest.raises(Exception, match="Wrong image height! Expected 32 but got 40"):
        model(image("vit-embed", 40))
    twin = copy.deepcopy(model)
    vitkern.restore(twin)
    assert "forward" in vars(model) and "forward" not in vars(twin)
    assert isinstance(model.conv_proj, TorchvisionViTConvProj) and type(twin.conv_proj) is nn.Conv2d
    with torch.no_grad():
        torch.testing.assert_close(twin(x), original(x), atol=0, rtol=0)
    fresh = copy.deepcopy(original)  # no hook: a test's lambda would not pickle
    vitkern.optimize(fresh)
    pickled = pickle.loads(pickle.dumps(fresh))
    assert isinstance(pickled.conv_proj, TorchvisionViTConvProj) and pickled.forward.args[0] is pickled
    with torch.no_grad():
        torch.testing.assert_close(pickled(x), fresh(x), atol=0, rtol=0)
        vitkern.restore(pickled)
        assert "forward" not in vars(pickled) and type(pickled.conv_proj) is nn.Conv2d
        torch.testing.assert_close(pickled(x), original(x), atol=0, rtol=0)


def test_vit_with_conv_stem_or_overridden_forward_is_left_with_a_reason():
    from torchvision.models.vision_transformer import ConvStemConfig, VisionTransformer

    stem = tv_vit(conv_stem_configs=[ConvStemConfig(out_channels=16, kernel_size=3, stride=2)] * 3)
    report = vitkern.optimize(stem)
    assert report.count("torchvision.VisionTransformer.conv_proj") == 0
    assert report.count("torchvision.EncoderBlock") == 2  # the blocks are still swapped

    class MyViT(VisionTransformer):
        def forward(self, x):
            return super().forward(x) * 2

    torch.manual_seed(0)
    mine = MyViT(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=64, mlp_dim=128)
    left = {rule: why for _, rule, why in vitkern.optimize(mine).left}
    assert "MyViT.forward is overridden" in left["torchvision.VisionTransformer.conv_proj"]
    assert type(mine.conv_proj) is nn.Conv2d


SWIN_OPTIONS = {
    "all": ({}, {"block": 4, "window": 0, "stem": 1}),
    "no_ln_mlp": ({"ln_mlp": False}, {"block": 0, "window": 4, "stem": 1}),
    "no_window_attention": ({"window_attention": False}, {"block": 4, "window": 0, "stem": 1}),
    "no_patch_embed": ({"patch_embed": False}, {"block": 4, "window": 0, "stem": 0}),
}


@pytest.mark.parametrize("option_set", SWIN_OPTIONS)
def test_swin_optimize_matches_original_with_padding_and_shift(option_set):
    options, expect = SWIN_OPTIONS[option_set]
    model, x = tv_swin_model(), image("swin", SWIN_IMG)
    original = copy.deepcopy(model)
    before = snapshot(model)
    assert any(k.endswith("attn.relative_position_index") for k, *_ in before)  # torchvision: persistent buffer
    report = vitkern.optimize(model, **options)

    assert report.count("torchvision.SwinTransformerBlock") == expect["block"]
    assert report.count("torchvision.ShiftedWindowAttention") == expect["window"]
    assert report.count("torchvision.SwinTransformer.stem") == expect["stem"]
    assert isinstance(model.features[0], TorchvisionSwinPatchEmbed) == bool(expect["stem"])
    assert snapshot(model) == before  # incl. the persistent relative_position_index buffers, same tensors
    attn = model.features[1][1].attn
    assert isinstance(attn, TorchvisionShiftedWindowAttention) == (option_set != "no_window_attention")

    # every block sees a map that is not a multiple of the window (padding); odd blocks shift
    seen = []
    hooks = [blk.register_forward_pre_hook(lambda m, args: seen.append((m, tuple(args[0].shape[1:3]))))
             for stage in (model.features[1], model.features[3]) for blk in stage]
    check_against_original(f"swin-{option_set}", model, original, x)
    for h in hooks:
        h.remove()
    blocks = [m for m, _ in seen[:4]]
    sizes = [hw for _, hw in seen[:4]]
    assert sizes == [(10, 10), (10, 10), (5, 5), (5, 5)]
    window = blocks[1].attn.window_size
    assert all(h % window[0] and w % window[1] for h, w in sizes)
    shifts = [tuple(blk.attn.shift_size) for blk in blocks]
    assert shifts[1] == shifts[3] == (2, 2) and shifts[0] == shifts[2] == (0, 0)

    with torch.no_grad():
        eager_before = original(x)
    assert vitkern.restore(model) == len(report.swapped)
    assert snapshot(model) == before
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager_before, atol=0, rtol=0)


def test_swin_stem_drops_a_partial_patch_like_the_conv():
    """An image side that is not a multiple of the patch: the Conv2d drops the remainder, so does the fused stem."""
    model = tv_swin_model()
    original = copy.deepcopy(model)
    report = vitkern.optimize(model, ln_mlp=False, window_attention=False, layer_norm=False)
    assert [s.path for s in report.swapped] == ["features.0"]
    check_against_original("swin-stem-42", model, original, image("swin-stem", 42))


def test_cnn_attention_classifier_optimize_matches_original(attention_calls):
    model, x = cnn_model(), image("cnn", 16)
    original = copy.deepcopy(model)
    before = snapshot(model)
    report = vitkern.optimize(model)
    assert report.count("torch.nn.MultiheadAttention") == 2 and report.count("torch.nn.LayerNorm") == 5
    assert all(s.backends for s in report.swapped)
    assert snapshot(model) == before
    check_against_original("cnn", model, original, x)
    assert len(attention_calls) == 2  # both blocks' attention ran fused
    assert vitkern.restore(model) == 7
    assert type(model.blocks[0].attn) is nn.MultiheadAttention and snapshot(model) == before


def test_swapped_parameters_are_the_originals():
    for build, _ in MODELS.values():
        model = build()
        params = {k: p for k, p in model.named_parameters()}
        buffers = {k: b for k, b in model.named_buffers()}
        vitkern.optimize(model)
        assert {k: p for k, p in model.named_parameters()}.keys() == params.keys()
        assert all(p is params[k] for k, p in model.named_parameters())
        assert all(b is buffers[k] for k, b in model.named_buffers())


def test_swin_v2_is_left_with_a_reason():
    torch.manual_seed(0)
    model = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2], num_heads=[2],
                                               window_size=[4, 4], num_classes=10, stochastic_depth_prob=0.0,
                                               block=tv_swin.SwinTransformerBlockV2,
                                               downsample_layer=tv_swin.PatchMergingV2).eval()
    x = image("swin-v2", 32)
    original = copy.deepcopy(model)
    keys = snapshot(model)
    report = vitkern.optimize(model)
    reasons = {(path, rule): why for path, rule, why in report.left}
    assert "Swin V2" in reasons[("features.1.0", "torchvision.SwinTransformerBlock")]
    assert "logit_scale" in reasons[("features.1.0.attn", "torchvision.ShiftedWindowAttention")]
    assert not any(isinstance(m, TorchvisionSwinBlock) for m in model.modules())
    assert report.count("torch.nn.LayerNorm") > 0 and snapshot(model) == keys
    with torch.no_grad():  # only the LayerNorms run vitkern ops
        assert_close("swin v2 logits", model(x), copy.deepcopy(original).double()(x.double()), original(x))


def test_swin3d_blocks_are_left_with_a_reason():
    """Swin3D (video) reuses the 2-D SwinTransformerBlock with a 3-D window attention: not the 2-D kernel's."""
    from torchvision.models.video.swin_transformer import SwinTransformer3d

    torch.manual_seed(0)
    model = _randomize(SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=16, depths=[2], num_heads=[2],
                                         window_size=[2, 4, 4], num_classes=5, stochastic_depth_prob=0.0),
                       "swin3d").eval()
    x = randn((1, 3, 4, 24, 24), dtype=torch.float32, device="cpu", seed=seed_for("swin3d-x"))
    original = copy.deepcopy(model)
    report = vitkern.optimize(model)
    reasons = {(path, rule): why for path, rule, why in report.left}
    assert "ShiftedWindowAttention3d, not a Swin V1 attention" in reasons[("features.0.0",
                                                                         "torchvision.SwinTransformerBlock")]
    assert not any(isinstance(m, TorchvisionSwinBlock) for m in model.modules())
    with torch.no_grad():  # only the LayerNorms run vitkern ops
        assert_close("swin3d logits", model(x), copy.deepcopy(original).double()(x.double()), original(x))


def test_vit_encoder_called_directly_adds_the_position_embedding():
    """The fused embedding adds pos_embedding inside the ViT's forward only; code that calls the encoder itself
    (feature extractors, wrappers) gets torchvision's encoder, position embedding included."""
    model, x = tv_vit(), image("vit-encoder", 32)
    original = copy.deepcopy(model)
    vitkern.optimize(model)

    def tokens(vit):
        return torch.cat([vit.class_token.expand(x.shape[0], -1, -1), vit._process_input(x)], dim=1)

    with torch.no_grad():
        assert_close("encoder(tokens)", model.encoder(tokens(model)),
                     copy.deepcopy(original).double().encoder(tokens(original).double()),
                     original.encoder(tokens(original)))


def test_fx_feature_extraction_with_vitkern_modules_as_leaves():
    """torchvision's create_feature_extractor (torch.fx) on an optimized ViT, vitkern's modules traced as leaves:
    the original's features (the encoder's position embedding included)."""
    from torchvision.models.feature_extraction import create_feature_extractor

    model, x = tv_vit(), image("vit-fx", 32)
    optimized = copy.deepcopy(model)
    vitkern.optimize(optimized)
    nodes = ["encoder.layers.encoder_layer_1", "encoder.ln", "heads"]
    leaves = vitkern.integrations.fx_leaf_modules(optimized)
    assert TorchvisionEncoderBlock in leaves and TorchvisionViTConvProj in leaves
    with torch.no_grad():
        want = create_feature_extractor(model, nodes)(x)
        got = create_feature_extractor(optimized, nodes, tracer_kwargs={"leaf_modules": leaves})(x)
    for node in nodes:  # fp32, the same math in another summation order (reference backend)
        torch.testing.assert_close(got[node], want[node], rtol=1e-4, atol=1e-5)


def test_bad_options_raise_clear_errors():
    model = tv_vit()
    with pytest.raises(TypeError, match="attention must be True or False"):
        vitkern.optimize(model, attention="yes")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \[.flash.\]; the op-family switches are layer_norm"):
        vitkern.optimize(model, flash=True)
    with pytest.raises(TypeError, match="mha must be a torch.nn.MultiheadAttention"):
        vitkern.nn.MultiheadAttention.from_torch(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="not nn.MultiheadAttention"):
        TorchvisionEncoderBlock.from_torchvision(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(TypeError, match="expected a Swin V1"):
        TorchvisionShiftedWindowAttention.from_torchvision(
            tv_swin.ShiftedWindowAttentionV2(32, [4, 4], [0, 0], 2))
    block = model.encoder.layers[0]
    block.mlp[1] = nn.ReLU()  # not torchvision's GELU MLP: the block is left, its layers still swapped
    report = vitkern.optimize(model)
    left = {path: why for path, rule, why in report.left if rule == "torchvision.EncoderBlock"}
    assert "expected [Linear, GELU, Dropout, Linear, Dropout]" in left["encoder.layers.encoder_layer_0"]
    assert isinstance(model.encoder.layers[0].self_attention, vitkern.nn.MultiheadAttention)


# ----------------------------------------------------------------------------------------------- training modes
def test_vit_training_with_dropout_runs_original_math_for_those_parts():
    model = tv_vit(dropout=0.2, attention_dropout=0.2)
    original = copy.deepcopy(model)
    vitkern.optimize(model)
    model.train(), original.train()
    block = model.encoder.layers[0]
    assert set(block.unfused_parts()) == {"attention", "ln_1+in_proj", "out_proj+residual", "ln_2+mlp"}
    assert "dropout" in block.unfused_parts()["attention"]
    x = image("vit-train", 32)
    ref64 = copy.deepcopy(original).double()
    outs = []
    for m, inp in ((model, x), (original, x), (ref64, x.double())):
        torch.manual_seed(1234)  # same dropout masks in all three (CPU masks do not depend on the dtype)
        outs.append(m(inp))
    assert_close("vit train logits", *outs)
    model.eval()
    assert block.unfused_parts() == {}


def test_vit_training_with_block_dropout_keeps_qkv_and_attention_fused():
    """Only the block's dropout (after out_proj) and the MLP's are active: ln_1+in_proj and the attention stay fused,
    out_proj + residual runs as torchvision does (dropout between them), with the same dropout masks."""
    model = tv_vit(dropout=0.2)
    original = copy.deepcopy(model)
    vitkern.optimize(model)
    model.train(), original.train()
    block = model.encoder.layers[0]
    assert block.unfused_parts() == {"out_proj+residual": "dropout in training (p=0.2)",
                                     "ln_2+mlp": "MLP dropout in training (p=0.2)"}
    x = image("vit-train-dropout", 32)
    outs = []
    for m, inp in ((model, x), (original, x), (copy.deepcopy(original).double(), x.double())):
        torch.manual_seed(4321)
        outs.append(m(inp))
    assert_close("vit train logits (block dropout)", *outs)


def test_swin_training_with_stochastic_depth_keeps_attention_fused(monkeypatch):
    model = tv_swin_model(stochastic_depth_prob=0.5)
    original = copy.deepcopy(model)
    vitkern.optimize(model)
    model.train(), original.train()
    blk = model.features[1][1]  # stochastic depth p > 0 (the first block's is 0)
    assert blk.stochastic_depth.p > 0
    assert set(blk.unfused_parts()) == {"proj+residual", "norm2+mlp"}
    assert "stochastic depth" in blk.unfused_parts()["proj+residual"]
    x = image("swin-train", SWIN_IMG)
    ref64 = copy.deepcopy(original).double()
    outs, calls = [], []
    real = tv_swin.shifted_window_attention
    for m, inp in ((model, x), (original, x), (ref64, x.double())):
        torch.manual_seed(99)  # same stochastic-depth draws in all three
        outs.append(m(inp))
        monkeypatch.setattr(tv_swin, "shifted_window_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert len(calls) == 2 * 4  # only the originals ran torchvision's attention; the optimized one's was fused
    assert_close("swin train logits", *outs)


def test_swin_training_with_attention_dropout_runs_torchvision_attention(monkeypatch):
    model = tv_swin_model(attention_dropout=0.3)
    original = copy.deepcopy(model)
    vitkern.optimize(model)
    calls = []
    real = tv_swin.shifted_window_attention
    monkeypatch.setattr(tv_swin, "shifted_window_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    model.train(), original.train()
    x = image("swin-attn-drop", SWIN_IMG)
    outs = []
    for m, inp in ((model, x), (original, x), (copy.deepcopy(original).double(), x.double())):
        torch.manual_seed(7)
        outs.append(m(inp))
    assert len(calls) == 3 * 4  # 4 blocks in each of the optimized model, the original and its float64 copy
    assert_close("swin attn-dropout logits", *outs)


# ----------------------------------------------------------------------------------------------- attention maps
def _probs_via_hooks(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The original ViT / CNN's per-head attention weights: re-run each MHA on the input it received."""
    probs, hooks = [], []

    def grab(mha, args, kwargs):
        probs.append(nn.MultiheadAttention.forward(mha, *args[:3], need_weights=True,
                                                   average_attn_weights=False)[1])

    for m in model.modules():
        if type(m) is nn.MultiheadAttention:
            hooks.append(m.register_forward_pre_hook(grab, with_kwargs=True))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return probs


@pytest.mark.parametrize("name", ["vit", "cnn"])
def test_attention_maps_equal_the_originals_probs(name):
    build, size = MODELS[name]
    model, x = build(), image(f"maps-{name}", size)
    original = copy.deepcopy(model)
    vitkern.optimize(model)
    with torch.no_grad(), vitkern.nn.attention_maps(model) as maps:
        out = model(x)
    assert len(maps) == 2 and all(len(v) == 1 for v in maps.values())
    ref, base = _probs_via_hooks(copy.deepcopy(original).double(), x.double()), _probs_via_hooks(original, x)
    for (path, got), r, b in zip(maps.items(), ref, base):
        assert got[0].shape == (2, 2, r.shape[-1], r.shape[-1])
        assert_close(f"{name} {path} probs", got[0], r, b)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)  # maps off again: fused path


def test_swin_attention_maps_equal_torchvisions_probs(monkeypatch):
    model, x = tv_swin_model(), image("maps-swin", SWIN_IMG)
    original = copy.deepcopy(model)
    vitkern.optimize(model)
    with torch.no_grad(), vitkern.nn.attention_maps(model) as maps:
        model(x)

    def torchvision_probs(m, inp):
        captured = []
        real = F.softmax

        def softmax(t, dim=None, **kw):
            out = real(t, dim=dim, **kw)
            captured.append(out)
            return out

        monkeypatch.setattr(tv_swin.F, "softmax", softmax)
        with torch.no_grad():
            m(inp)
        monkeypatch.setattr(tv_swin.F, "softmax", real)
        return captured

    ref, base = torchvision_probs(copy.deepcopy(original).double(), x.double()), torchvision_probs(original, x)
    assert list(maps) == [f"features.{s}.{b}.attn" for s in (1, 3) for b in (0, 1)]
    for (path, got), r, b in zip(maps.items(), ref, base):
        assert got[0].shape == r.shape  # [B·nW, heads, N, N] on the padded map
        assert_close(f"swin {path} probs", got[0], r, b)


# ----------------------------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("name", list(MODELS))
def test_optimized_model_traces_fullgraph(name):
    build, size = MODELS[name]
    model, x = build(), image(f"compile-{name}", size)
    vitkern.optimize(model)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)  # same ops, same order


# ----------------------------------------------------------------------------------------------- MHA itself
def mha_pair(batch_first=True, bias=True, **kw):
    torch.manual_seed(0)
    m = _randomize(nn.MultiheadAttention(32, 4, bias=bias, batch_first=batch_first, **kw), f"mha{bias}{kw}")
    return m, vitkern.nn.MultiheadAttention.from_torch(m)


@pytest.fixture
def attention_calls(monkeypatch):
    """Counts calls of the fused attention from vitkern.nn.MultiheadAttention."""
    calls = []
    real = mha_module.attention
    monkeypatch.setattr(mha_module, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
def test_mha_fused_path_matches_torch(batch_first, bias, batched, attention_calls):
    torch_mha, mha = mha_pair(batch_first, bias)
    B, N = 3, 7
    shape = ((B, N) if batch_first else (N, B)) if batched else (N,)
    seed = seed_for("mha-fused", batch_first, bias, batched)
    inputs = {"x": randn((*shape, 32), dtype=torch.float32, device="cpu", seed=seed)}
    inputs.update({k: p.detach() for k, p in torch_mha.named_parameters()})

    def run(module):
        return lambda x, **params: functional_call(module, params, (x, x, x), {"need_weights": False})[0]

    assert mha.why_not_fused(inputs["x"], inputs["x"], inputs["x"], need_weights=False) is None
    check_forward_backward(run(mha), run(torch_mha), inputs, list(inputs), seed=seed, grad_tol=GRAD_TOL)
    assert attention_calls  # the fused op ran
    out = mha(inputs["x"], inputs["x"], inputs["x"], need_weights=False)
    assert out[1] is None and out[0].shape == inputs["x"].shape
    assert mha.explain(inputs["x"], need_weights=False).startswith("fused: vitkern.attention")


def _mask_kwargs(x, batch_first):
    B, N = (x.shape[0], x.shape[1]) if batch_first else (x.shape[1], x.shape[0])
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[:, -2:] = True
    causal = torch.triu(torch.full((N, N), float("-inf")), 1)
    return {"key_padding_mask": dict(key_padding_mask=pad, need_weights=False),
            "attn_mask": dict(attn_mask=causal, need_weights=False),
            "is_causal": dict(attn_mask=causal, is_causal=True, need_weights=False)}


FALLBACKS = {  # case -> (constructor kwargs, call kind, expected reason)
    "cross_attention": ({}, "cross", "not self-attention"),
    "key_padding_mask": ({}, "key_padding_mask", "key_padding_mask is given"),
    "attn_mask": ({}, "attn_mask", "attn_mask is given"),
    "is_causal": ({}, "is_causal", "attn_mask is given"),
    "need_weights": ({}, "weights", "need_weights=True"),
    "need_weights_per_head": ({}, "weights_per_head", "need_weights=True"),
    "train_dropout": ({"dropout": 0.25}, "train", "attention dropout in training"),
    "add_bias_kv": ({"add_bias_kv": True}, "plain", "add_bias_kv=True"),
    "add_zero_attn": ({"add_zero_attn": True}, "plain", "add_zero_attn=True"),
    "kdim_vdim": ({"kdim": 16, "vdim": 24}, "kv_dims", "kdim/vdim (16/24) differ"),
}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("case", FALLBACKS)
def test_mha_fallbacks_run_torch_exactly(case, batch_first, attention_calls):
    ctor, kind, reason = FALLBACKS[case]
    torch_mha, mha = mha_pair(batch_first, **ctor)
    shape = (3, 7) if batch_first else (7, 3)
    x = randn((*shape, 32), dtype=torch.float32, device="cpu", seed=seed_for("mha-fb", case, batch_first))
    key = value = x
    kwargs = {"need_weights": False}
    if kind == "cross":
        key = value = randn((*shape[:-1], 5, 32) if batch_first else (5, shape[1], 32), dtype=torch.float32,
                            device="cpu", seed=1)
    elif kind in ("key_padding_mask", "attn_mask", "is_causal"):
        kwargs = _mask_kwargs(x, batch_first)[kind]
    elif kind == "weights":
        kwargs = {}
    elif kind == "weights_per_head":
        kwargs = {"average_attn_weights": False}
    elif kind == "kv_dims":
        key = randn((*shape, 16), dtype=torch.float32, device="cpu", seed=2)
        value = randn((*shape, 24), dtype=torch.float32, device="cpu", seed=3)
    if kind == "train":
        torch_mha.train(), mha.train()
    assert reason in mha.why_not_fused(x, key, value, **kwargs)
    assert mha.explain(x, key, value, **kwargs).startswith("not fused")
    results = []
    for m in (mha, torch_mha):
        torch.manual_seed(5)
        xg = x.clone().requires_grad_()
        k_, v_ = (xg, xg) if key is x else (key, value)
        out, weights = m(xg, k_, v_, **kwargs)
        grads = torch.autograd.grad(out.sum(), [xg, *m.parameters()])
        results.append((out, weights, grads))
    (o1, w1, g1), (o2, w2, g2) = results
    torch.testing.assert_close(o1, o2, atol=0, rtol=0)
    assert (w1 is None) == (w2 is None) == (kwargs.get("need_weights", True) is False)
    if w1 is not None:
        torch.testing.assert_close(w1, w2, atol=0, rtol=0)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not attention_calls


def test_mha_is_causal_without_mask_raises_like_torch():
    torch_mha, mha = mha_pair()
    x = torch.randn(2, 5, 32)
    with pytest.raises(RuntimeError) as theirs:
        torch_mha(x, x, x, is_causal=True, need_weights=False)
    with pytest.raises(RuntimeError) as ours:
        mha(x, x, x, is_causal=True, need_weights=False)
    assert str(ours.value) == str(theirs.value)
    assert mha.why_not_fused(x, x, x, is_causal=True, need_weights=False).startswith("is_causal=True")


def test_mha_training_without_dropout_is_fused(attention_calls):
    torch_mha, mha = mha_pair()
    mha.train()
    x = torch.randn(2, 5, 32)
    assert mha.why_not_fused(x, x, x, need_weights=False) is None
    mha(x, x, x, need_weights=False)
    assert attention_calls


@pytest.mark.parametrize("ctor", [{}, {"bias": False}, {"kdim": 16, "vdim": 24}, {"add_bias_kv": True}],
                         ids=["default", "no_bias", "kdim_vdim", "bias_kv"])
def test_mha_from_torch_shares_parameters_and_state_dict(ctor):
    torch_mha, mha = mha_pair(**ctor)
    assert isinstance(mha, nn.MultiheadAttention)
    assert list(mha.state_dict()) == list(torch_mha.state_dict())
    assert all(a is b for a, b in zip(mha.parameters(), torch_mha.parameters()))
    assert mha.out_proj is torch_mha.out_proj
    fresh = vitkern.nn.MultiheadAttention(32, 4, **ctor)  # the constructor is torch's
    fresh.load_state_dict(torch_mha.state_dict())
    assert list(fresh.state_dict()) == list(torch_mha.state_dict())


def test_mha_attention_maps_on_fused_and_fallback_calls():
    torch_mha, mha = mha_pair()
    x = torch.randn(2, 6, 32)
    mask = torch.triu(torch.full((6, 6), float("-inf")), 1)
    with torch.no_grad(), vitkern.nn.attention_maps(mha) as maps:
        out, w = mha(x, x, x, need_weights=False)
        out_m, w_m = mha(x, x, x, attn_mask=mask)  # fallback, averaged weights requested
    with torch.no_grad():
        ref = torch_mha(x, x, x, average_attn_weights=False)[1]
        ref_out_m, ref_w_m = torch_mha(x, x, x, attn_mask=mask)
        ref_masked = torch_mha(x, x, x, attn_mask=mask, average_attn_weights=False)[1]
    assert w is None and len(maps[""]) == 2
    torch.testing.assert_close(maps[""][0], ref, atol=1e-6, rtol=1e-5)  # same formula, fp32 rounding
    torch.testing.assert_close(maps[""][1], ref_masked, atol=0, rtol=0)  # torch's own path
    torch.testing.assert_close(w_m, ref_w_m, atol=0, rtol=0)
    torch.testing.assert_close(out_m, ref_out_m, atol=0, rtol=0)


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_traces_fullgraph_forward_and_backward(batch_first):
    _, mha = mha_pair(batch_first)
    x = torch.randn(2, 5, 32, requires_grad=True)
    torch._dynamo.reset()
    eager = mha(x, x, x, need_weights=False)[0]
    (g_eager,) = torch.autograd.grad(eager.sum(), x)
    compiled = torch.compile(lambda t: mha(t, t, t, need_weights=False)[0], fullgraph=True, backend="aot_eager")
    out = compiled(x)
    (g,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(g, g_eager)


def test_generic_mha_rule_in_transformer_encoder_layer():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer)
    report = vitkern.optimize(model, layer_norm=False)
    assert [s.path for s in report.swapped] == ["0.self_attn"]
    assert isinstance(layer.self_attn, vitkern.nn.MultiheadAttention)


# ----------------------------------------------------------------------------------------------- Triton kernels
TRITON_MODELS = {  # tiny configs: the interpreter runs every program instance in Python
    "vit": (lambda: tv_vit(image_size=16, num_layers=1, hidden_dim=32, mlp_dim=64), 16,
            ("ln_linear", "attention", "ln_mlp", "layer_norm", "patch_embed")),
    "swin": (lambda: tv_swin_model(embed_dim=16, depths=[2], num_heads=[2]), 24,  # 6x6 tokens: padded + shifted
             ("ln_linear", "window_attention", "ln_mlp", "layer_norm", "patch_embed")),
    "cnn": (lambda: cnn_model(depth=1), 16, ("attention", "layer_norm")),
}


@pytest.mark.interpreter
@pytest.mark.parametrize("name", TRITON_MODELS)
def test_tiny_optimized_model_on_triton_kernels(name):
    """The Triton kernels themselves (interpreter, fp32), forward and backward, end to end through the model."""
    build, size, ops = TRITON_MODELS[name]
    model = build()
    original = copy.deepcopy(model)
    vitkern.optimize(model)
    with record_choices() as chosen, vitkern.use_backend("triton", strict=False):
        check_against_original(f"{name}-triton", model, original, image(f"{name}-triton", size, batch=1))
    assert not ran_on(chosen, "triton", ops), (ran_on(chosen, "triton", ops), sorted(chosen))


# ---------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["vit_b_16", "swin_t"])
def test_real_size_torchvision_models_on_gpu(name, dtype):
    from vitkern.testing.models import check_optimized_model, randomize_

    model = getattr(torchvision.models, name)(weights=None)
    model = randomize_(model, seed_for(name), std=0.02).cuda().to(dtype).eval()
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(seed_for(name, "x"))).cuda().to(dtype)
    # whole-network errors compound over 12 blocks and the fused ops round at other points than eager: k=3 / k=4
    report = check_optimized_model(model, [x], vitkern.optimize, vitkern.restore, tol=Tolerance(k=3.0),
                                   grad_tol=Tolerance(k=4.0))
    assert report.count("torchvision.") >= 12


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_autocast_matches_torchvisions_own_autocast(name):
    """An optimized fp32 torchvision model under bf16 autocast computes what torchvision computes under autocast:
    bf16 GEMMs and attention, each block's output (the residual stream) in torchvision's dtype (fp32 for the ViT:
    its class token and pos embedding are fp32), error within 2x of torchvision's own autocast error vs float64."""
    from vitkern.testing.models import check_autocast_matches_original

    build, size = MODELS[name]

    def is_block(block_name, module):  # encoder.layers.encoder_layer_N (ViT), features.S.N (Swin)
        return isinstance(module, (torchvision.models.vision_transformer.EncoderBlock, tv_swin.SwinTransformerBlock))

    check_autocast_matches_original(build(), image(name, size), vitkern.optimize, is_block,
                                    stream_dtype=torch.float32 if name == "vit" else None)
