"""vitkern.optimize on HF transformers ViT / DeiT (with teacher) / Dinov2 / Swin, and attn_implementation="vitkern".

Tiny random-init configs, fp32, compared with a float64 copy of the original through vitkern.testing.assert_close
(the PyTorch-relative rule: the optimized model may be off the float64 truth by at most 2x what the original HF
model in fp32 is, plus 1e-6 x magnitude).
"""

import copy
import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    Dinov2Config,
    Dinov2Model,
    SwinBackbone,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

import vitkern  # noqa: E402
from vitkern.integrations.hf_models import register_hf_attention  # noqa: E402
from vitkern.nn import hf_blocks  # noqa: E402
from vitkern.testing import Tolerance, assert_close, randn, seed_for  # noqa: E402
from vitkern.testing.backends import ran_on, record_choices  # noqa: E402

VIT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32,
           patch_size=8)
# Swin: a 9x8 patch grid with window 4: stage 1 pads 9 -> 12 and its second block shifts by 2 (padding != shift,
# so HF's pad-then-roll differs from timm's roll-then-pad); stage 2 (5x4) has min(H, W) == window, so HF clamps the
# shift to 0 there, and pads 5 -> 8
SWIN = dict(image_size=(36, 32), patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4)


def _vit(**kw):
    return ViTForImageClassification(ViTConfig(**{**VIT, **kw}, num_labels=5))


def _deit(**kw):
    return DeiTForImageClassificationWithTeacher(DeiTConfig(**VIT, num_labels=5, **kw))


def _dinov2(**kw):
    kw.setdefault("layerscale_value", 0.5)
    kw = dict(dict(image_size=32, patch_size=8), **kw)
    return Dinov2Model(Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, **kw))


def _swin(**kw):
    return SwinForImageClassification(SwinConfig(**SWIN, num_labels=5, **kw))


# name -> (builder, image H x W, {rule: swaps})
MODELS = {
    "vit": (_vit, (32, 32), {"hf.ViTLayer": 2, "hf.Embeddings": 1, "torch.nn.LayerNorm": 1}),
    "deit_teacher": (_deit, (32, 32), {"hf.ViTLayer": 2, "hf.Embeddings": 1, "torch.nn.LayerNorm": 1}),
    "dinov2": (_dinov2, (32, 32), {"hf.Dinov2Layer": 2, "hf.Embeddings": 1, "torch.nn.LayerNorm": 1}),
    "swin": (_swin, (36, 32), {"hf.SwinLayer": 4, "hf.SwinPatchEmbeddings": 1, "torch.nn.LayerNorm": 3}),
}


def _build(name, **kw):
    """The model in eval mode with every parameter perturbed (HF zero-initialises biases, tokens, bias tables)."""
    torch.manual_seed(seed_for("hf", name, sorted(kw.items())))
    model = MODELS[name][0](**kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _image(name, batch=2, tag=""):
    h, w = MODELS[name][1]
    return randn((batch, 3, h, w), dtype=torch.float32, device="cpu", seed=seed_for("hf-image", name, batch, tag))


def _tensors(out):
    """Every tensor of an HF output (tuples such as hidden_states flattened), by name."""
    flat = {}
    for key, value in out.items():
        if isinstance(value, torch.Tensor):
            flat[key] = value
        elif isinstance(value, tuple):
            flat.update({f"{key}[{i}]": t for i, t in enumerate(value) if isinstance(t, torch.Tensor)})
    return flat


def _main(out):
    return out["logits"] if "logits" in out else out["last_hidden_state"]


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts calls of the fused functionals from the HF modules (proves the fused path ran, or did not)."""
    calls = {}
    for name in ("attention", "ln_mlp", "ln_linear", "window_attention", "linear_residual", "patch_embed"):
        fn = getattr(hf_blocks, name)

        def spy(*args, _fn=fn, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(hf_blocks, name, spy)
    return calls


def _forward_backward(model, x, w_seed):
    x = x.clone().requires_grad_(True)
    out = model(x, output_hidden_states=True)
    main = _main(out)
    w = randn(main.shape, dtype=torch.float64, device="cpu", seed=w_seed).to(main.dtype)
    (main * w).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    grads["pixel_values"] = x.grad
    return _tensors(out), grads


@pytest.mark.parametrize("name", list(MODELS))
def test_optimized_model_matches_original(name, fused_calls):
    model = _build(name)
    x = _image(name)
    ref64, grads64 = _forward_backward(copy.deepcopy(model).double(), x.double(), seed_for("w", name))
    opt = copy.deepcopy(model)
    if name != "swin":  # HF installs its output hooks on the first output_hidden_states call: before the swap here
        with torch.no_grad():  # (not on Swin: its first call also clamps window/shift in place, which the
            opt(x[:1], output_hidden_states=True)  # optimized model must do itself)
    base_model = copy.deepcopy(model)
    base, base_grads = _forward_backward(base_model, x, seed_for("w", name))
    params = dict(opt.named_parameters())
    state = opt.state_dict()

    report = vitkern.optimize(opt)

    # what was swapped
    for rule, count in MODELS[name][2].items():
        assert report.count(rule) == count, str(report)
    assert not any(s.rule == "hf.Attention" for s in report.swapped)  # the layer swaps took their attention
    # parameters are the same objects, state_dict keys and tensors unchanged
    assert all(p is params[n] for n, p in opt.named_parameters()) and len(params) == len(list(opt.parameters()))
    after = opt.state_dict()
    assert list(after) == list(state)
    assert all(after[k].data_ptr() == state[k].data_ptr() for k in state)

    out, grads = _forward_backward(opt, x, seed_for("w", name))
    if name == "swin":  # every block fused, also the padded + shifted one and the clamped ones
        assert fused_calls == {"window_attention": 4, "ln_linear": 4, "linear_residual": 4, "ln_mlp": 4,
                               "patch_embed": 1}
    else:
        assert fused_calls == {"attention": 2, "linear_residual": 2, "ln_mlp": 2, "patch_embed": 1}
    assert set(out) == set(base) and len(out) > 3  # hidden states of every layer are still captured
    for key in base:
        assert_close(f"{name} {key}", out[key], ref64[key], base[key])
    assert set(grads) == set(base_grads)
    for key in base_grads:
        assert_close(f"{name} grad {key}", grads[key], grads64[key], base_grads[key])

    # restore: the original classes, the same parameters, exactly the original numbers
    assert vitkern.restore(opt) == len(report.swapped)
    assert [type(m) for m in opt.modules()] == [type(m) for m in base_model.modules()]
    assert all(p is params[n] for n, p in opt.named_parameters())
    with torch.no_grad():
        restored, plain = opt(x, output_hidden_states=True), base_model(x, output_hidden_states=True)
    for key, value in _tensors(plain).items():
        torch.testing.assert_close(_tensors(restored)[key], value, atol=0, rtol=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_output_attentions_fall_back_to_eager_probabilities(name, fused_calls):
    model = _build(name, attn_implementation="eager")
    x = _image(name, tag="attn")
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(x.double(), output_attentions=True).attentions
        base = model(x, output_attentions=True).attentions
        opt = copy.deepcopy(model)
        vitkern.optimize(opt)
        out = opt(x, output_attentions=True)
        assert len(out.attentions) == len(base) == 2
        for i, (a, r, b) in enumerate(zip(out.attentions, ref64, base)):
            assert_close(f"{name} attentions[{i}]", a, r, b)
        assert "window_attention" not in fused_calls  # Swin blocks ran HF's path to return probabilities
        # output_attentions from the config never reaches the layers as a kwarg: the HF collector is read
        opt.config.output_attentions = True
        assert len(opt(x).attentions) == 2


def test_attention_maps_record_probabilities():
    model = _build("vit", attn_implementation="eager")
    x = _image("vit", tag="maps")
    with torch.no_grad():
        eager = model(x, output_attentions=True).attentions
        vitkern.optimize(model)
        with vitkern.nn.attention_maps(model) as maps:
            model(x)
    assert sorted(maps) == ["vit.layers.0.attention", "vit.layers.1.attention"]
    for i, path in enumerate(sorted(maps)):
        assert len(maps[path]) == 1
        torch.testing.assert_close(maps[path][0], eager[i], atol=1e-6, rtol=1e-5)
    swin = _build("swin")
    vitkern.optimize(swin)
    with torch.no_grad(), vitkern.nn.attention_maps(swin) as maps:
        swin(_image("swin", tag="maps"))
    assert len(maps) == 4 and all(len(v) == 1 for v in maps.values())
    probs = maps["swin.encoder.layers.0.blocks.1.attention"][0]  # [B * windows, heads, N, N]: 2 * 3 * 2 windows
    assert probs.shape == (12, 2, 16, 16)
    torch.testing.assert_close(probs.sum(-1), torch.ones(12, 2, 16))


@pytest.mark.parametrize("name", list(MODELS))
def test_compile_fullgraph_traces_optimized_model(name, fused_calls):
    """Compiled, the optimized model traces the same fused calls as in eager mode: for ViT/DeiT that needs the mask
    the model builds to be None while tracing (HF's sdpa mask function materialises an all-True one there)."""
    model = _build(name)
    x = _image(name, tag="compile")
    vitkern.optimize(model)
    with torch.no_grad():
        eager = _main(model(x))
        eager_calls = dict(fused_calls)
        fused_calls.clear()
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        traced = _main(compiled(x))  # the spies count while dynamo traces (once)
    assert fused_calls == eager_calls
    assert fused_calls.get("attention", 0) + fused_calls.get("window_attention", 0) in (2, 4)
    torch.testing.assert_close(traced, eager, atol=1e-6, rtol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["vit", "dinov2"])
def test_image_size_with_a_remainder_runs_fused(name, fused_calls):
    """image_size 38 with patch 8: HF's stride-8 conv drops the last 6 rows/columns; the fused embedding must too."""
    model = _build(name, image_size=38)
    x = randn((2, 3, 38, 38), dtype=torch.float32, device="cpu", seed=seed_for("hf-remainder", name))
    with torch.no_grad():
        ref64 = _main(copy.deepcopy(model).double()(x.double()))
        base = _main(model(x))
        vitkern.optimize(model)
        out = _main(model(x))
    assert fused_calls["patch_embed"] == 1
    assert_close(f"{name} image with a remainder", out, ref64, base)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_optimize_switches_an_sdpa_config_to_vitkern_and_restore_switches_back(impl):
    """The config's attention implementation decides the mask function: "sdpa" becomes "vitkern" (so a model with
    no padding mask gets None, also compiled), and restore puts it back; "eager" (a user's choice) is left."""
    model = _build("vit", attn_implementation=impl)
    vitkern.optimize(model)
    assert model.config._attn_implementation == ("vitkern" if impl == "sdpa" else impl)
    clone = pickle.loads(pickle.dumps(model))  # the switched config travels with the model; restore works on it
    for m in (model, clone):
        vitkern.restore(m)
        assert m.config._attn_implementation == impl
    model.set_attn_implementation("sdpa")  # a later user change is not undone by restore
    vitkern.optimize(model)
    model.set_attn_implementation("eager")
    vitkern.restore(model)
    assert model.config._attn_implementation == "eager"


def test_compiled_optimized_model_keeps_a_padding_mask(fused_calls):
    """A real padding mask is still built and applied under torch.compile (HF's sdpa path takes it)."""
    sdpa = _build("vit")
    model = copy.deepcopy(sdpa)
    vitkern.optimize(model)
    x = _image("vit", tag="compile-mask")
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[1, 3:11] = False
    with torch.no_grad():
        torch._dynamo.reset()
        masked = torch.compile(model.vit, fullgraph=True, backend="eager")(x, attention_mask=mask)
        want = sdpa.vit(x, attention_mask=mask).last_hidden_state
    torch._dynamo.reset()
    torch.testing.assert_close(masked.last_hidden_state, want, atol=1e-5, rtol=1e-5)
    assert "attention" not in fused_calls  # masked calls go to HF's sdpa path


@pytest.mark.interpreter
def test_triton_kernels_end_to_end():
    """The Triton kernels (interpreter) run every fused op of a tiny ViT and Swin, forward and backward."""
    for name, ops in (("vit", {"attention", "ln_mlp", "layer_norm", "patch_embed"}),
                      ("swin", {"window_attention", "ln_linear", "linear_residual", "ln_mlp", "layer_norm",
                                "patch_embed"})):
        model = _build(name)
        x = _image(name, batch=1, tag="triton")
        ref64, grads64 = _forward_backward(copy.deepcopy(model).double(), x.double(), seed_for("tw", name))
        base, base_grads = _forward_backward(copy.deepcopy(model), x, seed_for("tw", name))
        vitkern.optimize(model)
        with record_choices() as chosen, vitkern.use_backend("triton", strict=False):
            out, grads = _forward_backward(model, x, seed_for("tw", name))
        assert not ran_on(chosen, "triton", ops), (ran_on(chosen, "triton", ops), sorted(chosen))
        for key in ("logits", "hidden_states[2]"):
            assert_close(f"triton {name} {key}", out[key], ref64[key], base[key])
        for key in ("pixel_values", next(iter(base_grads))):
            assert_close(f"triton {name} grad {key}", grads[key], grads64[key], base_grads[key])


def test_training_fallbacks_keep_hf_semantics(fused_calls):
    # attention dropout: the vitkern op's eager path draws the same dropout mask as HF's eager function
    model = _build("vit", attn_implementation="eager", attention_probs_dropout_prob=0.3).train()
    opt = copy.deepcopy(model)
    vitkern.optimize(opt)
    x = _image("vit", tag="dropout")
    torch.manual_seed(1)
    base = model(x).logits
    torch.manual_seed(1)
    out = opt(x).logits
    torch.testing.assert_close(out, base, atol=1e-5, rtol=1e-5)
    torch.manual_seed(2)
    assert (opt(x).logits - out).abs().max() > 1e-3  # dropout is really applied
    # hidden dropout (ViT) and drop path (Swin) in training: HF's forward on the swapped children
    for name, kw in (("vit", dict(hidden_dropout_prob=0.2)), ("swin", dict(drop_path_rate=0.3))):
        fused_calls.clear()
        model = _build(name, **kw).train()
        opt = copy.deepcopy(model)
        vitkern.optimize(opt)
        x = _image(name, tag="train")
        torch.manual_seed(3)
        base = model(x).logits
        torch.manual_seed(3)
        out = opt(x).logits
        torch.testing.assert_close(out, base, atol=1e-5, rtol=1e-5)
        # Swin's drop path grows linearly from 0: its first block has none and stays fused
        # (ViT: HF's forward still calls the swapped attention, fused: its dropout is off). Swin's patch embeddings
        # have no dropout of their own (SwinEmbeddings' comes after its norm): fused in training too
        assert fused_calls == ({"window_attention": 1, "ln_linear": 1, "linear_residual": 1, "ln_mlp": 1,
                                "patch_embed": 1} if name == "swin" else {"attention": 2})
        opt.eval()
        with torch.no_grad():
            opt(x)
        assert fused_calls["ln_mlp"] == (5 if name == "swin" else 2)


def test_gradient_checkpointing_still_applies(fused_calls):
    """The swapped layers are still HF GradientCheckpointingLayers: enabling checkpointing recomputes them."""
    model = _build("vit").train()
    x = _image("vit", tag="ckpt")
    vitkern.optimize(model)
    model(x).logits.sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert fused_calls["ln_mlp"] == 2
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_enable()
    fused_calls.clear()
    model(x).logits.sum().backward()
    assert fused_calls["ln_mlp"] == 4  # forward + recomputation in backward
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], atol=1e-6, rtol=1e-5)


def test_restore_undoes_everything():
    model = _build("swin")
    block = model.swin.encoder.layers[1].blocks[1]
    assert block.shift_size == 2
    impl = model.config._attn_implementation
    vitkern.optimize(model)
    assert model.config._attn_implementation == impl  # optimize changes no config
    with torch.no_grad():
        model(_image("swin", tag="restore"))
    vitkern.restore(model)
    assert model.swin.encoder.layers[1].blocks[1] is block
    assert block.shift_size == 0  # HF's in-place clamping (5x4 map, window 4) reached the original layer
    assert model.config._attn_implementation == impl
    assert not any(type(m).__module__.startswith("vitkern") for m in model.modules())


def test_always_partition_backbone_pads_and_shifts_a_one_window_map(fused_calls):
    """SwinBackbone never clamps: stage 2's 5x4 map is padded to 8x4 and still shifted by 2 (HF rolls the padded
    map); the kernel's pad-then-roll order matches that."""
    torch.manual_seed(seed_for("backbone"))
    model = SwinBackbone(SwinConfig(**SWIN, out_features=["stage1", "stage2"])).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = _image("swin", tag="backbone")
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(x.double()).feature_maps
        base = model(x).feature_maps
        vitkern.optimize(model)
        out = model(x).feature_maps
    assert fused_calls["window_attention"] == 4
    for i in range(2):
        assert_close(f"backbone feature_maps[{i}]", out[i], ref64[i], base[i])


def test_registered_attention_implementation(fused_calls):
    assert register_hf_attention() == "vitkern"
    torch.manual_seed(seed_for("registry"))
    sdpa = _build("vit")
    model = copy.deepcopy(sdpa)
    model.set_attn_implementation("vitkern")
    assert model.config._attn_implementation == "vitkern"
    x = _image("vit", tag="registry")
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[0, 5:9] = False  # a padding-style mask: transformers must not drop it for this implementation
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, sdpa(x).logits, atol=1e-5, rtol=1e-5)
        assert fused_calls["attention"] == 2
        masked = model.vit(x, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(masked, sdpa.vit(x, attention_mask=mask).last_hidden_state, atol=1e-5, rtol=1e-5)
        assert (masked - model.vit(x).last_hidden_state).abs().max() > 1e-3
        assert len(model(x, output_attentions=True).attentions) == 2
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="name must be a non-empty str"):
        register_hf_attention("")


@pytest.mark.parametrize("case", ["mask", "causal_gqa", "weights"])
def test_attention_function_fallbacks_match_hf(case):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module().eval()
    module.is_causal = case == "causal_gqa"
    g = torch.Generator().manual_seed(seed_for("fn", case))
    kv_heads = 2 if case == "causal_gqa" else 4
    q = torch.randn(2, 4, 9, 16, generator=g)
    k, v = torch.randn(2, kv_heads, 9, 16, generator=g), torch.randn(2, kv_heads, 9, 16, generator=g)
    if case == "causal_gqa":
        module.num_key_value_groups = 2
    mask = torch.randn(2, 1, 9, 9, generator=g) if case == "mask" else None
    kwargs = {"output_attentions": True} if case == "weights" else {}
    out, weights = hf_blocks.hf_attention_forward(module, q, k, v, mask, scaling=0.3, **kwargs)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if case == "weights":
        expect = ((q @ k.transpose(-1, -2)) * 0.3).softmax(-1)
        torch.testing.assert_close(weights, expect, atol=1e-6, rtol=1e-5)
    else:
        assert weights is None


def test_swin_patch_embeddings_pad_a_partial_patch_like_hf(fused_calls):
    """An image side that is not a multiple of the patch: HF pads right / bottom with zeros, so does the swap."""
    model = _build("swin")
    x = randn((2, 3, 38, 30), dtype=torch.float32, device="cpu", seed=seed_for("hf-swin-pad"))
    ref64, grads64 = _forward_backward(copy.deepcopy(model).double(), x.double(), seed_for("w-pad"))
    base, base_grads = _forward_backward(copy.deepcopy(model), x, seed_for("w-pad"))
    report = vitkern.optimize(model, ln_mlp=False, window_attention=False, layer_norm=False, attention=False)
    assert [s.path for s in report.swapped] == ["swin.embeddings.patch_embeddings"]
    out, grads = _forward_backward(model, x, seed_for("w-pad"))
    assert fused_calls == {"patch_embed": 1}
    for key in ("logits", "hidden_states[0]"):  # hidden_states[0]: the embeddings, [B, 10 * 8, D]
        assert_close(f"swin pad {key}", out[key], ref64[key], base[key])
    for key in ("pixel_values", "swin.embeddings.patch_embeddings.projection.weight"):
        assert_close(f"swin pad grad {key}", grads[key], grads64[key], base_grads[key])


def test_family_options_and_what_is_left():
    x = _image("vit", tag="options")
    model = _build("vit")
    with torch.no_grad():
        base = model(x).logits
    report = vitkern.optimize(model, ln_mlp=False, patch_embed=False)
    assert report.count("hf.Attention") == 2 and report.count("hf.ViTLayer") == 0
    assert report.count("torch.nn.LayerNorm") == 5
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, base, atol=1e-5, rtol=1e-5)

    swin = _build("swin")
    report = vitkern.optimize(swin, window_attention=False)
    assert report.count("hf.SwinLayer") == 0
    assert any(rule == "hf.Attention" and "window_attention family" in why for _, rule, why in report.left)

    relu = _build("vit", hidden_act="relu")
    report = vitkern.optimize(relu)
    assert report.count("hf.Attention") == 2  # the layer was declined, its attention is still swapped
    assert any(p == "vit.layers.0" and "not GELU" in why for p, _, why in report.left)
    swiglu = _build("dinov2", use_swiglu_ffn=True)
    report = vitkern.optimize(swiglu)
    assert report.count("hf.Attention") == 2
    assert any(p == "encoder.layer.0" and "Dinov2SwiGLUFFN" in why for p, _, why in report.left)

    class MyLayer(type(model.vit.layers[0])):
        pass

    custom = _build("vit")
    custom.vit.layers[0].__class__ = MyLayer
    report = vitkern.optimize(custom)
    assert any("subclasses transformers' ViTLayer" in why for _, _, why in report.left)


def test_bad_options_raise_clear_errors():
    model = _build("vit")
    with pytest.raises(TypeError, match="attention must be True or False"):
        vitkern.optimize(model, attention="yes")
    relu = _build("vit", hidden_act="relu")
    with pytest.raises(ValueError, match="activation ReLU.* is not GELU"):
        hf_blocks.HFViTLayer.from_hf(relu.vit.layers[0])
    vitkern.optimize(model)
    with pytest.raises(TypeError, match="already a vitkern module"):
        hf_blocks.HFViTLayer.from_hf(model.vit.layers[0])


def test_reoptimize_copy_pickle_and_hooks_after_swap():
    model = _build("dinov2")
    x = _image("dinov2", tag="copy")
    with torch.no_grad():
        base = model(x).last_hidden_state
    vitkern.optimize(model)
    # (pickle before HF installs its output hooks: those are local closures transformers itself cannot pickle)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(clone.encoder.layer[0]) is type(model.encoder.layer[0])
        with torch.no_grad():
            torch.testing.assert_close(clone(x).last_hidden_state, base, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # HF installs its output hooks only now, on the swapped layers (isinstance holds)
        assert len(model(x, output_hidden_states=True).hidden_states) == 3
    assert vitkern.optimize(model).count("hf.") == 0  # nothing HF left to swap
    vitkern.restore(model)
    with torch.no_grad():  # the hooks were shared with the original layers
        assert len(model(x, output_hidden_states=True).hidden_states) == 3
        torch.testing.assert_close(model(x).last_hidden_state, base, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", ["vit", "dinov2", "swin"])
def test_real_size_hf_models_on_gpu(family, dtype):
    """Default configs (ViT-B/16 224, Dinov2-B/14, Swin-T) at real size, vs float64 with the numerics rule."""
    import transformers

    from vitkern.testing.models import check_optimized_model, randomize_

    config_cls, model_cls = {"vit": (transformers.ViTConfig, transformers.ViTForImageClassification),
                             "dinov2": (transformers.Dinov2Config, transformers.Dinov2Model),
                             "swin": (transformers.SwinConfig, transformers.SwinForImageClassification)}[family]
    model = model_cls(config_cls(attn_implementation="eager"))
    model = randomize_(model, seed_for(family), std=0.02).cuda().to(dtype).eval()
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(seed_for(family, "x"))).cuda().to(dtype)
    # whole-network errors compound over 12 blocks and the fused ops round at other points than eager: k=3 / k=4
    report = check_optimized_model(model, [x], vitkern.optimize, vitkern.restore, tol=Tolerance(k=3.0),
                                   grad_tol=Tolerance(k=4.0))
    assert report.count("hf.") >= 12


@pytest.mark.parametrize("family", ["vit", "dinov2", "swin"])
def test_autocast_matches_hfs_own_autocast(family):
    """An optimized fp32 HF model under bf16 autocast computes what HF computes under autocast: bf16 GEMMs and
    attention, each layer's output (the residual stream) in HF's dtype (fp32 for ViT/Dinov2), error within 2x of
    HF's own autocast error vs float64."""
    from vitkern.testing.models import check_autocast_matches_original, randomize_

    build, hw = {"vit": (_vit, (32, 32)), "dinov2": (_dinov2, (32, 32)), "swin": (_swin, (36, 32))}[family]
    model = randomize_(build(), seed_for(family, "amp"), std=0.02).eval()
    x = randn((2, 3, *hw), dtype=torch.float32, device="cpu", seed=seed_for(family, "amp-x"))

    def is_layer(name, module):  # vit.layers.N / encoder.layer.N / swin.encoder.layers.S.blocks.N
        parts = name.split(".")
        return len(parts) >= 2 and parts[-1].isdigit() and parts[-2] in ("layers", "layer", "blocks")

    check_autocast_matches_original(model, x, vitkern.optimize, is_layer,
                                    stream_dtype=torch.float32 if family != "swin" else None)
