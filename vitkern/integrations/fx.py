"""torch.fx symbolic tracing of optimized models (torchvision's ``create_feature_extractor``, timm's FX features).

FX cannot trace *into* a vitkern module: its ops validate real tensors (dtype, strides, shapes) and the fused
blocks choose their path per call. Traced as leaves (one ``call_module`` node each) they run as they do eagerly, so
the graph computes what the optimized model computes and every node outside them keeps its name::

    from torchvision.models.feature_extraction import create_feature_extractor
    extractor = create_feature_extractor(model, ["encoder.ln"],
                                         tracer_kwargs={"leaf_modules": vitkern.integrations.fx_leaf_modules(model)})

A node *inside* a vitkern module (e.g. a fused block's ``ln_1``) is not in the graph; take the block's output or
extract from the model before ``optimize``. timm's FX feature extraction needs nothing: :func:`register_with_timm`
(run by ``optimize``) adds vitkern's classes to timm's no-trace registry.
"""

from __future__ import annotations

import inspect
from typing import Optional

from torch import nn


def _is_vitkern_class(cls: type) -> bool:
    return cls.__module__.split(".")[0] == "vitkern"


def fx_leaf_modules(model: Optional[nn.Module] = None) -> list[type]:
    """The vitkern module classes in ``model`` (all of ``vitkern.nn``'s when None), for an FX tracer's leaves."""
    if model is not None:
        found = {type(m) for m in model.modules() if _is_vitkern_class(type(m))}
    else:
        import vitkern.nn as vnn

        found = {obj for module in vars(vnn).values() if inspect.ismodule(module)
                 for obj in vars(module).values()
                 if inspect.isclass(obj) and issubclass(obj, nn.Module) and _is_vitkern_class(obj)}
    return sorted(found, key=lambda cls: f"{cls.__module__}.{cls.__qualname__}")


def register_with_timm(model: Optional[nn.Module] = None) -> None:
    """Add vitkern's module classes (those in ``model``, or all) to timm's FX no-trace registry, if timm is here."""
    try:
        from timm.layers import register_notrace_module
    except ImportError:
        return
    for cls in fx_leaf_modules(model):
        register_notrace_module(cls)
