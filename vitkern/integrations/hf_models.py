"""Swap rules for Hugging Face transformers (5.x) ViT, DeiT (incl. ``DeiTForImageClassificationWithTeacher``), Dinov2
and Swin V1, and the ``attn_implementation="vitkern"`` registration.

Two entry points, one attention function (``vitkern.nn.hf_blocks.hf_attention_forward``):

- ``vitkern.optimize(model)``: module swaps (the modules are in ``vitkern/nn/hf_blocks.py``), each sharing the
  original's parameters, buffers, submodule names and hooks, so ``state_dict`` keys and tensors are unchanged:

    rule             family            HF module                          becomes
    hf.ViTLayer      ln_mlp            ViTLayer, DeiTLayer                HFViTLayer (+ its attention / LayerNorm)
    hf.Dinov2Layer   ln_mlp            Dinov2Layer (GELU MLP)             HFDinov2Layer (+ its attention / norm1)
    hf.SwinLayer     window_attention  SwinLayer                          HFSwinLayer (window kernel, ln_linear,
                                                                          ln_mlp when that family is on)
    hf.Attention     attention         ViTAttention, DeiTAttention,       HFAttention / HFDinov2SelfAttention
                                       Dinov2SelfAttention                (when the layer rule did not take it)
    hf.Embeddings    patch_embed       ViTEmbeddings, DeiTEmbeddings,     HFViTEmbeddings / HFDinov2Embeddings
                                       Dinov2Embeddings
    hf.SwinPatchEmbeddings  patch_embed  SwinPatchEmbeddings          HFSwinPatchEmbeddings (pad, then the fused
                                                                          projection; SwinEmbeddings' norm after)
  LayerNorms elsewhere (final norms, Swin patch merging) are swapped by the generic ``torch.nn.LayerNorm`` rule.
  The swapped attention modules call the vitkern function directly, whatever ``config._attn_implementation``
  says. One config change: a ViT/DeiT config on "sdpa" is switched to "vitkern" (registered under that new
  name, no other model affected), because the model builds its layers' mask with the config's mask function
  and HF's sdpa one materialises an all-True mask under torch.compile (see ``HFAttention``). ``vitkern.restore``
  (which puts the original modules back) undoes everything, that switch included.

- ``register_hf_attention()`` then ``from_pretrained(..., attn_implementation="vitkern")`` or
  ``model.set_attn_implementation("vitkern")``: HF's own modules call the same function through the registry
  (any model using ``ALL_ATTENTION_FUNCTIONS``; masks are built as for sdpa, but a mask with nothing to mask is
  None also under torch.compile: ``vitkern.nn.hf_blocks.hf_attention_mask``). Undo with
  ``model.set_attn_implementation("sdpa")``.

Classes are matched by module and name (transformers is never imported unless a model comes from it); a user
subclass of one of them is left alone, with the reason in the report.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from vitkern.integrations.swap import SwapOptions, SwapRule, register_rule
from vitkern.nn.hf_blocks import HF_ATTENTION

__all__ = ["HF_ATTENTION", "register_hf_attention"]


def register_hf_attention(name: str = HF_ATTENTION) -> str:
    """Register ``hf_attention_forward`` in transformers' ``AttentionInterface`` (and sdpa-style mask creation
    in ``AttentionMaskInterface``) under ``name``; returns ``name``. Idempotent.

    Afterwards ``AutoModel.from_pretrained(..., attn_implementation="vitkern")`` or
    ``model.set_attn_implementation("vitkern")`` route every attention call of the model through vitkern.
    """
    if not isinstance(name, str) or not name or "|" in name:
        raise ValueError(f"register_hf_attention: name must be a non-empty str without '|', got {name!r}")
    from vitkern.nn.hf_blocks import register_attention_implementation

    register_attention_implementation(name)
    return name


def _modeling(model: str) -> str:
    return f"transformers.models.{model}.modeling_{model}"


_VIT_LAYERS = {(_modeling("vit"), "ViTLayer"), (_modeling("deit"), "DeiTLayer")}
_DINOV2_LAYERS = {(_modeling("dinov2"), "Dinov2Layer")}
_SWIN_LAYERS = {(_modeling("swin"), "SwinLayer")}
_VIT_ATTENTIONS = {(_modeling("vit"), "ViTAttention"), (_modeling("deit"), "DeiTAttention")}
_DINOV2_ATTENTIONS = {(_modeling("dinov2"), "Dinov2SelfAttention")}
_SWIN_ATTENTIONS = {(_modeling("swin"), "SwinAttention")}
_VIT_EMBEDDINGS = {(_modeling("vit"), "ViTEmbeddings"), (_modeling("deit"), "DeiTEmbeddings")}
_DINOV2_EMBEDDINGS = {(_modeling("dinov2"), "Dinov2Embeddings")}
_SWIN_PATCH_EMBEDDINGS = {(_modeling("swin"), "SwinPatchEmbeddings")}


def _match(m: nn.Module, names: set[tuple[str, str]]) -> "bool | str":
    """True for exactly one of ``names`` (module, class), a reason for a user subclass of one, False otherwise
    (also for vitkern's own swapped classes, on a second optimize)."""
    t = type(m)
    base = next((b for b in t.__mro__ if (b.__module__, b.__name__) in names), None)
    if base is None or t.__module__ == "vitkern.nn.hf_blocks":
        return False
    if base is t:
        return True
    return f"{t.__qualname__} subclasses transformers' {base.__name__}: only that class itself is swapped"


def _missing(m: nn.Module, *paths: str) -> Optional[str]:
    for path in paths:
        obj = m
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is None:
            return f"{type(m).__name__} has no {path!r} (a transformers 5.x layout is expected)"
    return None


def _mlp_reason(act) -> Optional[str]:
    from vitkern.nn.hf_blocks import gelu_approximation

    if gelu_approximation(act) is None:
        return f"MLP activation {type(act).__name__} is not GELU (ln_mlp fuses GELU only)"
    return None


# --------------------------------------------------------------------------------------------------- encoder layers
def _vit_layer_accepts(m, parent, options: SwapOptions):
    verdict = _match(m, _VIT_LAYERS)
    if verdict is not True:
        return verdict
    why = _missing(m, "layernorm_before", "layernorm_after", "attention", "mlp.fc1", "mlp.fc2", "mlp.activation_fn",
                   "dropout")
    return why or _mlp_reason(m.mlp.activation_fn) or True


def _vit_layer_replace(m, parent, options: SwapOptions):
    from vitkern.nn.hf_blocks import HFViTLayer

    attention_ok = options.attention and _attention_accepts(m.attention, m, options) is True
    return HFViTLayer.from_hf(m, layer_norm=options.layer_norm, attention=attention_ok)


def _dinov2_layer_accepts(m, parent, options: SwapOptions):
    verdict = _match(m, _DINOV2_LAYERS)
    if verdict is not True:
        return verdict
    if type(m.mlp).__name__ != "Dinov2MLP":  # Dinov2SwiGLUFFN: its attention is still swapped (hf.Attention)
        return f"MLP {type(m.mlp).__name__} is not a GELU MLP (ln_mlp fuses fc1 -> GELU -> fc2 only)"
    why = _missing(m, "norm1", "norm2", "attention.attention", "layer_scale1", "layer_scale2.lambda1", "mlp.fc1",
                   "mlp.fc2", "mlp.activation", "drop_path")
    return why or _mlp_reason(m.mlp.activation) or True


def _dinov2_layer_replace(m, parent, options: SwapOptions):
    from vitkern.nn.hf_blocks import HFDinov2Layer

    attention_ok = options.attention and _attention_accepts(m.attention.attention, m.attention, options) is True
    return HFDinov2Layer.from_hf(m, layer_norm=options.layer_norm, attention=attention_ok)


def _swin_layer_accepts(m, parent, options: SwapOptions):
    verdict = _match(m, _SWIN_LAYERS)
    if verdict is not True:
        return verdict
    why = _missing(m, "layernorm_before", "layernorm_after", "mlp.fc1", "mlp.fc2", "mlp.activation_fn", "drop_path",
                   "dropout", "attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
                   "attention.relative_position_bias.relative_position_bias_table", "set_shift_and_window_size")
    if why:
        return why
    if _match(m.attention, _SWIN_ATTENTIONS) is not True:
        return f"its attention {type(m.attention).__qualname__} is not transformers' SwinAttention"
    a = m.attention
    if len({a.q_proj.bias is None, a.k_proj.bias is None, a.v_proj.bias is None}) != 1:
        return "q/k/v Linears mix bias and no bias (the packed qkv GEMM needs all or none)"
    return True


def _swin_layer_replace(m, parent, options: SwapOptions):
    from vitkern.nn.hf_blocks import HFSwinLayer

    fuse_mlp = options.ln_mlp and _mlp_reason(m.mlp.activation_fn) is None
    return HFSwinLayer.from_hf(m, layer_norm=options.layer_norm, fuse_mlp=fuse_mlp)


register_rule(SwapRule("hf.ViTLayer", ("ln_mlp",), _vit_layer_accepts, _vit_layer_replace,
                       ops=("ln_mlp",), priority=10))
register_rule(SwapRule("hf.Dinov2Layer", ("ln_mlp",), _dinov2_layer_accepts, _dinov2_layer_replace,
                       ops=("ln_mlp",), priority=10))
register_rule(SwapRule("hf.SwinLayer", ("window_attention",), _swin_layer_accepts, _swin_layer_replace,
                       ops=("window_attention",), priority=10))


# -------------------------------------------------------------------------------------------------------- attention
def _attention_accepts(m, parent, options: SwapOptions):
    for names, attrs in ((_VIT_ATTENTIONS, ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")),
                         (_DINOV2_ATTENTIONS, ("query", "key", "value", "num_attention_heads",
                                               "attention_head_size", "all_head_size", "scaling"))):
        verdict = _match(m, names)
        if verdict is True:
            return _missing(m, *attrs) or True
        if verdict:
            return verdict
    verdict = _match(m, _SWIN_ATTENTIONS)
    if verdict:
        return ("Swin's relative position bias + shift mask is an additive mask the plain attention kernel does "
                "not fuse; the SwinLayer swap (window_attention family) fuses the whole block")
    return False


def _attention_replace(m, parent, options: SwapOptions):
    from vitkern.nn.hf_blocks import HFAttention, HFDinov2SelfAttention

    cls = HFDinov2SelfAttention if _match(m, _DINOV2_ATTENTIONS) is True else HFAttention
    return cls.from_hf(m)


register_rule(SwapRule("hf.Attention", ("attention",), _attention_accepts, _attention_replace, ops=("attention",)))


# ------------------------------------------------------------------------------------------------------- embeddings
def _embeddings_accepts(m, parent, options: SwapOptions):
    verdict = _match(m, _VIT_EMBEDDINGS | _DINOV2_EMBEDDINGS)
    if verdict is not True:
        return verdict
    why = _missing(m, "patch_embeddings.projection", "cls_token", "position_embeddings", "dropout")
    if why:
        return why
    from vitkern.nn.patch_embed import patch_projection_reason

    return patch_projection_reason(m.patch_embeddings.projection, "patch_embeddings.projection") or True


def _embeddings_replace(m, parent, options: SwapOptions):
    from vitkern.nn.hf_blocks import HFDinov2Embeddings, HFViTEmbeddings

    cls = HFDinov2Embeddings if _match(m, _DINOV2_EMBEDDINGS) is True else HFViTEmbeddings
    return cls.from_hf(m)


register_rule(SwapRule("hf.Embeddings", ("patch_embed",), _embeddings_accepts, _embeddings_replace,
                       ops=("patch_embed",)))


def _swin_patch_embeddings_accepts(m, parent, options: SwapOptions):
    verdict = _match(m, _SWIN_PATCH_EMBEDDINGS)
    if verdict is not True:
        return verdict
    why = _missing(m, "projection", "patch_size")
    if why:
        return why
    from vitkern.nn.patch_embed import patch_projection_reason

    return patch_projection_reason(m.projection, "projection") or True


def _swin_patch_embeddings_replace(m, parent, options: SwapOptions):
    from vitkern.nn.hf_blocks import HFSwinPatchEmbeddings

    return HFSwinPatchEmbeddings.from_hf(m)


register_rule(SwapRule("hf.SwinPatchEmbeddings", ("patch_embed",), _swin_patch_embeddings_accepts,
                       _swin_patch_embeddings_replace, ops=("patch_embed",)))
