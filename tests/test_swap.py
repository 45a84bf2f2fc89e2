"""The swap engine (vitkern.optimize / restore): walk order, rule priorities, report, parameter sharing, undo."""

import pytest
import torch

import vitkern
from vitkern import reference
from vitkern.integrations import swap


def test_swapped_modules_share_parameters_for_training():
    model = reference.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    w = model.blocks[0].norm1.weight
    vitkern.optimize(model)
    assert model.blocks[0].norm1.weight is w
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_optimize_rejects_non_modules_and_reports_custom_subclasses():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        vitkern.optimize("vit")

    class FancyNorm(torch.nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    model = torch.nn.Sequential(FancyNorm(8), torch.nn.LayerNorm(8))
    report = vitkern.optimize(model)
    assert [s.path for s in report.swapped] == ["1"]
    ((path, rule, why),) = report.left
    assert (path, rule) == ("0", "torch.nn.LayerNorm") and why.endswith("FancyNorm overrides forward()")
    assert "0 (torch.nn.LayerNorm): " in str(report)


def test_only_layer_norms_of_the_same_math_are_swapped():
    """timm subclasses nn.LayerNorm for other math: LayerNorm2d normalises the channels of NCHW maps (with W == C a
    last-dim LayerNorm would run and be wrong), LayerNormAct adds an activation, LayerNormFp32 keeps the input dtype
    under autocast. Only timm's LayerNorm (F.layer_norm, or its fast_layer_norm) is taken."""
    timm_norm = pytest.importorskip("timm.layers.norm")
    timm_norm_act = pytest.importorskip("timm.layers.norm_act")
    model = torch.nn.Sequential(timm_norm.LayerNorm2d(8), timm_norm_act.LayerNormAct2d(8), timm_norm.LayerNormFp32(8),
                                timm_norm.LayerNorm(8), torch.nn.LayerNorm(8))
    x = torch.randn(2, 8, 5, 8)  # NCHW with W == C: LayerNorm2d run as a last-dim LayerNorm would not raise
    model[2:].requires_grad_(False)
    expected = model[:2](x)
    report = vitkern.optimize(model)
    assert [s.path for s in report.swapped] == ["3", "4"]
    assert [(path, why.rsplit(" ", 2)[0]) for path, _, why in report.left] == [
        ("0", "LayerNorm2d"), ("1", "LayerNormAct2d"), ("2", "LayerNormFp32")]
    torch.testing.assert_close(model[:2](x), expected, rtol=0, atol=0)


def test_report_names_replacement_rule_and_backend():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    report = vitkern.optimize(model)
    (entry,) = report.swapped
    assert (entry.path, entry.rule, entry.original) == ("1", "torch.nn.LayerNorm", "LayerNorm")
    assert entry.replacement == "vitkern.nn.layer_norm.LayerNorm"
    assert entry.backends == {"layer_norm": swap.preferred_backend("layer_norm", "cpu")}
    assert "1: LayerNorm -> vitkern.nn.layer_norm.LayerNorm (rule torch.nn.LayerNorm)" in str(report)
    assert report.count("torch.nn.") == 1 and report.count("timm.") == 0


def test_block_rules_take_priority_and_the_walk_stops_below_a_replaced_module():
    calls = []

    class Inner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(4)

        def forward(self, x):
            return self.norm(x)

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.norm = inner.norm  # same submodule name: state_dict keys unchanged

        def forward(self, x):
            calls.append("wrapped")
            return self.norm(x)

    rule = swap.register_rule(swap.SwapRule(
        "test.Inner", ("layer_norm",), lambda m, parent, o: type(m) is Inner,
        lambda m, parent, o: Wrapped(m), priority=5))
    try:
        model = torch.nn.Sequential(Inner(), torch.nn.LayerNorm(4))
        keys = list(model.state_dict())
        report = vitkern.optimize(model)
        assert [(s.path, s.rule) for s in report.swapped] == [("0", "test.Inner"), ("1", "torch.nn.LayerNorm")]
        assert type(model[0].norm) is torch.nn.LayerNorm  # not descended into: the block rule owns it
        assert list(model.state_dict()) == keys
        model(torch.randn(2, 4))
        assert calls == ["wrapped"]
        assert vitkern.restore(model) == 2 and type(model[0]) is Inner
    finally:
        swap._RULES.remove(rule)


def test_rules_validate_their_families():
    with pytest.raises(ValueError, match="unknown families"):
        swap.SwapRule("bad", ("flash",), lambda *a: False, lambda *a: None)


def test_a_rule_cannot_replace_the_root_module():
    with pytest.raises(ValueError, match="would replace the model itself"):
        vitkern.optimize(torch.nn.LayerNorm(8))


def test_restore_without_optimize_is_a_no_op():
    model = torch.nn.Sequential(torch.nn.LayerNorm(4))
    assert vitkern.restore(model) == 0 and type(model[0]) is torch.nn.LayerNorm


def test_hooks_on_a_replaced_module_keep_firing():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    seen = []
    model[1].register_forward_hook(lambda m, inp, out: seen.append(out.shape))
    vitkern.optimize(model)
    assert isinstance(model[1], vitkern.nn.LayerNorm)
    model(torch.randn(3, 4))
    assert seen == [torch.Size([3, 4])]


def test_explain_also_states_the_backward_choice():
    x = torch.randn(2, 10, 3 * 32)
    choice = vitkern.explain("attention", qkv=x, num_heads=2)
    assert choice.problem.direction == "forward" and choice.backward.problem.direction == "backward"
    assert "attention backward" in str(choice)


def _timm_model(name, **kwargs):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs)


TINY_VIT = dict(depth=2, img_size=32, patch_size=8, embed_dim=32, num_heads=2, num_classes=5)
TINY_SWIN = dict(embed_dim=16, depths=(2,), num_heads=(1,), window_size=4, img_size=24, num_classes=5)


@pytest.mark.parametrize("first, then", [("train", "eval"), ("eval", "train")])
def test_restore_brings_back_the_train_eval_mode_set_while_optimized(first, then):
    """model.train() / .eval() after optimize reach only the modules in the model; restore puts the replaced
    originals back in the mode the model is in now (timm decides attention dropout by the container's flag)."""
    model = _timm_model("vit_tiny_patch16_224", attn_drop_rate=0.5, **TINY_VIT).train(first == "train")
    vitkern.optimize(model)
    getattr(model, then)()
    vitkern.restore(model)
    assert {m.training for m in model.modules()} == {then == "train"}


def test_restore_after_a_dtype_move_moves_the_originals_own_buffers():
    """timm Swin's non-persistent attn_mask is not in vitkern's block (the kernel derives the mask): after
    optimize, .to(bf16), restore, it is bf16 like the rest of the model and the restored model runs."""
    model = _timm_model("swin_tiny_patch4_window7_224", **TINY_SWIN).eval()
    twin = _timm_model("swin_tiny_patch4_window7_224", **TINY_SWIN).eval().to(torch.bfloat16)
    vitkern.optimize(model)
    model.to(torch.bfloat16)
    vitkern.restore(model)
    masks = {n: b.dtype for n, b in model.named_buffers() if n.endswith("attn_mask") and b is not None}
    assert masks and set(masks.values()) == {torch.bfloat16}, masks
    x = torch.randn(2, 3, 24, 24).to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin(x), rtol=0, atol=0)  # the same modules, the same tensors


def test_a_second_optimize_swaps_nothing():
    """Modules vitkern put in own their subtree: the plain LayerNorms a fused block keeps (qk norms, norms folded
    into GEMMs) are not taken by the LayerNorm rule on a second call."""
    model = _timm_model("vit_tiny_patch16_224", qk_norm=True, **TINY_VIT).eval()
    first = vitkern.optimize(model)
    assert first.swapped and not vitkern.optimize(model).swapped
    assert vitkern.restore(model) == len(first.swapped)
