"""Submodules that a fused block would compute without calling them (vitkern/nn/_hooks.py): hooks and adapters.

For each integration's block: a forward hook on the attention side or on the MLP's fc1 of one block of an
optimized model fires exactly as on the original model (same output, once per forward); a LoRA-style wrapper put
on a Linear after optimize (as PEFT does: its ``weight`` is the frozen base weight) is applied. That half of that
block runs unfused (the fused op is called once less) and every other block stays fused. Tiny random-init fp32
models on CPU (the reference backend): both paths compute in fp32 and differ by summation order only.
"""

from __future__ import annotations

import copy

import pytest
import torch

import vitkern
from vitkern import models
from vitkern.nn import hf_blocks, swin_block, torchvision_blocks, vit_block
from vitkern.testing import seed_for

pytest.importorskip("transformers")

TINY_VIT = dict(img_size=32, depth=2, embed_dim=32, num_heads=2)
TINY_HF_VIT = dict(img_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64)
# name -> (constructor overrides, the fused block class, its attention-side and MLP-side submodules). torchvision's
# attention modules never call their output Linear (torch MHA and shifted_window_attention use its weight), so a
# hook there cannot fire in the original: the hooked norm before them stands for the attention half.
CASES = {
    "timm_vit": ("vit_tiny_patch16_224", dict(TINY_VIT, init_values=0.5), vit_block.ViTBlock, "attn.proj", "mlp.fc1"),
    "timm_swin": ("swin_tiny_patch4_window7_224",
                  dict(img_size=64, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4),
                  swin_block.SwinBlock, "attn.proj", "mlp.fc1"),
    "torchvision_vit": ("torchvision:vit_b_16", dict(img_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                     hidden_dim=32, mlp_dim=64),
                        torchvision_blocks.TorchvisionEncoderBlock, "ln_1", "mlp.0"),
    "torchvision_swin": ("torchvision:swin_t", dict(img_size=40, embed_dim=16, depths=[2, 2], num_heads=[1, 2],
                                                    window_size=[4, 4]),
                         torchvision_blocks.TorchvisionSwinBlock, "norm1", "mlp.0"),
    "hf_vit": ("hf:google/vit-base-patch16-224", TINY_HF_VIT, hf_blocks.HFViTLayer, "attention.o_proj", "mlp.fc1"),
    "hf_dinov2": ("hf:dinov2-small", dict(img_size=28, hidden_size=32, num_hidden_layers=2, num_attention_heads=2),
                  hf_blocks.HFDinov2Layer, "attention.output.dense", "mlp.fc1"),
    "hf_swin": ("hf:swin-tiny-patch4-window7-224", dict(img_size=32, embed_dim=16, depths=[2, 2], num_heads=[1, 2],
                                                       window_size=4),
                hf_blocks.HFSwinLayer, "attention.o_proj", "mlp.fc1"),
}
FUSED = ("linear_residual", "ln_mlp")  # the ops of the attention half's end and of the MLP half


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the block modules' calls of the fused ops."""
    calls = dict.fromkeys(FUSED, 0)
    for module in (vit_block, swin_block, torchvision_blocks, hf_blocks):
        for name in FUSED:
            if hasattr(module, name):
                def spy(*args, _fn=getattr(module, name), _name=name, **kwargs):
                    calls[_name] += 1
                    return _fn(*args, **kwargs)

                monkeypatch.setattr(module, name, spy)
    return calls


def _build(case: str, tag: str) -> models.BuiltModel:
    name, kwargs, *_ = CASES[case]
    torch.manual_seed(seed_for(tag, case))
    built = models.create_model(name, **kwargs)
    with torch.no_grad():  # perturb everything (some libraries zero-initialise biases, heads and tables)
        for p in built.module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return built


def _first_block_path(model: torch.nn.Module, cls: type) -> str:
    return next(path for path, m in model.named_modules() if isinstance(m, cls))


def _logits(out) -> torch.Tensor:
    return models.logits(out)


@pytest.mark.parametrize("side", ["attention", "mlp"])
@pytest.mark.parametrize("case", list(CASES))
def test_hook_on_a_fused_submodule_fires_and_unfuses_only_that_half(case, side, fused_calls):
    name, kwargs, block_cls, attn_child, mlp_child = CASES[case]
    built = _build(case, "hooks")
    original = built.module
    optimized = copy.deepcopy(original)
    vitkern.optimize(optimized)
    x = built.example_input(2)
    block = _first_block_path(optimized, block_cls)
    child = f"{block}.{attn_child if side == 'attention' else mlp_child}"

    with torch.no_grad():
        _logits(optimized(x))
        unhooked = dict(fused_calls)
        assert all(n > 1 for n in unhooked.values()), unhooked  # every block fused, at least two blocks
        seen: dict[str, list[torch.Tensor]] = {"original": [], "optimized": []}
        for tag, model in (("original", original), ("optimized", optimized)):
            model.get_submodule(child).register_forward_hook(lambda m, a, out, _t=tag: seen[_t].append(out))
        for k in fused_calls:
            fused_calls[k] = 0
        got = _logits(optimized(x))
        want = _logits(original(x))

    assert len(seen["optimized"]) == len(seen["original"]) == 1, {k: len(v) for k, v in seen.items()}
    # fp32 on both sides, the same math in another summation order (fused epilogues, reference backend)
    got_hook, want_hook = seen["optimized"][0], seen["original"][0]
    if case == "timm_swin" and side == "attention":
        # timm projects the partitioned windows [B·nW, N, C]; vitkern's window attention projects the map
        # [B, H, W, C] after the window reverse (the same rows, in map order; no padding in this stage)
        got_hook, want_hook = got_hook.flatten().sort().values, want_hook.flatten().sort().values
    torch.testing.assert_close(got_hook, want_hook, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    unfused = "linear_residual" if side == "attention" else "ln_mlp"
    expected = dict(unhooked, **{unfused: unhooked[unfused] - 1})  # that half of that block only
    if case == "hf_swin" and side == "attention":  # HF's whole layer forward: only it pads, rolls and partitions
        expected["ln_mlp"] -= 1
    assert fused_calls == expected


def test_global_module_hook_unfuses_every_block(fused_calls):
    name, kwargs, *_ = CASES["timm_vit"]
    built = models.create_model(name, **kwargs)
    vitkern.optimize(built.module)
    x = built.example_input(1)
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, out: calls.append(type(m).__name__))
    try:
        with torch.no_grad():
            built.forward(x)
    finally:
        handle.remove()
    assert fused_calls == dict.fromkeys(FUSED, 0)
    assert "Linear" in calls and "GELU" in calls  # the block's layers ran as modules


def test_torchvision_unfused_parts_name_the_hook():
    name, kwargs, block_cls, attn_child, mlp_child = CASES["torchvision_vit"]
    built = models.create_model(name, **kwargs)
    vitkern.optimize(built.module)
    block = built.module.get_submodule(_first_block_path(built.module, block_cls))
    assert block.unfused_parts() == {}
    handle = block.get_submodule(mlp_child).register_forward_pre_hook(lambda m, a: None)
    assert block.unfused_parts() == {"ln_2+mlp": "a hook on ln_2 or the MLP, or its Linears are not plain nn.Linear"}
    handle.remove()
    block.get_submodule(attn_child).register_full_backward_hook(lambda m, gi, go: None)
    assert set(block.unfused_parts()) == {"ln_1+in_proj", "out_proj+residual"}


class _LoraLinear(torch.nn.Module):
    """A PEFT-like adapter: ``weight`` / ``bias`` are the base layer's, the output adds a low-rank term."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__()
        self.base_layer = base
        self.lora_a = torch.nn.Parameter(torch.randn(rank, base.in_features) * 0.1)
        self.lora_b = torch.nn.Parameter(torch.randn(base.out_features, rank) * 0.1)

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def forward(self, x):
        return self.base_layer(x) + x @ self.lora_a.t() @ self.lora_b.t()


# the Linears whose weights the fused halves read (case -> attention side, MLP side)
ADAPTED = {"timm_vit": ("attn.qkv", "mlp.fc1"), "timm_swin": ("attn.qkv", "mlp.fc2"),
           "torchvision_swin": (None, "mlp.3"), "torchvision_vit": (None, "mlp.0"),
           "hf_vit": ("attention.o_proj", "mlp.fc1"), "hf_dinov2": ("attention.output.dense", "mlp.fc2"),
           "hf_swin": ("attention.q_proj", "mlp.fc1")}


@pytest.mark.parametrize("side", [0, 1], ids=["attention", "mlp"])
@pytest.mark.parametrize("case", list(ADAPTED))
def test_adapter_put_in_after_optimize_is_applied(case, side, fused_calls):
    path = ADAPTED[case][side]
    if path is None:
        pytest.skip("torchvision's attention reads its qkv weights functionally (torch MHA's in_proj is a "
                    "parameter; shifted_window_attention takes qkv.weight): a wrapper there changes nothing")
    block_cls = CASES[case][2]
    built = _build(case, f"adapter{side}")
    original = built.module
    optimized = copy.deepcopy(original)
    vitkern.optimize(optimized)
    child = f"{_first_block_path(optimized, block_cls)}.{path}"
    parent, _, leaf = child.rpartition(".")
    adapter = _LoraLinear(optimized.get_submodule(child))
    setattr(optimized.get_submodule(parent), leaf, adapter)  # shares the base layer's parameters
    adapted_original = copy.deepcopy(original)
    setattr(adapted_original.get_submodule(parent), leaf, copy.deepcopy(adapter))
    adapted_original.get_submodule(child).base_layer = original.get_submodule(child)
    x = built.example_input(2)
    with torch.no_grad():
        got, want, plain = _logits(optimized(x)), _logits(adapted_original(x)), _logits(original(x))
    assert torch.linalg.norm(want - plain) > 1e-3 * torch.linalg.norm(plain)  # the adapter changes the output
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    unfused = "linear_residual" if side == 0 else "ln_mlp"
    assert fused_calls[unfused] >= 1  # the other blocks stay fused


# modules a swap rebuilds (LayerNorms, attention modules, patch embeddings) or a fused module bypasses, per model:
# a hook on them, registered before optimize (copied with the model) or after it (on the rebuilt module), must see
# the calls it sees in the original. "before" only: after the swap the module is vitkern's and runs other calls
# (timm Swin's attention on the whole map; the fused ViT patch embedding returns the whole token sequence).
REBUILT = {
    "timm_vit": [("blocks.0.norm1", "both"), ("blocks.0.attn", "both"), ("blocks.0.norm2", "both"),
                 ("blocks.0.attn.q_norm", "both"), ("patch_embed", "before"), ("patch_embed.proj", "both")],
    "timm_swin": [("layers.0.blocks.0.norm1", "both"), ("layers.0.blocks.0.attn", "before"),
                  ("layers.0.blocks.0.norm2", "both"), ("patch_embed.norm", "both"), ("patch_embed.proj", "both")],
    "torchvision_vit": [("encoder.layers.encoder_layer_0.ln_1", "both"),
                        ("encoder.layers.encoder_layer_0.self_attention", "both"),
                        ("encoder.layers.encoder_layer_0.ln_2", "both"), ("conv_proj", "both"), ("encoder", "both")],
    "torchvision_swin": [("features.1.0.norm1", "both"), ("features.1.0.attn", "both"), ("features.0.2", "both")],
    "hf_vit": [("vit.layers.0.layernorm_before", "both"), ("vit.layers.0.layernorm_after", "both")],
    "hf_dinov2": [("dinov2.encoder.layer.0.norm1", "both"), ("dinov2.encoder.layer.0.norm2", "both")],
    "hf_swin": [("swin.encoder.layers.0.blocks.0.layernorm_before", "both"), ("swin.embeddings.norm", "both")],
}


def _scaling_hook(shapes: list):
    """Records the output's shape and scales it (a lost hook changes the logits)."""
    def hook(module, args, out):
        first = out[0] if isinstance(out, tuple) else out
        shapes.append(tuple(first.shape))
        return (first * 1.5, *out[1:]) if isinstance(out, tuple) else out * 1.5
    return hook


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("case,path", [(c, p) for c, paths in REBUILT.items() for p, _ in paths])
def test_hook_on_a_rebuilt_or_bypassed_module_sees_the_originals_calls(case, path, when):
    if when == "after" and dict(REBUILT[case])[path] == "before":
        pytest.skip("after the swap this module is vitkern's and is called differently (see REBUILT)")
    built = _build(case, "rebuilt-hooks")
    original = built.module
    seen: dict[str, list] = {"original": [], "optimized": []}
    original.get_submodule(path).register_forward_hook(_scaling_hook(seen["original"]))
    optimized = copy.deepcopy(original)
    optimized.get_submodule(path)._forward_hooks.clear()  # the copied hook would record into the original's list
    if when == "before":  # on the module the swap rebuilds
        optimized.get_submodule(path).register_forward_hook(_scaling_hook(seen["optimized"]))
    vitkern.optimize(optimized)
    if when == "after":  # on the rebuilt module
        optimized.get_submodule(path).register_forward_hook(_scaling_hook(seen["optimized"]))
    x = built.example_input(2)
    with torch.no_grad():
        want, got = _logits(original(x)), _logits(optimized(x))
    assert seen["optimized"] == seen["original"] and seen["original"], seen  # same calls, same shapes
    # fp32 on both sides, the same math in another summation order (reference backend)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
