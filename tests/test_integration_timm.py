"""vitkern.optimize on timm and vitkern.reference ViT / DeiT / Swin models (tiny random-init configs, fp32, CPU).

Each case: outputs and every parameter's gradient vs a float64 copy (numerics rule, see vitkern.testing.models),
the state_dict unchanged (same tensors), restore() exact, and the expected modules swapped. On CPU the ops dispatch
to the reference backend: these tests check the wiring (layouts, parameters, fusion boundaries); the kernels run in
the interpreter in test_optimized_models_run_triton_kernels and in each op family's own tests.
"""

import copy
import functools

import pytest
import timm
import torch

import vitkern
from vitkern import reference
from vitkern.testing import Tolerance, assert_close, seed_for
from vitkern.testing.backends import ran_on, record_choices
from vitkern.testing.models import check_autocast_matches_original, check_optimized_model, logits_of, randomize_

VIT_TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
SWIN_TINY = dict(img_size=(40, 56), patch_size=4, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                 num_classes=10)  # stage maps 10x14 and 5x7: padding at window 4, shifted windows in every stage

TIMM_CASES = {
    "vit": ("vit_tiny_patch16_224", VIT_TINY),
    "vit_qknorm_ls_reg": ("vit_tiny_patch16_224", dict(VIT_TINY, qk_norm=True, init_values=0.1, reg_tokens=2,
                                                       class_token=True, no_embed_class=True)),
    "vit_dynamic_size": ("vit_tiny_patch16_224", dict(VIT_TINY, dynamic_img_size=True)),
    "vit_gap_no_cls": ("vit_tiny_patch16_224", dict(VIT_TINY, class_token=False, global_pool="avg")),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", VIT_TINY),
    # img_size not a multiple of the patch (SigLIP so400m/14 at 384): timm's conv drops the remainder, so must we
    "vit_img_remainder": ("vit_tiny_patch16_224", dict(VIT_TINY, img_size=40)),
    "swin": ("swin_tiny_patch4_window7_224", SWIN_TINY),
}


def _input(model, case, batch=2):
    size = TIMM_CASES[case][1]["img_size"]
    hw = size if isinstance(size, tuple) else (size, size)
    if case == "vit_dynamic_size":
        hw = (40, 24)  # a different grid than the model's 4x4: the position embedding is resampled
    return torch.randn(batch, 3, *hw, generator=torch.Generator().manual_seed(seed_for(case)))


@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_timm_model_optimized_matches_original(case):
    name, kwargs = TIMM_CASES[case]
    model = randomize_(timm.create_model(name, pretrained=False, **kwargs), seed_for(case)).eval()
    report = check_optimized_model(model, [_input(model, case)], vitkern.optimize, vitkern.restore)
    rules = [s.rule for s in report.swapped]
    if case.startswith("swin"):
        assert rules.count("timm.SwinTransformerBlock") == 4 and "timm.PatchEmbed" in rules
    else:
        assert rules.count("timm.Block") == 2 and "timm.VisionTransformer.patch_embed" in rules
    assert not report.left, report.left
    assert not any(isinstance(m, (vitkern.nn.ViTBlock, vitkern.nn.SwinBlock)) for m in model.modules())


@pytest.mark.parametrize("name,kwargs", [("vit_tiny_patch16_224", dict(VIT_TINY, qk_norm=True)),
                                         ("deit_tiny_distilled_patch16_224", VIT_TINY),
                                         ("swin_tiny_patch4_window7_224", SWIN_TINY)])
def test_reference_model_optimized_matches_original(name, kwargs):
    model = randomize_(reference.create_model(name, **kwargs), seed_for(name)).eval()
    size = kwargs["img_size"]
    hw = size if isinstance(size, tuple) else (size, size)
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(seed_for(name, "x")))
    report = check_optimized_model(model, [x], vitkern.optimize, vitkern.restore)
    assert report.count("timm.") >= 3  # blocks and the patch embedding go through the same rules as timm's


def test_family_switches_choose_what_is_fused():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT_TINY).eval()
    report = vitkern.optimize(model, ln_mlp=False, patch_embed=False)
    block = model.blocks[0]
    assert isinstance(block, vitkern.nn.ViTBlock) and not block.fuse_ln_qkv and not block.fuse_mlp
    assert isinstance(block.attn, vitkern.nn.Attention) and isinstance(block.norm2, vitkern.nn.LayerNorm)
    assert block.vitkern_ops == ("attention",)
    assert type(model.patch_embed).__module__.startswith("timm")
    assert "patch_embed" not in {s.path for s in report.swapped}
    vitkern.restore(model)

    report = vitkern.optimize(model, attention=False, ln_mlp=False, patch_embed=False, window_attention=False)
    assert {s.rule for s in report.swapped} == {"torch.nn.LayerNorm"}  # the norms alone, one by one
    assert type(model.blocks[0].attn).__module__.startswith("timm")
    vitkern.restore(model)

    report = vitkern.optimize(model, attention=False)
    block = model.blocks[0]
    assert block.fuse_mlp and not block.fuse_ln_qkv and type(block.attn).__module__.startswith("timm")
    vitkern.restore(model)


def test_bad_options_raise_clear_errors():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT_TINY)
    with pytest.raises(TypeError, match="attention must be True or False"):
        vitkern.optimize(model, attention="yes")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['flash', 'layernorm'\]; the op-family switches are "
                                        "layer_norm, attention, ln_mlp, patch_embed, window_attention"):
        vitkern.optimize(model, flash=True, layernorm=False)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        vitkern.optimize(timm)


def test_blocks_that_cannot_fuse_are_reported_and_their_layers_still_swapped():
    # gated MLP (SwiGLU) cannot become ln_mlp; with attention disabled the block has nothing to fuse
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, mlp_layer=timm.layers.SwiGLU,
                              **VIT_TINY).eval()
    report = vitkern.optimize(model, attention=False)
    reasons = [why for path, rule, why in report.left if rule == "timm.Block"]
    assert len(reasons) == 2 and "fc1 -> act -> fc2" in reasons[0], reasons
    assert isinstance(model.blocks[0].norm1, vitkern.nn.LayerNorm)  # the walk went on into the block
    vitkern.restore(model)
    # with attention on, the block is fused where it can be: attention yes, MLP no
    report = vitkern.optimize(model)
    assert model.blocks[0].vitkern_ops == ("ln_linear", "attention", "linear_residual")
    vitkern.restore(model)


def test_training_noise_runs_unfused_and_matches_timm():
    # drop_path > 0 in training: the fused ln_mlp has no stochastic depth, so the block runs its submodules
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, drop_path_rate=0.5, **VIT_TINY).train()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    expected = model(x)
    vitkern.optimize(model)
    torch.manual_seed(0)
    got = model(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)  # same random masks, fp32 rounding only


def test_proj_dropout_and_a_non_linear_proj_run_the_proj_unfused():
    """attn.proj_drop active in training (MLP dropout off, so the rest stays fused): proj + layer scale + residual
    run as timm does, with the same dropout masks. A proj that is an nn.Linear subclass (LoRA-style) is never folded
    into the fused GEMM: its forward may compute something else."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, init_values=0.1, **VIT_TINY).train()
    for blk in model.blocks:
        blk.attn.proj_drop.p = 0.3
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed_for("proj_drop")))
    torch.manual_seed(0)
    expected = model(x)
    vitkern.optimize(model)
    assert all(b.fuse_ln_qkv and b.fuse_proj and b.fuse_mlp for b in model.blocks)
    torch.manual_seed(0)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)  # same masks, fp32 rounding only
    vitkern.restore(model)

    class ScaledLinear(torch.nn.Linear):  # forward differs from F.linear: must not be fused away
        def forward(self, x):
            return 2 * super().forward(x)

    model.eval()
    for blk in model.blocks:
        old = blk.attn.proj
        blk.attn.proj = ScaledLinear(old.in_features, old.out_features)
        blk.attn.proj.load_state_dict(old.state_dict())
    with torch.no_grad():
        expected = model(x)
        vitkern.optimize(model)
        assert all(b.fuse_ln_qkv and not b.fuse_proj and "linear_residual" not in b.vitkern_ops for b in model.blocks)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_fused_patch_embed_follows_the_vits_parameters():
    """The fused embedding reads the ViT's tokens / pos_embed at call time: a checkpoint loaded with assign=True,
    timm's set_input_size (new grid and patch size: new pos_embed and proj) and a deep copy behave as on timm."""
    model = randomize_(timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, **VIT_TINY),
                       seed_for("assign")).eval()
    eager = copy.deepcopy(model)
    vitkern.optimize(model)
    new_state = {k: v + 0.1 * torch.randn(v.shape, generator=torch.Generator().manual_seed(seed_for("sd", k)))
                 for k, v in eager.state_dict().items()}
    for m in (model, eager):
        m.load_state_dict(new_state, assign=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed_for("assign-x")))
    with torch.no_grad():
        torch.testing.assert_close(logits_of(model(x)), logits_of(eager(x)), atol=2e-5, rtol=1e-5)

    for m in (model, eager):
        m.set_input_size(img_size=48, patch_size=12)  # 4x4 grid of 12x12 patches: proj and pos_embed resampled
    x48 = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(seed_for("resize-x")))
    with torch.no_grad():
        expect = logits_of(eager(x48))
        torch.testing.assert_close(logits_of(model(x48)), expect, atol=2e-5, rtol=1e-5)
        twin = copy.deepcopy(model)
        vitkern.restore(twin)  # the copy restores on its own, to the resized timm modules
        assert "_pos_embed" not in vars(twin) and "_pos_embed" in vars(model)
        assert type(twin.patch_embed).__module__.startswith("timm") and twin.patch_embed.patch_size == (12, 12)
        torch.testing.assert_close(logits_of(twin(x48)), expect, atol=0, rtol=0)
        torch.testing.assert_close(logits_of(model(x48)), expect, atol=2e-5, rtol=1e-5)


def test_set_input_size_on_an_optimized_swin_and_an_injected_patch_embed():
    """timm's set_input_size on an optimized Swin (the swapped PatchEmbed and SwinBlocks run the replaced timm
    modules' own methods and re-derive themselves, so restore finds those resized too) and on a ViT built with
    embed_layer=vitkern.nn.PatchEmbed (vitkern's own: new grid; a new patch size resamples proj as timm does)."""
    swin = randomize_(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **SWIN_TINY), 5).eval()
    eager = copy.deepcopy(swin)
    vitkern.optimize(swin)
    for m in (swin, eager):
        m.set_input_size(img_size=(48, 64), window_size=6)  # new grid and window: bias tables resampled by timm
    assert {b.window_size for b in swin.modules() if isinstance(b, vitkern.nn.SwinBlock)} == {(6, 6)}
    x = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(seed_for("swin-resize")))
    with torch.no_grad():
        expect = logits_of(eager(x))
        torch.testing.assert_close(logits_of(swin(x)), expect, atol=2e-5, rtol=1e-5)
        vitkern.restore(swin)
        assert swin.patch_embed.img_size == (48, 64)
        torch.testing.assert_close(logits_of(swin(x)), expect, atol=0, rtol=0)

    kw = dict(VIT_TINY, pretrained=False)
    fused = timm.create_model("vit_tiny_patch16_224", embed_layer=vitkern.nn.PatchEmbed, **kw).eval()
    plain = timm.create_model("vit_tiny_patch16_224", **kw).eval()
    fused.load_state_dict(randomize_(plain, 6).state_dict())
    for m in (fused, plain):
        m.set_input_size(img_size=48, patch_size=12)
    assert fused.patch_embed.proj.kernel_size == (12, 12) and fused.patch_embed.grid_size == (4, 4)
    x48 = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(seed_for("embed-resize")))
    with torch.no_grad():
        torch.testing.assert_close(logits_of(fused(x48)), logits_of(plain(x48)), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_layer", [None, "vitkern"])
def test_timm_builds_fused_blocks_through_block_fn(norm_layer):
    """timm's layer injection: block_fn=vitkern.nn.ViTBlock (and norm_layer=vitkern.nn.LayerNorm) build a model
    with timm's state_dict keys that computes what the plain timm model computes with the same weights."""
    kw = dict(VIT_TINY, qk_norm=True, init_values=0.1)
    if norm_layer:  # timm's ViT default is LayerNorm(eps=1e-6): a norm_layer must say so too
        kw["norm_layer"] = functools.partial(vitkern.nn.LayerNorm, eps=1e-6)
    fused = timm.create_model("vit_tiny_patch16_224", pretrained=False, block_fn=vitkern.nn.ViTBlock, **kw).eval()
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT_TINY, qk_norm=True,
                              init_values=0.1).eval()
    assert all(type(b) is vitkern.nn.ViTBlock and b.fuse_ln_qkv and b.fuse_mlp for b in fused.blocks)
    assert (type(fused.norm) is vitkern.nn.LayerNorm) == bool(norm_layer)
    assert list(fused.state_dict()) == list(plain.state_dict())
    randomize_(plain, seed_for("block_fn"))
    fused.load_state_dict(plain.state_dict())
    check = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed_for("block_fn", "x")))
    with torch.no_grad():
        ref64 = copy.deepcopy(plain).double()(check.double())
        assert_close("block_fn logits", fused(check), ref64, plain(check), Tolerance(k=2))


@pytest.mark.parametrize("case", ["vit", "swin"])
def test_a_projection_that_is_not_patches_is_left_with_the_reason(case):
    """One check (vitkern.nn.patch_embed.patch_projection_reason) for every patch-embedding swap: a dilated
    projection is not a patch tiling, so the patch embedding is left (the blocks are still swapped)."""
    name, kwargs = TIMM_CASES[case]
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    model.patch_embed.proj.dilation = (2, 2)
    report = vitkern.optimize(model)
    rule = "timm.PatchEmbed" if case == "swin" else "timm.VisionTransformer.patch_embed"
    left = {r: why for _, r, why in report.left}
    assert "is not a non-overlapping patch projection" in left[rule] and "dilation 1" in left[rule]
    assert type(model.patch_embed).__module__.startswith("timm") and report.count("timm.") >= 2


def test_optimize_twice_and_restore_once():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT_TINY).eval()
    x = torch.randn(1, 3, 32, 32)
    before = model(x)
    vitkern.optimize(model, ln_mlp=False, attention=False, patch_embed=False)  # norms only
    vitkern.optimize(model)  # then the blocks, around the already swapped norms
    assert isinstance(model.blocks[0], vitkern.nn.ViTBlock)
    vitkern.restore(model)
    assert not any(type(m).__module__.startswith("vitkern") for m in model.modules())
    torch.testing.assert_close(model(x), before, atol=0, rtol=0)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_optimized_model_compiles_without_graph_breaks(case, dynamic):
    """Every variant traces as one graph, forward and (aot_eager) backward, also with symbolic shapes
    (``dynamic=True``: Swin's float attributes become SymFloats, a dynamic-size ViT's grid symbolic) and after an
    eager call has filled the modules' caches (the resampled position embedding)."""
    name, kwargs = TIMM_CASES[case]
    model = randomize_(timm.create_model(name, pretrained=False, **kwargs), seed_for("compile", case)).eval()
    vitkern.optimize(model)
    x = _input(model, case)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=dynamic)  # a graph break raises
    with torch.no_grad():
        eager = model(x)
        torch.testing.assert_close(compiled(x), eager, atol=1e-5, rtol=1e-5)
    if case in ("vit_qknorm_ls_reg", "swin", "vit_dynamic_size"):  # backward through the custom ops' autograd
        torch._dynamo.reset()
        xs = [x.clone().requires_grad_() for _ in range(2)]
        torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=dynamic)(xs[0]).sum().backward()
        model(xs[1]).sum().backward()
        torch.testing.assert_close(xs[0].grad, xs[1].grad, atol=1e-5, rtol=1e-5)


def test_attention_maps_equal_the_reference_models():
    model = randomize_(reference.create_model("vit_tiny_patch16_224", **VIT_TINY), 7).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, expected = model(x, return_attn=True)
        vitkern.optimize(model)
        with vitkern.nn.attention_maps(model) as maps:
            out = model(x)
        _, via_blocks = model(x, return_attn=True)  # the reference model's own API still works when optimized
    assert list(maps) == ["blocks.0.attn", "blocks.1.attn"]
    for got, want, again in zip((m[0] for m in maps.values()), expected, via_blocks):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(again, want, atol=1e-6, rtol=1e-5)
    assert model.blocks[0].attn._vitkern_attn_maps is None  # recording is off again outside the block
    torch.testing.assert_close(model(x), out, atol=1e-5, rtol=1e-5)


def test_swin_attention_maps_match_timm_window_attention():
    model = randomize_(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **SWIN_TINY), 3).eval()
    x = torch.randn(1, 3, 40, 56)
    captured = []
    # timm computes softmax inside WindowAttention.forward: capture it from F.softmax's input via attn_drop's input
    hooks = [blk.attn.attn_drop.register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
             for blk in model.modules() if isinstance(blk, timm.models.swin_transformer.SwinTransformerBlock)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    vitkern.optimize(model)
    with torch.no_grad(), vitkern.nn.attention_maps(model) as maps:
        model(x)
    got = [m[0] for m in maps.values()]
    assert len(got) == len(captured) == 4
    for g, want in zip(got, captured):
        torch.testing.assert_close(g, want, atol=1e-6, rtol=1e-5)


@pytest.mark.interpreter
@pytest.mark.parametrize("case", ["vit", "swin"])
def test_optimized_models_run_triton_kernels(case):
    """The swapped model end to end on the Triton kernels (interpreter on CPU, fp32), forward and backward."""
    name, kwargs = TIMM_CASES[case]
    kwargs = dict(kwargs, depth=1) if case == "vit" else dict(kwargs, depths=(1, 1))
    model = randomize_(timm.create_model(name, pretrained=False, **kwargs), seed_for(case, "triton")).eval()
    x = torch.randn(1, 3, *((32, 32) if case == "vit" else (40, 56)))
    with record_choices() as chosen, vitkern.use_backend("triton", strict=False):
        check_optimized_model(model, [x], vitkern.optimize, vitkern.restore)
    # strict=False falls back silently where Triton declines: every fused op must have run on it, both directions
    ops = (("ln_linear", "attention", "linear_residual", "ln_mlp", "patch_embed", "layer_norm") if case == "vit" else
           ("ln_linear", "window_attention", "linear_residual", "ln_mlp", "patch_embed", "layer_norm"))
    assert not ran_on(chosen, "triton", ops), (ran_on(chosen, "triton", ops), sorted(chosen))


def test_logits_of_finds_the_output_tensor():
    t = torch.ones(2)
    assert logits_of(t) is t and logits_of((t, 1)) is t
    with pytest.raises(TypeError):
        logits_of(3)


def test_channels_last_input():
    model = randomize_(timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT_TINY), 11).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        vitkern.optimize(model)
        got = model(x.contiguous(memory_format=torch.channels_last))  # NHWC strides into the patch gather
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _is_timm_block(name: str, _module) -> bool:
    return name.rsplit(".", 2)[-2:-1] == ["blocks"]  # blocks.N (ViT) and layers.S.blocks.N (Swin)


def check_autocast_matches_timm(model, x, vit: bool):
    """The earlier all-bf16 policy failed this: its ViT blocks output bf16 where timm's output fp32."""
    check_autocast_matches_original(model, x, vitkern.optimize, _is_timm_block,
                                    stream_dtype=torch.float32 if vit else None)


@pytest.mark.parametrize("case", ["vit_qknorm_ls_reg", "swin"])
def test_autocast_matches_timms_own_autocast(case):
    name, kwargs = TIMM_CASES[case]
    model = randomize_(timm.create_model(name, pretrained=False, **kwargs), seed_for(case, "amp")).eval()
    check_autocast_matches_timm(model, _input(model, case), case.startswith("vit"))


# ---------------------------------------------------------------------------------------------------------- GPU
GPU_MODELS = [("vit_base_patch16_224", 8), ("deit_base_distilled_patch16_224", 8),
              ("swin_tiny_patch4_window7_224", 8), ("vit_large_patch16_384", 2)]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["vit_base_patch16_224", "swin_tiny_patch4_window7_224"])
def test_gpu_autocast_matches_timms_own_autocast(name):
    model = randomize_(timm.create_model(name, pretrained=False), seed_for(name, "gpu-amp")).cuda().eval()
    x = torch.randn(8, 3, 224, 224, device="cuda", generator=torch.Generator("cuda").manual_seed(seed_for(name)))
    check_autocast_matches_timm(model, x, name.startswith("vit"))



@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name,batch", GPU_MODELS)
def test_real_size_models_on_gpu(name, batch, dtype):
    model = timm.create_model(name, pretrained=False)
    model = randomize_(model, seed_for(name), std=0.02).cuda().to(dtype).eval()
    size = model.pretrained_cfg["input_size"][1:]
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed_for(name, "x"))).cuda().to(dtype)
    # whole-network errors compound over 12-24 blocks, and the fused ops round at different points than eager
    # (fp32 LayerNorm statistics inside the GEMM prologue, flash softmax in fp32): k=3 on logits, k=4 on gradients
    report = check_optimized_model(model, [x], vitkern.optimize, vitkern.restore, tol=Tolerance(k=3.0),
                                   grad_tol=Tolerance(k=4.0))
    assert report.count("timm.") >= 3
    assert all(b != "reference" for s in report.swapped for b in s.backends.values()), str(report)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["vit_base_patch16_224", "swin_tiny_patch4_window7_224"])
def test_optimized_model_compiles_and_captures_on_gpu(name):
    from vitkern.testing.compile_graph import check_compile_and_cuda_graph

    model = timm.create_model(name, pretrained=False).cuda().to(torch.bfloat16).eval()
    vitkern.optimize(model)
    x = torch.randn(4, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    # inductor fuses the torch layers around the vitkern ops (proj/head linears, residual adds): bf16 rounding
    # differences of a few ulp at logit magnitude ~1 (bf16 ulp 2^-7 = 0.0078)
    check_compile_and_cuda_graph(model, x, compile_tol=5e-2)


@pytest.mark.parametrize("name, kwargs, reason", [
    ("vit_base_patch16_xp_224", dict(depth=1, img_size=32), "parallel attention + MLP"),
    ("swinv2_tiny_window8_256", dict(depths=(1, 1), num_heads=(2, 4), embed_dim=32, img_size=64), "Swin V2"),
    ("eva02_tiny_patch14_224", dict(depth=1, img_size=28), "rotary position embedding"),
    ("beit_base_patch16_224", dict(depth=1, img_size=32, embed_dim=64, num_heads=2), "relative position bias"),
    ("vit_relpos_small_patch16_224", dict(depth=1, img_size=32), "relative-position ViT block"),
    ("cait_xxs24_224", dict(depth=1, depth_token_only=1, img_size=32), "CaiT"),
    ("xcit_nano_12_p16_224", dict(depth=1, cls_attn_layers=1, img_size=32), "XCiT"),
])
def test_known_unfused_blocks_are_reported_with_the_reason(name, kwargs, reason):
    """A timm family vitkern has no fused block for says so in the report (and the model still matches)."""
    model = randomize_(timm.create_model(name, pretrained=False, **kwargs), seed_for(name)).eval()
    size = kwargs["img_size"]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed_for(name, "x")))
    report = check_optimized_model(model, [x], vitkern.optimize, vitkern.restore)
    left = [why for _, rule, why in report.left if rule == "timm.unfused_block"]
    assert left and all(reason in why for why in left), report.left


@pytest.mark.parametrize("case, nodes", [("vit", ["blocks.1", "norm"]), ("swin", ["layers.1", "norm"])])
def test_timm_fx_feature_extraction_on_optimized_model(case, nodes):
    """timm's FX feature extractor traces vitkern modules as leaves (optimize registers them with timm), so an
    optimized model gives the original's features."""
    from timm.models._features_fx import create_feature_extractor

    name, kwargs = TIMM_CASES[case]
    model = randomize_(timm.create_model(name, pretrained=False, **kwargs), seed_for("fx", case)).eval()
    optimized = copy.deepcopy(model)
    vitkern.optimize(optimized)
    x = _input(model, case)
    with torch.no_grad():
        want = create_feature_extractor(model, nodes)(x)
        got = create_feature_extractor(optimized, nodes)(x)
    for node in nodes:  # fp32, the same math in another summation order (reference backend)
        torch.testing.assert_close(got[node], want[node], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["vit_qknorm_ls_reg", "swin"])
def test_optimized_model_exports_with_a_dynamic_batch(case):
    """torch.export (deployment): the vitkern custom ops appear in the exported graph as ops, the batch stays
    dynamic, and the exported program computes the original model's logits."""
    name, kwargs = TIMM_CASES[case]
    model = randomize_(timm.create_model(name, pretrained=False, **kwargs), seed_for("export", case)).eval()
    optimized = copy.deepcopy(model)
    vitkern.optimize(optimized)
    x = _input(model, case)
    program = torch.export.export(optimized, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch", max=64)}})
    ops = {str(node.target) for node in program.graph.nodes if str(node.target).startswith("vitkern.")}
    assert {"vitkern.ln_linear_fwd.default", "vitkern.ln_mlp_fwd.default", "vitkern.patch_embed_fwd.default"} <= ops
    x3 = _input(model, case, batch=3)  # another batch size than the one traced
    with torch.no_grad():  # fp32, the same math in another summation order (reference backend)
        torch.testing.assert_close(program.module()(x3), model(x3), rtol=1e-4, atol=1e-5)
