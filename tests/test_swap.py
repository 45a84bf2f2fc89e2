"""vitkern.optimize / restore: swaps keep parameters and state_dict, change nothing numerically, and undo cleanly."""

import copy

import pytest
import timm
import torch

import vitkern
from vitkern import reference
from vitkern.testing import assert_close


def _randomize(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("source", ["reference", "timm"])
def test_optimize_then_restore(source):
    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    if source == "timm":
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
    else:
        model = reference.create_model("vit_tiny_patch16_224", **kwargs)
    model = _randomize(model).eval()
    x = torch.randn(2, 3, 32, 32)
    keys = list(model.state_dict().keys())
    with torch.no_grad():
        before = model(x)
        ref64 = copy.deepcopy(model).double()(x.double())
    n_ln = sum(isinstance(m, torch.nn.LayerNorm) for m in model.modules())

    report = vitkern.optimize(model)
    swapped_ops = [op for _, op, _ in report.swapped]
    assert swapped_ops.count("layer_norm") == n_ln == 2 * 2 + 1
    # timm's Attention is swapped; the reference model's (which also yields attention maps) is left as it is
    assert swapped_ops.count("attention") == (2 if source == "timm" else 0)
    assert all(isinstance(m, vitkern.nn.LayerNorm) for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    assert list(model.state_dict().keys()) == keys
    assert "blocks.0.norm1" in str(report)
    with torch.no_grad():
        after = model(x)
    assert_close("optimized logits", after, ref64, before)

    assert vitkern.restore(model) == len(swapped_ops)
    assert not any(isinstance(m, (vitkern.nn.LayerNorm, vitkern.nn.Attention)) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=0, rtol=0)


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
    assert [p for p, _, _ in report.swapped] == ["1"]
    assert report.left and "overrides forward" in report.left[0][2]
