"""Model names -> random-init models, for ``vitkern bench`` / ``vitkern parity`` and the end-to-end benchmark.

Nothing is ever downloaded: every model is built from code with random weights. Accepted names:

- ``vit_base_patch16_224`` or ``timm:NAME``: ``timm.create_model(NAME, pretrained=False, **kwargs)``;
- ``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None, **kwargs)``; ``vit_*`` and
  ``swin_t|s|b`` are built from their class so that architecture kwargs (``num_layers=2``, ...) work too;
- ``hf:NAME`` (``hf:org/NAME`` too): a transformers model built from a config written here (:data:`HF_CONFIGS`);
  ``kwargs`` override config fields (``hidden_size=32``, ...);
- ``reference:NAME``: :func:`vitkern.reference.create_model` (the pure-PyTorch oracle models).

:func:`create_model` returns a :class:`BuiltModel`: the module, the input image size, the number of classes and
``forward(x) -> logits`` (HF models return a ``ModelOutput``; :func:`logits` unwraps any model's output).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib
from typing import Any

import torch
from torch import nn

PREFIXES = ("timm", "torchvision", "hf", "reference")

# hf:NAME -> (model class in transformers, config class, config fields). Sizes as in the hub models of that name,
# except Dinov2 at 224 px (the hub configs say 518; 224 gives the 257-token length the field notes list).
_VIT = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
_VIT_L = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
_DEIT_T = dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768)
_DEIT_S = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536)
_SWIN_T = dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7)
_SWIN_S = dict(_SWIN_T, depths=[2, 2, 18, 2])
_SWIN_B = dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=7)
HF_CONFIGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "vit-base-patch16-224": ("ViTForImageClassification", "ViTConfig", dict(_VIT)),
    "vit-base-patch16-384": ("ViTForImageClassification", "ViTConfig", dict(_VIT, image_size=384)),
    "vit-large-patch16-224": ("ViTForImageClassification", "ViTConfig", dict(_VIT_L)),
    "vit-large-patch16-384": ("ViTForImageClassification", "ViTConfig", dict(_VIT_L, image_size=384)),
    "deit-tiny-patch16-224": ("DeiTForImageClassification", "DeiTConfig", dict(_DEIT_T)),
    "deit-small-patch16-224": ("DeiTForImageClassification", "DeiTConfig", dict(_DEIT_S)),
    "deit-base-patch16-224": ("DeiTForImageClassification", "DeiTConfig", dict(_VIT)),
    "deit-tiny-distilled-patch16-224": ("DeiTForImageClassificationWithTeacher", "DeiTConfig", dict(_DEIT_T)),
    "deit-small-distilled-patch16-224": ("DeiTForImageClassificationWithTeacher", "DeiTConfig", dict(_DEIT_S)),
    "deit-base-distilled-patch16-224": ("DeiTForImageClassificationWithTeacher", "DeiTConfig", dict(_VIT)),
    "swin-tiny-patch4-window7-224": ("SwinForImageClassification", "SwinConfig", dict(_SWIN_T)),
    "swin-small-patch4-window7-224": ("SwinForImageClassification", "SwinConfig", dict(_SWIN_S)),
    "swin-base-patch4-window7-224": ("SwinForImageClassification", "SwinConfig", dict(_SWIN_B)),
    "swin-base-patch4-window12-384": ("SwinForImageClassification", "SwinConfig",
                                      dict(_SWIN_B, window_size=12, image_size=384)),
    "dinov2-small": ("Dinov2ForImageClassification", "Dinov2Config",
                     dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=224)),
    "dinov2-base": ("Dinov2ForImageClassification", "Dinov2Config",
                    dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, image_size=224)),
    "dinov2-large": ("Dinov2ForImageClassification", "Dinov2Config",
                     dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=224)),
}

# torchvision constructor arguments, for building a model with architecture overrides (its builders fix them)
_TV_VIT = {"vit_b_16": (16, 12, 12, 768, 3072), "vit_b_32": (32, 12, 12, 768, 3072),
           "vit_l_16": (16, 24, 16, 1024, 4096), "vit_l_32": (32, 24, 16, 1024, 4096),
           "vit_h_14": (14, 32, 16, 1280, 5120)}  # patch, layers, heads, hidden, mlp
_TV_SWIN = {"swin_t": (96, [2, 2, 6, 2], [3, 6, 12, 24], 0.2), "swin_s": (96, [2, 2, 18, 2], [3, 6, 12, 24], 0.3),
            "swin_b": (128, [2, 2, 18, 2], [4, 8, 16, 32], 0.5)}  # embed, depths, heads, stochastic depth


@dataclasses.dataclass
class BuiltModel:
    name: str  # as given
    source: str  # one of PREFIXES
    arch: str  # the name within its source
    module: nn.Module
    img_size: int
    num_classes: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes] of ``self.module`` (use :func:`logits` for a copy / compiled module)."""
        return logits(self.module(x))

    def example_input(self, batch: int, *, device: Any = None, dtype: torch.dtype | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(batch, 3, self.img_size, self.img_size, generator=generator).to(device=device, dtype=dtype)


def logits(out: Any) -> torch.Tensor:
    """The logits tensor of a model's output: a Tensor, a ``ModelOutput`` (``.logits``) or a tuple (first)."""
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find logits in a model output of type {type(out).__name__}")


def split_name(name: str) -> tuple[str, str]:
    """``"hf:google/vit-base-patch16-224"`` -> ``("hf", "vit-base-patch16-224")``; no prefix means timm."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    source, sep, arch = name.strip().partition(":")
    if not sep:
        return "timm", source
    if source not in PREFIXES:
        raise ValueError(f"unknown model source {source!r} in {name!r}; accepted: {_accepted()}")
    if source == "hf":
        arch = arch.rpartition("/")[2]
    return source, arch


def check_name(name: str) -> tuple[str, str]:
    """``split_name`` plus: the source knows the model (without building it); a ValueError says what is accepted."""
    source, arch = split_name(name)
    if source == "timm":
        import timm

        known, hint = timm.is_model(arch), f"timm.list_models('{arch.split('_')[0]}*') lists similar ones"
    elif source == "torchvision":
        import torchvision.models as tvm

        known, hint = arch in tvm.list_models(), "torchvision.models.list_models() lists them"
    elif source == "hf":
        known, hint = arch in HF_CONFIGS, f"known: {', '.join(HF_CONFIGS)}"
    else:
        from vitkern import reference

        known, hint = arch in reference.list_models(), f"known: {', '.join(reference.list_models())}"
    if not known:
        raise _unknown(name, source, hint)
    return source, arch


def _accepted() -> str:
    return ("NAME or timm:NAME (timm), torchvision:NAME, hf:NAME (names in vitkern.models.HF_CONFIGS), "
            "reference:NAME (vitkern.reference.list_models())")


def create_model(name: str, *, img_size: int | None = None, device: Any = None, dtype: torch.dtype | None = None,
                 **kwargs: Any) -> BuiltModel:
    """Build ``name`` with random weights (never downloads), in eval mode, on ``device`` in ``dtype``.

    ``img_size`` overrides the model's input size where the architecture has one; ``kwargs`` go to the
    constructor (timm, torchvision, reference) or override config fields (hf), e.g. tiny configs for tests.
    Parameters are initialised directly on ``device`` (a ViT-L initialised on the CPU takes seconds).
    """
    source, arch = check_name(name)
    build = {"timm": _timm, "torchvision": _torchvision, "hf": _hf, "reference": _reference}[source]
    with torch.device(device) if device is not None else contextlib.nullcontext():
        module, size, classes = build(arch, name, img_size, dict(kwargs))
    module = module.eval()
    if dtype is not None:
        module = module.to(dtype=dtype)
    return BuiltModel(name, source, arch, module, int(size), int(classes))


def _unknown(name: str, source: str, known: str) -> ValueError:
    return ValueError(f"unknown {source} model {name!r} ({known}); accepted names: {_accepted()}")


def _timm(arch: str, name: str, img_size: int | None, kwargs: dict) -> tuple[nn.Module, int, int]:
    import timm

    if img_size is not None:
        kwargs["img_size"] = img_size
    model = timm.create_model(arch, pretrained=False, **kwargs)
    size = img_size or kwargs.get("img_size") or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    if isinstance(size, (tuple, list)):
        size = size[-1]
    return model, size, model.num_classes


def _torchvision(arch: str, name: str, img_size: int | None, kwargs: dict) -> tuple[nn.Module, int, int]:
    import torchvision.models as tvm

    if arch in _TV_VIT:
        patch, layers, heads, hidden, mlp = _TV_VIT[arch]
        args = dict(image_size=img_size or 224, patch_size=patch, num_layers=layers, num_heads=heads,
                    hidden_dim=hidden, mlp_dim=mlp)
        args.update(kwargs)
        model = tvm.VisionTransformer(**args)
        size = args["image_size"]
    elif arch in _TV_SWIN:
        embed, depths, heads, sd = _TV_SWIN[arch]
        args = dict(patch_size=[4, 4], embed_dim=embed, depths=depths, num_heads=heads, window_size=[7, 7],
                    stochastic_depth_prob=sd)
        args.update(kwargs)
        model = tvm.SwinTransformer(**args)  # any input size works (padding to the window)
        size = img_size or 224
    else:
        model = tvm.get_model(arch, weights=None, **kwargs)
        size = img_size or getattr(model, "image_size", 224)
    classes = getattr(model, "num_classes", kwargs.get("num_classes", 1000))
    return model, size, classes


def _hf(arch: str, name: str, img_size: int | None, kwargs: dict) -> tuple[nn.Module, int, int]:
    import transformers

    model_cls, config_cls, fields = HF_CONFIGS[arch]
    fields = dict(fields, num_labels=1000)
    fields.update(kwargs)
    if img_size is not None:
        fields["image_size"] = img_size
    config = getattr(transformers, config_cls)(**fields)
    model = getattr(transformers, model_cls)(config)
    return model, config.image_size, config.num_labels


def _reference(arch: str, name: str, img_size: int | None, kwargs: dict) -> tuple[nn.Module, int, int]:
    from vitkern import reference

    if img_size is not None:
        kwargs["img_size"] = img_size
    config = reference.model_config(arch)
    model = reference.create_model(arch, **kwargs)
    size = kwargs.get("img_size", config.get("img_size", 224))
    return model, size, getattr(model, "num_classes", kwargs.get("num_classes", config.get("num_classes", 1000)))


def parse_kwargs(items: str | list[str] | tuple[str, ...] | None) -> dict[str, Any]:
    """``"depth=2;embed_dim=64"`` or ``["depth=2", "depths=(2, 2)"]`` -> kwargs; values are Python literals
    (``ast.literal_eval``), else strings. :func:`format_kwargs` writes the ``;``-joined form back."""
    if not items:
        return {}
    parts = items.split(";") if isinstance(items, str) else list(items)
    out: dict[str, Any] = {}
    for part in (p.strip() for p in parts):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(f"model argument {part!r}: expected KEY=VALUE, e.g. depth=2 or depths=(2,2)")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def format_kwargs(kwargs: dict[str, Any]) -> str:
    return ";".join(f"{k}={v!r}" for k, v in kwargs.items())


def disable_stochastic_depth(model: nn.Module) -> int:
    """Set every dropout / drop-path / stochastic-depth probability to 0, so two training runs are comparable.

    Covers ``nn.Dropout*`` and torchvision ``StochasticDepth`` (``p``), timm ``DropPath`` and HF ``*DropPath``
    (``drop_prob``), HF attention's ``dropout_prob`` and ``nn.MultiheadAttention.dropout``. Returns how many.
    """
    changed = 0
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) or type(m).__name__ == "StochasticDepth":
            attrs = ("p",)
        else:
            attrs = ("drop_prob", "dropout_prob", "dropout")
        for attr in attrs:
            value = getattr(m, attr, None)
            if isinstance(value, float) and value > 0:
                setattr(m, attr, 0.0)
                changed += 1
    return changed


def available_sources() -> dict[str, str]:
    """Which sources can build models here (the third-party libraries are optional)."""
    out = {}
    for source, mod in (("timm", "timm"), ("torchvision", "torchvision"), ("hf", "transformers")):
        try:
            out[source] = getattr(importlib.import_module(mod), "__version__", "?")
        except Exception as exc:  # noqa: BLE001 - absent or broken optional library
            out[source] = f"unavailable ({exc.__class__.__name__})"
    out["reference"] = "built in"
    return out


__all__ = ["PREFIXES", "HF_CONFIGS", "BuiltModel", "create_model", "logits", "split_name", "check_name", "parse_kwargs",
           "format_kwargs", "disable_stochastic_depth", "available_sources"]
