"""Patch embedding (patch GEMM + bias + pos embed + prefix tokens): parity of every backend against float64, forward
and all gradients (image, weight, bias, pos_embed, each prefix token), and the timm / torchvision / HF semantics.

Tolerance: vitkern.testing's rule, err <= 2 x (PyTorch's error in the same dtype) + atol(dtype) x scale, against
the same computation in float64 (Conv2d + flatten + cat + add, written out below independently of the op).
"""

import pytest
import torch
import torch.nn.functional as F

import vitkern
from vitkern.functional.patch_embed import patch_embed, resample_pos_embed
from vitkern.testing import check_forward_backward, randn, run_every_triton_config, run_in_gpu_geometry, seed_for

OP = "patch_embed"
PREFIXES = {"none": (0, 0, 0), "cls": (1, 0, 0), "cls+dist": (1, 1, 0), "cls+reg4": (1, 0, 4)}  # (cls, dist, reg)


def reference(x, weight, bias=None, pos_embed=None, cls=None, dist=None, reg=None, no_embed_class=False, norm=None):
    """timm's PatchEmbed + _pos_embed, spelled out: conv -> tokens, then cat/add in the family's order.

    ``norm = (mean, std)``: the pixels are normalised first, in fp32 (fp64 for the oracle), then cast."""
    ph, pw = weight.shape[2:]
    if norm is not None:
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        mean, std = (torch.tensor(v, dtype=acc)[:, None, None] for v in norm)
        x = (x.to(acc) - mean) / std
    y = F.conv2d(x.to(weight.dtype), weight, bias, stride=(ph, pw)).flatten(2).transpose(1, 2)
    prefix = [t.expand(x.shape[0], -1, -1) for t in (cls, dist, reg) if t is not None]
    if pos_embed is None:
        return torch.cat(prefix + [y], dim=1)
    if no_embed_class:
        return torch.cat(prefix + [y + pos_embed], dim=1)
    return torch.cat(prefix + [y], dim=1) + pos_embed


def vitkern_embed(x, weight, bias=None, pos_embed=None, cls=None, dist=None, reg=None, no_embed_class=False,
                  norm=None):
    tokens = [t for t in (cls, dist, reg) if t is not None]
    prefix = torch.cat(tokens, dim=1) if tokens else None
    mean, std = norm if norm is not None else (None, None)
    return patch_embed(x, weight, bias, pos_embed, prefix, mean=mean, std=std)


def make_inputs(B, C, H, W, p, D, prefix, no_embed_class, dtype, device, seed, x_dtype=None, channels_last=False,
                bias=True, pos=True):
    n_cls, n_dist, n_reg = PREFIXES[prefix]
    np_ = (H // p) * (W // p)
    n_pos = np_ + (0 if no_embed_class else n_cls + n_dist + n_reg)
    if x_dtype == torch.uint8:  # an 8-bit image: every value 0..255
        x = torch.randint(0, 256, (B, C, H, W), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
        x = x.to(device)
    else:
        x = randn((B, C, H, W), dtype=x_dtype or dtype, device=device, seed=seed)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    r = lambda shape, i, s=1.0: randn(shape, dtype=dtype, device=device, seed=seed + i, scale=s)  # noqa: E731
    return {
        "x": x,
        "weight": r((D, C, p, p), 1, (C * p * p) ** -0.5),  # unit-variance outputs, as after Conv2d init
        "bias": r((D,), 2) if bias else None,
        "pos_embed": r((1, n_pos, D), 3) if pos else None,
        "cls": r((1, 1, D), 4) if n_cls else None,
        "dist": r((1, 1, D), 5) if n_dist else None,
        "reg": r((1, n_reg, D), 6) if n_reg else None,
    }


# ImageNet mean/std in 8-bit units, and a float-image normalisation with non-trivial values
UINT8_NORM = ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
FLOAT_NORM = ((0.5, -0.25, 0.1), (0.25, 2.0, 0.75))


def run_parity(backend, B, C, H, W, p, D, prefix, no_embed_class, dtype, device="cpu", norm=None, autocast=None, **kw):
    """``autocast``: both run under ``torch.autocast(device, autocast)`` (the fp64 oracle run is left alone)."""
    seed = seed_for("pe", backend, B, C, H, W, p, D, prefix, no_embed_class, dtype, norm, autocast,
                    tuple(sorted(kw.items())))
    inputs = make_inputs(B, C, H, W, p, D, prefix, no_embed_class, dtype, device, seed, **kw)
    names = [k for k, v in inputs.items() if v is not None and v.is_floating_point()]  # no grad for uint8 images
    norm = tuple(tuple(v[:C]) for v in norm) if norm is not None else None

    def amp():
        return torch.autocast(torch.device(device).type, dtype=autocast, enabled=autocast is not None)

    def kernel(**a):
        with amp():
            return vitkern_embed(**a, no_embed_class=no_embed_class, norm=norm)

    def ref(**a):
        with amp():
            return reference(**a, no_embed_class=no_embed_class, norm=norm)

    with vitkern.use_backend(backend, op=OP):
        return check_forward_backward(kernel, ref, inputs, names, seed=seed)


# ----------------------------------------------------------------------------------------------- CPU interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("no_embed_class", [False, True], ids=["pos_all", "no_embed_class"])
@pytest.mark.parametrize("prefix", list(PREFIXES))
@pytest.mark.parametrize("p, C", [(4, 3), (8, 1), (16, 3)], ids=["p4c3", "p8c1", "p16c3"])
def test_triton_interpreter_parity(p, C, prefix, no_embed_class):
    if prefix == "none" and no_embed_class:
        pytest.skip("no prefix: no_embed_class changes nothing")
    run_parity("triton", 3, C, 32, 32, p, 48, prefix, no_embed_class, torch.float32)


@pytest.mark.interpreter
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_triton_interpreter_layouts_dtypes(dtype, channels_last, batch):
    run_parity("triton", batch, 3, 32, 32, 8, 40, "cls+reg4", False, dtype, channels_last=channels_last)


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "case",
    ["non_square", "fp32_image_fp16_weight", "no_bias_no_pos", "odd_dim", "odd_dim_fp16", "prefix_rows_span_tiles"],
)
def test_triton_interpreter_edge_cases(case):
    if case == "non_square":  # 3x5 grid: catches a swapped (gy, gx) in the gather
        run_parity("triton", 2, 3, 24, 40, 8, 32, "cls+dist", False, torch.float32, channels_last=True)
    elif case == "fp32_image_fp16_weight":  # image cast to the compute dtype in the A-tile load; fp16 out
        run_parity("triton", 2, 3, 32, 32, 8, 32, "cls", False, torch.float16, x_dtype=torch.float32)
    elif case == "no_bias_no_pos":
        run_parity("triton", 2, 3, 16, 16, 4, 32, "cls", False, torch.float32, bias=False, pos=False)
    elif case == "odd_dim":  # D and K not multiples of the tiles (K = 3*14*14 = 588)
        run_parity("triton", 1, 3, 28, 28, 14, 37, "cls", True, torch.float32)
    elif case == "odd_dim_fp16":  # K*2 bytes not a multiple of 16: the kernels read a [K, D]-major weight copy
        run_parity("triton", 2, 3, 28, 28, 14, 40, "cls", False, torch.float16, channels_last=True)
    else:  # 5 x 5 = 25 prefix rows: two prefix tiles of 16 rows, the second one partial
        run_parity("triton", 5, 1, 16, 16, 4, 32, "cls+reg4", False, torch.float32)


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "image, dtype",
    [("uint8", torch.float32), ("uint8", torch.float16), ("fp32", torch.float32), ("fp16", torch.float16)],
)
def test_triton_interpreter_fused_normalisation(image, dtype):
    """(x - mean) / std fused into the A-tile load: uint8 images (no image grad) and float images (whose gradient
    carries the 1/std)."""
    x_dtype = {"uint8": torch.uint8, "fp32": torch.float32, "fp16": torch.float16}[image]
    norm = UINT8_NORM if image == "uint8" else FLOAT_NORM
    run_parity("triton", 2, 3, 32, 32, 8, 40, "cls", False, dtype, x_dtype=x_dtype, norm=norm, channels_last=True)


@pytest.mark.interpreter
def test_triton_weight_grad_is_deterministic():
    seed = seed_for("pe-det")
    inputs = make_inputs(3, 3, 32, 32, 4, 48, "cls", False, torch.float32, "cpu", seed)
    with vitkern.use_backend("triton", op=OP):
        grads = []
        for _ in range(2):
            w = inputs["weight"].clone().requires_grad_()
            x = inputs["x"].clone().requires_grad_()
            out = vitkern_embed(**{**inputs, "weight": w, "x": x})
            grads.append(torch.autograd.grad(out, (w, x), torch.ones_like(out)))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("backend, prefix, no_embed_class, amp", [
    pytest.param("triton", "cls+reg4", False, torch.float16, marks=pytest.mark.interpreter),
    pytest.param("triton", "cls", True, torch.bfloat16, marks=pytest.mark.interpreter),
    ("reference", "cls+dist", False, torch.float16)])
def test_autocast_keeps_fp32_tokens_as_timm_does(backend, prefix, no_embed_class, amp):
    """An fp32 model under fp16 / bf16 autocast: the patch GEMM in 16 bits, the tokens in fp32 as timm's
    cat(cls, conv(x)) + pos promotes them (then every block keeps an fp32 residual stream); forward and every
    gradient against timm's spelled-out ops under the same autocast."""
    run_parity(backend, 2, 3, 16, 24, 4, 32, prefix, no_embed_class, torch.float32, autocast=amp)
    a = make_inputs(1, 3, 16, 16, 4, 32, prefix, no_embed_class, torch.float32, "cpu", seed=5)
    with torch.autocast("cpu", dtype=amp), vitkern.use_backend(backend, op=OP):
        assert vitkern_embed(**a, no_embed_class=no_embed_class).dtype == torch.float32
        assert patch_embed(a["x"], a["weight"], a["bias"]).dtype == amp  # no tokens: the conv's dtype


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_reference_backend_parity(dtype):
    run_parity("reference", 2, 3, 32, 32, 8, 48, "cls+reg4", False, dtype)
    run_parity("reference", 2, 3, 32, 32, 8, 48, "cls+reg4", True, dtype, channels_last=True)
    run_parity("reference", 2, 3, 32, 32, 8, 48, "cls", False, dtype, x_dtype=torch.uint8, norm=UINT8_NORM)
    run_parity("reference", 2, 3, 32, 32, 8, 48, "cls", False, dtype, norm=FLOAT_NORM)


# ----------------------------------------------------------------------------------------------- model semantics
def _grads(out, params, seed):
    g = randn(out.shape, dtype=out.dtype, device=out.device, seed=seed)
    return torch.autograd.grad(out, params, g)


def _compare_module(ours, theirs, x, ours_params, theirs_params, seed, atol=2e-5):
    """ours(x) vs theirs(x) and the gradients of the shared parameters and the image.

    Both sides run fp32 with the same weights; the atol covers a different fp32 summation order over K <= 768
    (products of unit-scale values: ~1e-6 relative per term) — not a loose bound."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = ours(xa), theirs(xb)
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)
    ga = _grads(a, [xa, *ours_params], seed)
    gb = _grads(b, [xb, *theirs_params], seed)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, atol=atol * 10, rtol=1e-5)  # grads sum over B*Np rows: 10x the headroom


def _timm_vit(**kw):
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    del timm
    torch.manual_seed(seed_for("timm-vit", tuple(sorted(kw.items()))))
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=2, **kw).eval()
    with torch.no_grad():
        for prm in (m.cls_token, m.reg_token, m.pos_embed, m.patch_embed.proj.bias):
            if prm is not None:
                prm.normal_()
    return m


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "kw",
    [dict(), dict(no_embed_class=True), dict(reg_tokens=4, no_embed_class=True), dict(reg_tokens=2),
     dict(class_token=False, global_pool="avg")],
    ids=["vit", "no_embed_class", "reg4", "reg2_pos_all", "no_class_token"],
)
def test_matches_timm_vit_pos_embed(kw):
    """ViTEmbed.from_timm(vit)(x) == vit._pos_embed(vit.patch_embed(x)), forward and gradients, Triton kernel."""
    vit = _timm_vit(**kw)
    ours = vitkern.nn.ViTEmbed.from_timm(vit)
    assert ours.pos_embed is vit.pos_embed and ours.patch_embed.proj is vit.patch_embed.proj
    x = randn((2, 3, 32, 32), dtype=torch.float32, device="cpu", seed=seed_for("timm-x", tuple(kw)))
    params = [p for p in (vit.patch_embed.proj.weight, vit.patch_embed.proj.bias, vit.pos_embed, vit.cls_token,
                          vit.reg_token) if p is not None]
    with vitkern.use_backend("triton", op=OP):
        _compare_module(ours, lambda t: vit._pos_embed(vit.patch_embed(t)), x, params, params, seed_for("g", tuple(kw)))


@pytest.mark.interpreter
def test_matches_timm_deit_distilled():
    pytest.importorskip("timm")
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(seed_for("deit"))
    vit = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=2).eval()
    with torch.no_grad():
        vit.cls_token.normal_(), vit.dist_token.normal_(), vit.pos_embed.normal_()
    ours = vitkern.nn.ViTEmbed.from_timm(vit)
    x = randn((3, 3, 32, 32), dtype=torch.float32, device="cpu", seed=seed_for("deit-x"))
    params = [vit.patch_embed.proj.weight, vit.patch_embed.proj.bias, vit.pos_embed, vit.cls_token, vit.dist_token]
    with vitkern.use_backend("triton", op=OP):
        _compare_module(ours, lambda t: vit._pos_embed(vit.patch_embed(t)), x, params, params, seed_for("deit-g"))


@pytest.mark.interpreter
@pytest.mark.parametrize("distilled", [False, True], ids=["vit_reg", "deit_distilled"])
def test_matches_vitkern_reference_models(distilled):
    from vitkern.reference.vit import VisionTransformer, VisionTransformerDistilled

    torch.manual_seed(seed_for("ref-vit", distilled))
    kw = dict(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=2)
    vit = (VisionTransformerDistilled(**kw) if distilled else VisionTransformer(**kw, reg_tokens=4)).eval()
    ours = vitkern.nn.ViTEmbed.from_timm(vit)
    x = randn((2, 3, 32, 32), dtype=torch.float32, device="cpu", seed=seed_for("ref-x", distilled))
    params = [p for p in ours.parameters()]
    with vitkern.use_backend("triton", op=OP):
        _compare_module(ours, lambda t: vit.add_pos_embed(vit.patch_embed(t)), x, params, params, seed_for("ref-g"))


def test_matches_torchvision_vit():
    tv = pytest.importorskip("torchvision.models.vision_transformer")
    torch.manual_seed(seed_for("tv"))
    vit = tv.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=48, mlp_dim=96).eval()
    with torch.no_grad():
        vit.class_token.normal_()
    x = randn((2, 3, 32, 32), dtype=torch.float32, device="cpu", seed=seed_for("tv-x"))
    theirs_params = [vit.conv_proj.weight, vit.conv_proj.bias, vit.class_token, vit.encoder.pos_embedding]

    def theirs(t):  # VisionTransformer.forward up to the encoder's pos add
        y = vit._process_input(t)
        return torch.cat([vit.class_token.expand(t.shape[0], -1, -1), y], dim=1) + vit.encoder.pos_embedding

    def ours(t):
        return patch_embed(t, vit.conv_proj.weight, vit.conv_proj.bias, vit.encoder.pos_embedding, vit.class_token)

    for backend in ("reference", "triton"):
        with vitkern.use_backend(backend, op=OP):
            _compare_module(ours, theirs, x, theirs_params, theirs_params, seed_for("tv-g"))


def test_matches_hf_vit_embeddings():
    pytest.importorskip("transformers")
    from transformers import ViTConfig
    from transformers.models.vit.modeling_vit import ViTEmbeddings

    torch.manual_seed(seed_for("hf"))
    emb = ViTEmbeddings(ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=48)).eval()
    with torch.no_grad():
        emb.cls_token.normal_(), emb.position_embeddings.normal_()
    proj = emb.patch_embeddings.projection
    x = randn((2, 3, 32, 32), dtype=torch.float32, device="cpu", seed=seed_for("hf-x"))
    params = [proj.weight, proj.bias, emb.cls_token, emb.position_embeddings]

    def ours(t):
        return patch_embed(t, proj.weight, proj.bias, emb.position_embeddings, emb.cls_token)

    for backend in ("reference", "triton"):
        with vitkern.use_backend(backend, op=OP):
            _compare_module(ours, emb, x, params, params, seed_for("hf-g"))


# ----------------------------------------------------------------------------------------------- nn modules
@pytest.mark.parametrize(
    "kw, hw",
    [(dict(), (32, 32)), (dict(output_fmt="NHWC"), (32, 32)), (dict(output_fmt="NCL"), (32, 32)),
     (dict(flatten=False), (32, 32)), (dict(bias=False), (32, 32)), (dict(norm_layer=torch.nn.LayerNorm), (32, 32)),
     (dict(img_size=None), (24, 40)), (dict(strict_img_size=False, img_size=(24, 40)), (16, 24)),
     (dict(dynamic_img_pad=True, img_size=30, strict_img_size=False), (30, 27)),
     (dict(img_size=30), (30, 30)), (dict(img_size=None), (30, 27))],
    ids=["default", "nhwc", "ncl", "nchw", "no_bias", "norm", "no_img_size", "not_strict", "dynamic_pad",
         "strict_remainder", "no_img_size_remainder"],  # remainders: timm's stride-p conv drops them
)
def test_patch_embed_module_is_drop_in_for_timm(kw, hw):
    timm_layers = pytest.importorskip("timm.layers")
    args = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=48)
    args.update(kw)
    torch.manual_seed(seed_for("pe-mod", tuple(kw)))
    theirs = timm_layers.PatchEmbed(**args)
    ours = vitkern.nn.PatchEmbed(**args)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    assert (ours.grid_size, ours.num_patches) == (theirs.grid_size, theirs.num_patches)
    x = randn((2, 3, *hw), dtype=torch.float32, device="cpu", seed=seed_for("pe-mod-x", tuple(kw)))
    torch.testing.assert_close(ours(x), theirs(x), atol=2e-5, rtol=1e-5)
    shared = vitkern.nn.PatchEmbed.from_timm(theirs)
    assert shared.proj is theirs.proj
    torch.testing.assert_close(shared(x), theirs(x), atol=2e-5, rtol=1e-5)
    # contiguous wherever timm's output is (code after it may .view() it); an NCHW map in timm's very layout
    # (contiguous, channels-last from a channels-last image): BatchNorm / convs after it pick kernels by it (visformer)
    for image in (x, x.contiguous(memory_format=torch.channels_last)):
        got, want = ours(image), theirs(image)
        assert got.is_contiguous() or not want.is_contiguous(), (got.stride(), want.stride())
        if got.dim() == 4 and not theirs.flatten and theirs.output_fmt.value == "NCHW":
            assert got.stride() == want.stride(), (got.stride(), want.stride())


def test_vit_embed_state_dict_names_match_timm():
    vit = _timm_vit(reg_tokens=4, no_embed_class=True)
    ours = vitkern.nn.ViTEmbed(img_size=32, patch_size=8, embed_dim=48, reg_tokens=4, no_embed_class=True)
    timm_keys = {k for k in vit.state_dict() if k.startswith(("patch_embed.", "cls_token", "reg_token", "pos_embed"))}
    assert set(ours.state_dict()) == timm_keys
    ours.load_state_dict({k: vit.state_dict()[k] for k in timm_keys})
    x = randn((2, 3, 32, 32), dtype=torch.float32, device="cpu", seed=seed_for("sd-x"))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), vit._pos_embed(vit.patch_embed(x)), atol=2e-5, rtol=1e-5)
    deit = vitkern.nn.ViTEmbed(img_size=32, patch_size=8, embed_dim=48, distilled=True)
    assert set(deit.state_dict()) == {"patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "dist_token",
                                      "pos_embed"}
    assert deit.pos_embed.shape == (1, 16 + 2, 48)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_vit_embed_uint8_images_match_timm_on_normalised_floats(backend):
    """A uint8 batch with the ImageNet normalisation fused == timm on the normalised fp32 batch."""
    vit = _timm_vit()
    mean, std = torch.tensor(UINT8_NORM[0]), torch.tensor(UINT8_NORM[1])
    ours = vitkern.nn.ViTEmbed.from_timm(vit).set_input_normalization(mean, std)
    pixels = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(seed_for("u8")),
                           dtype=torch.uint8)
    with torch.no_grad(), vitkern.use_backend(backend, op=OP):
        expected = vit._pos_embed(vit.patch_embed((pixels.float() - mean[:, None, None]) / std[:, None, None]))
        # fp32 throughout; the kernel multiplies by 1/std where timm divides: ~1 ulp per pixel, summed over K = 192
        torch.testing.assert_close(ours(pixels), expected, atol=2e-5, rtol=1e-5)
    assert list(ours._norm_on) == [pixels.device]  # the normalisation tensors were made once for the device
    ours(pixels)
    assert ours._norm_on[pixels.device][0].data_ptr() == ours._normalization_on(pixels.device)[0].data_ptr()


def test_vit_embed_checks_the_normalisation_when_set():
    embed = vitkern.nn.ViTEmbed(img_size=16, patch_size=8, embed_dim=16)
    with pytest.raises(ValueError, match="std must be positive"):
        embed.set_input_normalization([100.0, 110.0, 120.0], [50.0, 0.0, 60.0])
    with pytest.raises(ValueError, match="mean has 2 values; expected 1 or one per channel"):
        embed.set_input_normalization([100.0, 110.0], 50.0)
    with pytest.raises(ValueError, match="pass both mean and std"):
        embed.set_input_normalization(None, 50.0)


@pytest.mark.parametrize("no_embed_class", [False, True])
def test_timm_dynamic_img_size_model_at_another_resolution(no_embed_class):
    """A timm ViT built with dynamic_img_size=True, fed 48x40 images: the same tokens as timm (which resamples the
    position embedding on every call; we resample once and reuse it in inference)."""
    vit = _timm_vit(dynamic_img_size=True, reg_tokens=2, no_embed_class=no_embed_class)
    ours = vitkern.nn.ViTEmbed.from_timm(vit)
    x = randn((2, 3, 48, 40), dtype=torch.float32, device="cpu", seed=seed_for("dyn", no_embed_class))
    with torch.no_grad():
        expected = vit._pos_embed(vit.patch_embed(x))
        torch.testing.assert_close(ours(x), expected, atol=2e-5, rtol=1e-5)
        assert len(ours._pos_cache) == 1
    (ga,) = torch.autograd.grad(ours(x).sum(), [vit.pos_embed])  # training path: resampled in the graph
    (gb,) = torch.autograd.grad(vit._pos_embed(vit.patch_embed(x)).sum(), [vit.pos_embed])
    torch.testing.assert_close(ga, gb, atol=1e-4, rtol=1e-5)  # sums over 2 images x 30 rows of resampling weights


def test_pos_embed_resampled_once_and_cached_like_timm():
    timm_layers = pytest.importorskip("timm.layers")
    emb = vitkern.nn.ViTEmbed(img_size=32, patch_size=8, embed_dim=48, reg_tokens=2, dynamic_img_size=True)
    x = randn((1, 3, 48, 40), dtype=torch.float32, device="cpu", seed=seed_for("resample"))
    expected = timm_layers.resample_abs_pos_embed(emb.pos_embed, (6, 5), (4, 4), num_prefix_tokens=3)
    torch.testing.assert_close(resample_pos_embed(emb.pos_embed, (6, 5), (4, 4), 3), expected)
    with torch.no_grad():
        first = emb.pos_embed_for((6, 5))
        assert emb.pos_embed_for((6, 5)) is first  # cached: no work on the hot path
        torch.testing.assert_close(first, expected)
        out = emb(x)
        emb.pos_embed.add_(1.0)  # an in-place update invalidates the cache
        assert emb.pos_embed_for((6, 5)) is not first
    assert out.shape == (1, 3 + 30, 48)
    # training: resampled in the graph, so the position embedding still gets its gradient
    emb(x).sum().backward()
    assert emb.pos_embed.grad is not None and emb.pos_embed.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------- errors, dispatch
def _x(*shape, **kw):
    return torch.randn(*shape, **kw)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: patch_embed(torch.zeros(1, 3, 32, 32, dtype=torch.int64), _x(8, 3, 8, 8)), TypeError,
         "x has dtype torch.int64"),
        (lambda: patch_embed(_x(1, 3, 32, 32), _x(8, 3, 8, 8), mean=(0.5,) * 3), ValueError, "both mean and std"),
        (lambda: patch_embed(_x(1, 3, 32, 32), _x(8, 3, 8, 8), mean=(0.5,) * 2, std=1.0), ValueError,
         "mean has 2 values"),
        (lambda: patch_embed(_x(1, 3, 32, 32), _x(8, 3, 8, 8), mean=0.5, std=(1.0, 0.0, 1.0)), ValueError,
         "std must be positive"),
        (lambda: patch_embed(_x(1, 3, 30, 32), _x(8, 3, 8, 8)), ValueError, "not divisible by the patch size 8x8"),
        (lambda: patch_embed(_x(1, 1, 32, 32), _x(8, 3, 8, 8)), ValueError, "1 channels"),
        (lambda: patch_embed(_x(3, 32, 32), _x(8, 3, 8, 8)), ValueError, "x must be 4-D"),
        (lambda: patch_embed(_x(1, 3, 32, 32), _x(8, 3, 8, 8), _x(9)), ValueError, "bias has shape"),
        (lambda: patch_embed(_x(1, 3, 32, 32), _x(8, 3, 8, 8), None, _x(1, 20, 8), _x(1, 1, 8)), ValueError,
         "pos_embed has 20 rows .* resample"),
        (lambda: patch_embed(_x(1, 3, 32, 32), _x(8, 3, 8, 8), None, None, _x(1, 1, 7)), ValueError,
         "prefix has shape"),
        (lambda: patch_embed(_x(1, 3, 32, 32), _x(8, 3, 8, 8), None, _x(16, 8, dtype=torch.float64)), TypeError,
         "pos_embed has dtype"),
        (lambda: patch_embed(_x(1, 3, 32, 32), _x(8, 3, 8, 8, dtype=torch.float16), _x(8)), TypeError,
         "bias has dtype torch.float32; expected the weight's torch.float16"),
        (lambda: patch_embed(_x(1, 3, 32, 32), _x(8, 3, 8, 8, dtype=torch.float16), None, _x(17, 8),
                             _x(1, 8, dtype=torch.float16)), TypeError, "pos_embed and prefix must share one dtype"),
        (lambda: patch_embed(_x(1, 3, 32, 32), _x(8, 3, 8, 8, device="meta")), ValueError, "weight is on meta"),
        (lambda: vitkern.nn.PatchEmbed(32, 8, embed_dim=8)(_x(1, 3, 16, 16)), ValueError, "strict_img_size"),
        (lambda: vitkern.nn.PatchEmbed(32, 8, embed_dim=8, strict_img_size=False)(_x(1, 3, 30, 32)), ValueError,
         "input size 30x32 is not divisible by the patch size 8x8"),
        (lambda: vitkern.nn.PatchEmbed(32, 8, embed_dim=8, output_fmt="NDHWC"), ValueError, "output_fmt"),
        (lambda: vitkern.nn.ViTEmbed(32, 8, embed_dim=8, dynamic_img_size=False)(_x(1, 3, 32, 32)[..., :16, :]),
         ValueError, "strict_img_size"),
        (lambda: vitkern.nn.ViTEmbed(32, 8, embed_dim=8).pos_embed_for((2, 2)), ValueError, "dynamic_img_size=True"),
    ],
)
def test_bad_input_errors_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_cpu_default_is_reference_and_fp64_rejected_by_triton():
    x, w = torch.randn(1, 3, 16, 16), torch.randn(8, 3, 8, 8)
    choice = vitkern.explain(patch_embed, x, w)
    assert choice.backend_name == "reference" and "triton" in str(choice)
    with vitkern.use_backend("triton", op=OP), pytest.raises(vitkern.BackendError, match="dtype"):
        patch_embed(x.double(), w.double())


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float16], ids=["fp32", "mixed-fp16-weight-fp32-tokens"])
def test_custom_ops_pass_opcheck(weight_dtype):
    """torch.library.opcheck: schema, fake kernels, autograd registration and dispatch consistency."""
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    w = torch.randn(8, 3, 4, 4, dtype=weight_dtype, requires_grad=True)
    b = torch.randn(8, dtype=weight_dtype, requires_grad=True)
    pos, prefix = torch.randn(17, 8, requires_grad=True), torch.randn(1, 8, requires_grad=True)
    norm = torch.tensor([[0.5, 0.4, 0.3], [2.0, 4.0, 1.0]])
    torch.library.opcheck(torch.ops.vitkern.patch_embed_fwd.default, (x, None, w, b, pos, prefix, True))
    torch.library.opcheck(torch.ops.vitkern.patch_embed_fwd.default, (x, norm, w, None, pos[1:], None, False))
    pixels = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    torch.library.opcheck(torch.ops.vitkern.patch_embed_fwd.default, (pixels, norm, w, b, pos, prefix, True))
    dout = torch.randn(2, 17, 8)
    for n in (None, norm):
        args = (dout, x.detach(), n, w.detach(), 1, True, True, True, True, True, True, True)
        torch.library.opcheck(torch.ops.vitkern.patch_embed_bwd.default, args)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_torch_compile_fullgraph_no_graph_breaks(backend):
    torch._dynamo.reset()
    emb = vitkern.nn.ViTEmbed(img_size=16, patch_size=4, embed_dim=32, reg_tokens=1)
    x = randn((2, 3, 16, 16), dtype=torch.float32, device="cpu", seed=seed_for("compile")).requires_grad_()
    with vitkern.use_backend(backend, op=OP):
        eager = emb(x)
        g_eager = torch.autograd.grad(eager.square().sum(), [x, emb.pos_embed, emb.cls_token])
        compiled = torch.compile(emb, fullgraph=True, backend="aot_eager")
        out = compiled(x)
        g = torch.autograd.grad(out.square().sum(), [x, emb.pos_embed, emb.cls_token])
    torch.testing.assert_close(out, eager)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_gpu_autocast_keeps_fp32_tokens(amp):
    """fp32 ViT-B/16 embedding under CUDA autocast: 16-bit patch GEMM, fp32 tokens (as timm's), every gradient."""
    run_parity("triton", 4, 3, 224, 224, 16, 768, "cls+reg4", False, torch.float32, device="cuda", autocast=amp)
    run_parity("triton", 4, 3, 224, 224, 16, 768, "cls", True, torch.float32, device="cuda", autocast=amp)


@pytest.mark.gpu
@pytest.mark.parametrize("prefix, no_embed_class", [("cls", False), ("cls+dist", False), ("cls+reg4", True),
                                                    ("none", False)])
@pytest.mark.parametrize("img, p", [(224, 16), (224, 14), (384, 16), (224, 32)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_triton_gpu_parity(dtype, img, p, prefix, no_embed_class):
    D = {16: 768, 14: 1280, 32: 384}[p]
    run_parity("triton", 3, 3, img, img, p, D, prefix, no_embed_class, dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.timeout(300)  # compiles every autotune config: over the suite's 120 s per test on a cold cache
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])  # tiling differs per config, not per dtype
def test_triton_gpu_every_config(dtype):
    """Every tile config of the forward and the input/weight gradient GEMMs (ViT-B/16 stem, class token), not only
    the one the autotuner picks or VITKERN_AUTOTUNE=0 runs."""
    run_every_triton_config(lambda: run_parity("triton", 3, 3, 224, 224, 16, 768, "cls", False, dtype, device="cuda"))


@pytest.mark.interpreter
@pytest.mark.parametrize("num_sms", [132, 2])
def test_interpreter_gpu_geometry_every_config(num_sms):
    """Every tile config of the forward and the input / weight gradient GEMMs, in the interpreter with the GPU
    path's tiles and split-K grids (2 SMs: more splits; vitkern.testing.gpu_geometry): parity, bounds and races of
    what test_triton_gpu_every_config runs, before a GPU does."""
    run_in_gpu_geometry(lambda: run_parity("triton", 2, 3, 64, 48, 16, 192, "cls", False, torch.float32, device="cpu"),
                        num_sms=num_sms)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_gpu_fp32_images_channels_last(dtype):
    run_parity("triton", 8, 3, 224, 224, 16, 768, "cls", False, dtype, device="cuda", x_dtype=torch.float32,
               channels_last=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_gpu_uint8_fused_normalisation(dtype):
    run_parity("triton", 8, 3, 224, 224, 16, 768, "cls", False, dtype, device="cuda", x_dtype=torch.uint8,
               norm=UINT8_NORM)


@pytest.mark.gpu
def test_gpu_default_dispatch_is_triton():
    x, w = torch.randn(2, 3, 224, 224, device="cuda"), torch.randn(768, 3, 16, 16, device="cuda", dtype=torch.bfloat16)
    assert vitkern.explain(patch_embed, x, w).backend_name in ("triton", "cuda")


@pytest.mark.gpu
@pytest.mark.slow
def test_triton_gpu_fuzz():
    g = torch.Generator().manual_seed(4321)
    pick = lambda seq: seq[int(torch.randint(0, len(seq), (1,), generator=g))]  # noqa: E731
    for _ in range(30):
        p = pick([4, 8, 14, 16, 32])
        gh, gw = int(torch.randint(1, 20, (1,), generator=g)), int(torch.randint(1, 20, (1,), generator=g))
        B, C = int(torch.randint(1, 9, (1,), generator=g)), pick([1, 3, 4])
        D = int(torch.randint(16, 1300, (1,), generator=g))
        prefix, nec = pick(list(PREFIXES)), pick([False, True])
        dtype = pick([torch.bfloat16, torch.float16, torch.float32])
        run_parity("triton", B, C, gh * p, gw * p, p, D, prefix, nec, dtype, device="cuda",
                   channels_last=pick([False, True]))


@pytest.mark.gpu
def test_gpu_torch_compile_and_deterministic_backward():
    emb = vitkern.nn.ViTEmbed(224, 16, embed_dim=768, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(16, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(torch.compile(emb, fullgraph=True)(x), emb(x), atol=0, rtol=0)
    gs = [torch.autograd.grad(emb(x).float().square().sum(), [emb.patch_embed.proj.weight]) for _ in range(2)]
    assert torch.equal(gs[0][0], gs[1][0])
