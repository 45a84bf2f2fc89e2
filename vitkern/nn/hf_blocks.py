"""Drop-ins for Hugging Face transformers' (5.x) ViT / DeiT / Dinov2 / Swin V1 modules, and the HF attention function.

``hf_attention_forward`` is an attention-interface function (``vitkern.integrations.hf_models.register_hf_attention``
registers it as ``attn_implementation="vitkern"``): HF's q/k/v [B, H, N, D] go to ``vitkern.functional.attention``
(separate q/k/v in the "bnhd" layout: HF's projections are [B, N, H·D] Linear outputs, so the kernel reads them by
strides and writes the [B, N, H, D] HF wants, no copy). What it cannot fuse runs what HF would: an attention mask,
causal attention, a position bias or grouped k/v heads go to HF's own ``sdpa_attention_forward``; when the
probabilities are wanted (``output_attentions``, ``vitkern.nn.attention_maps``, a ``head_mask``) a plain eager path
computes and returns them (HF's eager semantics: fp32 softmax, dropout on the returned weights).

The module classes are *mixins* put in front of the HF class they replace: ``HFViTLayer.from_hf(layer)`` builds
``VitkernViTLayer(HFViTLayer, ViTLayer)`` (once per HF class) and an instance that shares the original's parameters,
buffers, submodules and hook dicts (no copy; same state_dict keys). So HF's output capturing (``output_hidden_states``
/ ``output_attentions`` hooks, installed by isinstance on ``_can_record_outputs`` classes, possibly before the swap),
gradient checkpointing (``GradientCheckpointingLayer.__call__``) and user hooks keep working, and every slow path
is HF's own ``forward`` (``super().forward``) running on the swapped children.

- ``HFAttention`` (ViT/DeiT ``*Attention``), ``HFDinov2SelfAttention``, ``HFSwinAttention``: HF's forward with the
  attention call fixed to ``hf_attention_forward`` (whatever ``config._attn_implementation`` says); they record maps.
- ``HFViTLayer`` (ViT/DeiT), ``HFDinov2Layer``: the attention's output Linear (+ layer scale) + residual in one
  ``linear_residual`` and ``layernorm_after`` + MLP (+ layer scale) + residual in one ``vitkern.functional.ln_mlp``;
  hidden dropout / drop path active in training: HF's forward (attention dropout is applied by the attention op
  itself, on its eager path).
- Hooks: a fused half computes some modules' outputs without calling them, so a hook on one of them (other than
  HF's own output capturing, inert unless outputs are collected) makes that half call them (``vitkern.nn._hooks``);
  collecting ViT/DeiT attention probabilities calls the attention module too (HF captures them there).
- ``HFSwinLayer``: LayerNorm + the q/k/v GEMM (weights concatenated in-graph, see below) + ``window_attention`` with
  HF's pad-then-roll order (``pad_first=True``), the shift mask and relative position bias in-kernel, + o_proj and
  the residual in one ``linear_residual``, then ``ln_mlp``. HF's shrinking rule (``set_shift_and_window_size``) is applied as HF does; a window that then
  differs from the bias table's (HF itself fails there), probabilities wanted, or dropout / drop path in training:
  HF's forward. HF's in-place window/shift change is handed back to the original layer on restore.
- ``HFViTEmbeddings`` (ViT/DeiT), ``HFDinov2Embeddings``: ``vitkern.functional.patch_embed`` (patch GEMM + bias +
  class/distillation tokens + position embedding); masked tokens, an interpolated position embedding, a wrong
  image size (HF raises), dropout in training: HF's forward.

Why separate q/k/v for ViT/DeiT/Dinov2 and an in-graph weight concat only for Swin: the attention kernel reads
separate q/k/v by strides as cheaply as a packed qkv, so the HF Linears are used as they are: no second copy of
the weights, no cache to invalidate (``load_state_dict``, optimizers, ``.to()``), nothing torch.compile must
guard, identical in training and inference. What that gives up is LayerNorm folded into the qkv GEMM. Swin's
window kernel takes only a packed qkv, so there the three weights are concatenated in the graph each call
(3·C² elements per block, small next to the activations at the batch sizes that matter; gradients flow to each
Linear), and since that concatenated GEMM exists anyway the LayerNorm is fused into it (``ln_linear``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkern.functional.attention import attention
from vitkern.functional.linear_residual import linear_residual
from vitkern.functional.ln_mlp import ln_linear, ln_mlp
from vitkern.functional.patch_embed import patch_embed, whole_patches
from vitkern.functional.window_attention import window_attention
from vitkern.nn._hooks import mlp_must_call, must_call
from vitkern.nn.attention_maps import RecordsAttentionMaps
from vitkern.nn.layer_norm import LayerNorm, layer_norm_reason
from vitkern.nn.patch_embed import patch_projection_reason
from vitkern.validation import FLOAT_DTYPES

__all__ = ["hf_attention_forward", "HFAttention", "HFDinov2SelfAttention", "HFSwinAttention",
           "HFViTLayer", "HFDinov2Layer", "HFSwinLayer", "HFViTEmbeddings", "HFDinov2Embeddings"]

_HF: dict[str, Any] = {}  # transformers objects bound once, outside any traced code (see _bind_transformers)
HF_ATTENTION = "vitkern"  # the attn_implementation name under which vitkern registers itself


def _bind_transformers() -> None:
    """Import the transformers pieces the forward paths use (lazily: transformers is optional)."""
    if _HF:
        return
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import bidirectional_mask_function, sdpa_mask
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # older transformers: no hook-based output capturing; output_attentions arrives as a kwarg
        _active_collector = None
    _HF.update(sdpa=sdpa_attention_forward, collector=_active_collector, sdpa_mask=sdpa_mask,
               bidirectional=bidirectional_mask_function)


def hf_attention_mask(*args, **kwargs):
    """The mask function registered with ``hf_attention_forward`` (transformers' ``AttentionMaskInterface``): HF's
    ``sdpa_mask``, except that a plain bidirectional mask with no padding mask is None also while tracing.

    ``sdpa_mask`` skips such a mask only outside tracing (its skip test reads the padding mask's values, which
    torch.compile cannot branch on, and it applies the test even when there is no padding mask). Under
    torch.compile it then materialises an all-True [B, 1, N, N] mask, and a masked call cannot take the fused
    kernel. Without a padding mask nothing is data-dependent, so None is exact there, compiled or not."""
    if (not args and kwargs.get("attention_mask") is None and kwargs.get("allow_is_bidirectional_skip")
            and kwargs.get("local_size") is None and kwargs.get("mask_function") is _HF["bidirectional"]):
        return None
    return _HF["sdpa_mask"](*args, **kwargs)


def register_attention_implementation(name: str) -> None:
    """Add ``hf_attention_forward`` and ``hf_attention_mask`` to transformers' registries under ``name`` (a new
    name: no other model's attention changes)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    _bind_transformers()
    AttentionInterface.register(name, hf_attention_forward)
    # a mask function is required: without one transformers silently drops a user's attention_mask for this name
    AttentionMaskInterface.register(name, hf_attention_mask)


def _collecting_attentions() -> bool:
    """Whether the enclosing HF forward collects attention probabilities (``output_attentions=True``, also when it
    comes from the config and so never reaches the layers as a kwarg)."""
    collector = _HF.get("collector")
    if collector is None:
        return False
    if torch.compiler.is_compiling():  # dynamo cannot trace ContextVar.get; HF's wrapper uses the global then
        collected = collector.global_var if getattr(collector, "compiling", False) else None
    else:
        collected = collector.get()
    return isinstance(collected, dict) and "attentions" in collected


def _wants_weights(kwargs: dict) -> bool:
    return bool(kwargs.get("output_attentions")) or _collecting_attentions()


# ----------------------------------------------------------------------------------- the attention-interface function
def _is_causal(module: nn.Module, query: Tensor, attention_mask: Optional[Tensor], kwargs: dict) -> bool:
    """HF sdpa's rule: causal when asked (kwarg, else ``module.is_causal``, default True) with no mask and q_len > 1."""
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    return bool(is_causal) and attention_mask is None and query.shape[2] > 1


def _fusable(module, query, key, value, attention_mask, scaling, kwargs) -> bool:
    return (attention_mask is None and not _is_causal(module, query, None, kwargs)
            and kwargs.get("position_bias") is None and kwargs.get("head_mask") is None
            and isinstance(scaling, (int, float)) and not isinstance(scaling, bool)
            and query.dtype in FLOAT_DTYPES and key.dtype == query.dtype and value.dtype == query.dtype
            and key.shape[1] == query.shape[1]  # grouped k/v heads (GQA): HF's sdpa path repeats them
            and key.shape[-1] == query.shape[-1] == value.shape[-1])


def _eager(module, query, key, value, attention_mask, scaling, dropout, recorder, kwargs):
    """Plain attention returning the probabilities (HF eager: fp32 softmax, dropout on the returned weights)."""
    if key.shape[1] != query.shape[1]:  # grouped k/v heads
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    lowest = torch.finfo(query.dtype).min
    bias = attention_mask
    if bias is not None and bias.dtype == torch.bool:  # sdpa-style mask (True = attend) -> additive
        bias = torch.zeros(bias.shape, dtype=query.dtype, device=query.device).masked_fill(~bias, lowest)
    if _is_causal(module, query, attention_mask, kwargs):  # sdpa's top-left aligned causal mask
        keep = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
        bias = torch.zeros(keep.shape, dtype=query.dtype, device=query.device).masked_fill(~keep, lowest)
    if kwargs.get("position_bias") is not None:
        bias = kwargs["position_bias"] if bias is None else bias + kwargs["position_bias"]
    if recorder is not None:
        probs = recorder._record_probs(query, key, float(scaling), bias)
    else:
        logits = torch.matmul(query, key.transpose(2, 3)) * scaling
        if bias is not None:
            logits = logits + bias
        probs = F.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    if kwargs.get("head_mask") is not None:  # transformers 4.x's per-head mask on the probabilities
        probs = probs * kwargs["head_mask"]
    if dropout > 0:
        probs = F.dropout(probs, p=dropout, training=True)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def hf_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, Optional[Tensor]]:
    """HF attention-interface function: q/k/v [B, H, N, D] -> ([B, N, H, D], probabilities or None).

    Fused (``vitkern.functional.attention``) when there is nothing it cannot express; see the module docstring
    for the fallbacks. ``dropout`` is applied only when ``module.training`` (as HF's eager function does).
    """
    _bind_transformers()
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if not getattr(module, "training", True):
        dropout = 0.0
    recorder = module if isinstance(module, RecordsAttentionMaps) and module._vitkern_attn_maps is not None else None
    want_weights = recorder is not None or kwargs.get("head_mask") is not None or _wants_weights(kwargs)
    if not want_weights and _fusable(module, query, key, value, attention_mask, scaling, kwargs):
        out = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), layout="bnhd",
                        scale=float(scaling), dropout_p=float(dropout))
        return out, None
    if not want_weights:
        return _HF["sdpa"](module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    return _eager(module, query, key, value, attention_mask, scaling, dropout, recorder, kwargs)


# ------------------------------------------------------------------------------------------------ swapping machinery
_CLASSES: dict[tuple[type, type], type] = {}


def _swapped_class(mixin: type, base: type) -> type:
    """``Vitkern<Base>(mixin, base)``, created once per pair: isinstance(new, base) holds for HF's hooks."""
    cls = _CLASSES.get((mixin, base))
    if cls is None:
        name = f"Vitkern{base.__name__}"
        cls = type(name, (mixin, base), {"__module__": __name__, "__qualname__": name})
        _CLASSES[(mixin, base)] = cls
    return cls


def _rebuild(mixin: type, base: type) -> nn.Module:
    """Unpickling / deepcopy: a bare instance of the swapped class (its __dict__ is restored by __setstate__).
    Registers vitkern's attention implementation: a config switched to it may come with the model."""
    register_attention_implementation(HF_ATTENTION)
    cls = _swapped_class(mixin, base)
    return cls.__new__(cls)


def gelu_approximation(act: Any) -> Optional[str]:
    """F.gelu's ``approximate`` for an HF / torch GELU activation module, None for any other activation."""
    if isinstance(act, nn.GELU):
        return act.approximate
    if type(act).__module__ == "transformers.activations":
        if type(act).__name__ == "GELUActivation":  # F.gelu or its Python erf form
            return "none"
        if type(act).__name__ in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation"):  # the tanh formula
            return "tanh"
    return None


class _SwappedHF:
    """Base of the mixins: builds the swapped instance (sharing everything with the HF module) and pickles it."""

    vitkern_ops: tuple[str, ...] = ()

    @classmethod
    def from_hf(cls, module: nn.Module):
        if isinstance(module, _SwappedHF):
            raise TypeError(f"{cls.__name__}.from_hf: {type(module).__name__} is already a vitkern module")
        _bind_transformers()
        klass = _swapped_class(cls, type(module))
        new = klass.__new__(klass)
        state = dict(module.__dict__)  # plain attributes (config, sizes, training) and the hook dicts: shared
        for name in ("_parameters", "_buffers", "_modules"):  # own containers: a child swapped here stays here
            state[name] = dict(state[name])
        state["_non_persistent_buffers_set"] = set(state["_non_persistent_buffers_set"])
        new.__dict__.update(state)
        return new

    def __reduce_ex__(self, protocol):
        mixin, base = type(self).__bases__
        return _rebuild, (mixin, base), dict(self.__dict__)


def _same_dtype(x: Tensor, *params: Optional[Tensor]) -> bool:
    return all(p is None or p.dtype == x.dtype for p in params)


def _attention_dropout_active(attn: nn.Module) -> bool:
    return attn.training and float(getattr(attn, "attention_dropout", getattr(attn, "dropout_prob", 0.0)) or 0.0) > 0


def _drop_path_active(drop_path: nn.Module) -> bool:
    return drop_path.training and not isinstance(drop_path, nn.Identity) and getattr(drop_path, "drop_prob", 1.0) > 0


_HF_CAPTURE_HOOKS = ("transformers.utils.output_capturing",)  # inert unless outputs are collected (_wants_weights)


def _bypassable(*modules: nn.Module, linears: tuple[nn.Module, ...] = ()) -> bool:
    """Whether a fused path may compute these modules' outputs without calling them (``vitkern.nn._hooks``)."""
    return not must_call(*modules, linears=linears, ignoring=_HF_CAPTURE_HOOKS)


# ------------------------------------------------------------------------------------------------------ attention
class HFAttention(_SwappedHF, RecordsAttentionMaps):
    """ViT / DeiT ``*Attention`` (``q_proj``/``k_proj``/``v_proj``/``o_proj``) calling ``hf_attention_forward``.

    The model builds the mask these layers get (``create_bidirectional_mask``) with the mask function of
    ``config._attn_implementation``. HF's "sdpa" one materialises an all-True mask under torch.compile, and a
    masked call is not fused, so a config on "sdpa" is switched to "vitkern" (same masks, None when there is
    nothing to mask; the same function for any attention module left unswapped) and switched back by restore.
    Any other implementation the user chose (e.g. "eager", needed for ``config.output_attentions``) stays: those
    models run fused in eager mode, and under torch.compile HF's mask sends attention to HF's own path."""

    vitkern_ops = ("attention",)

    @classmethod
    def from_hf(cls, module: nn.Module):
        new = super().from_hf(module)
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation", None) == "sdpa":
            register_attention_implementation(HF_ATTENTION)
            config._attn_implementation = HF_ATTENTION
            new._vitkern_config_attn = "sdpa"  # what restore puts back
        return new

    def _vitkern_undo(self, parent: nn.Module, original: nn.Module) -> None:
        """Put the config's attention implementation back (unless the user changed it since)."""
        config, before = getattr(self, "config", None), self.__dict__.get("_vitkern_config_attn")
        if before is not None and getattr(config, "_attn_implementation", None) == HF_ATTENTION:
            config._attn_implementation = before

    def attend(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, **kwargs):
        """Everything but ``o_proj``: ([B, N, H·D], probabilities or None)."""
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, H, N, D] views of [B, N, H·D]
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        out, weights = hf_attention_forward(self, q, k, v, attention_mask, scaling=self.scaling,
                                            dropout=self.attention_dropout if self.training else 0.0, **kwargs)
        return out.reshape(*input_shape, -1), weights

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, **kwargs):
        out, weights = self.attend(hidden_states, attention_mask, **kwargs)
        return self.o_proj(out), weights


class HFDinov2SelfAttention(_SwappedHF, RecordsAttentionMaps):
    """Dinov2 ``Dinov2SelfAttention`` (``query``/``key``/``value``; the output Linear is its sibling)."""

    vitkern_ops = ("attention",)

    def forward(self, hidden_states: Tensor, **kwargs):
        shape = hidden_states.shape[0], -1, self.num_attention_heads, self.attention_head_size
        k = self.key(hidden_states).view(*shape).transpose(1, 2)
        v = self.value(hidden_states).view(*shape).transpose(1, 2)
        q = self.query(hidden_states).view(*shape).transpose(1, 2)
        kwargs.setdefault("is_causal", self.is_causal)
        out, probs = hf_attention_forward(self, q, k, v, None, scaling=self.scaling,
                                          dropout=self.dropout_prob if self.training else 0.0, **kwargs)
        return out.reshape(out.shape[:-2] + (self.all_head_size,)), probs


class HFSwinAttention(_SwappedHF, RecordsAttentionMaps):
    """Swin ``SwinAttention`` on partitioned windows [B·nW, N, C]: relative position bias (+ shift mask) as an
    additive mask, so ``hf_attention_forward`` takes HF's sdpa / eager path. It is the eager path (and the
    attention-map recorder) of :class:`HFSwinLayer`, whose fused path does not call it."""

    vitkern_ops = ("attention",)

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        bias = self.relative_position_bias()  # [1, heads, N, N]
        if attention_mask is not None:  # shift mask [nW, N, N] -> [B·nW, 1, N, N], HF's layout
            nw, n = attention_mask.shape[0], input_shape[1]
            mask = attention_mask[None, :, None].expand(input_shape[0] // nw, -1, -1, -1, -1).reshape(-1, 1, n, n)
            bias = bias + mask
        out, weights = hf_attention_forward(self, q, k, v, bias, scaling=self.scaling,
                                            dropout=self.attention_dropout if self.training else 0.0, **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1)), weights


# ------------------------------------------------------------------------------------------------ encoder layers
def _mlp_tail(h: Tensor, norm: nn.Module, fc1: nn.Linear, fc2: nn.Linear, scale: Optional[Tensor], approximate: str):
    """h + scale · fc2(gelu(fc1(norm(h)))): the second half of a pre-norm block, one fused op."""
    return ln_mlp(h, norm.weight, norm.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias, scale, norm.eps, approximate)


def _check_mlp(name: str, norm: nn.Module, fc1: nn.Module, fc2: nn.Module, act: nn.Module) -> str:
    norm_reason = layer_norm_reason(norm, "the norm before the MLP")
    if norm_reason:
        raise TypeError(f"{name}: {norm_reason}")
    if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)):
        raise TypeError(f"{name}: expected the MLP's fc1 / fc2 to be nn.Linear")
    approx = gelu_approximation(act)
    if approx is None:
        raise ValueError(f"{name}: the MLP activation {type(act).__name__} is not GELU (ln_mlp fuses GELU only)")
    return approx


class HFViTLayer(_SwappedHF):
    """ViT / DeiT encoder layer: LayerNorm -> attention (o_proj + residual in one ``linear_residual``), then
    ``layernorm_after`` + MLP + residual in one ``ln_mlp``. Hidden dropout active in training: HF's forward (on the
    swapped children). The attention module itself is called (o_proj and the residual add unfused) when its
    probabilities are collected or a hook other than HF's output capturing sits on it or its o_proj."""

    @classmethod
    def from_hf(cls, layer: nn.Module, *, layer_norm: bool = True, attention: bool = True):
        approx = _check_mlp(f"{cls.__name__}.from_hf", layer.layernorm_after, layer.mlp.fc1, layer.mlp.fc2,
                            layer.mlp.activation_fn)
        new = super().from_hf(layer)
        new._vitkern_gelu = approx
        ops = ["ln_mlp"]
        new.layernorm_before = LayerNorm.swap_in(layer.layernorm_before) if layer_norm else layer.layernorm_before
        if new.layernorm_before is not layer.layernorm_before:
            ops.append("layer_norm")
        if attention and not isinstance(layer.attention, _SwappedHF):
            new.attention = HFAttention.from_hf(layer.attention)
            ops.append("attention")
        if isinstance(new.attention, HFAttention) and type(new.attention.o_proj) is nn.Linear:
            ops.append("linear_residual")
        new.vitkern_ops = tuple(ops)
        return new

    def _vitkern_undo(self, parent: nn.Module, original: nn.Module) -> None:
        if isinstance(self.attention, HFAttention) and self.attention is not original.attention:
            self.attention._vitkern_undo(self, original.attention)

    def _attention_residual(self, hidden_states: Tensor, attention_mask: Optional[Tensor], kwargs: dict) -> Tensor:
        """hidden_states + attention(layernorm_before(hidden_states))."""
        attn, x = self.attention, self.layernorm_before(hidden_states)
        if (isinstance(attn, HFAttention) and not _wants_weights(kwargs) and _bypassable(attn, linears=(attn.o_proj,))
                and _same_dtype(hidden_states, attn.o_proj.weight, attn.o_proj.bias)):
            o, _ = attn.attend(x, attention_mask, **kwargs)
            return linear_residual(o, attn.o_proj.weight, attn.o_proj.bias, hidden_states)
        h, _ = attn(x, attention_mask, **kwargs)
        return h + hidden_states

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, **kwargs):
        if self.training and self.dropout.p > 0:
            return super().forward(hidden_states, attention_mask, **kwargs)
        h = self._attention_residual(hidden_states, attention_mask, kwargs)
        norm, mlp = self.layernorm_after, self.mlp
        if _same_dtype(h, norm.weight, norm.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias) and \
                not mlp_must_call(norm, mlp, mlp.fc1, mlp.fc2, ignoring=_HF_CAPTURE_HOOKS):
            return _mlp_tail(h, norm, mlp.fc1, mlp.fc2, None, self._vitkern_gelu)
        return mlp(norm(h)) + h


class HFDinov2Layer(_SwappedHF):
    """Dinov2 layer: norm1 -> attention, its output dense + layer_scale1 + residual in one ``linear_residual``, then
    norm2 + MLP + layer_scale2 + residual in one ``ln_mlp``. Drop path active in training: HF's forward. The
    self-attention is always called (HF captures probabilities there); its wrapper, the output dense and the layer
    scale are computed without being called unless a hook other than HF's output capturing sits on one of them, or
    the output dropout is active."""

    @classmethod
    def from_hf(cls, layer: nn.Module, *, layer_norm: bool = True, attention: bool = True):
        approx = _check_mlp(f"{cls.__name__}.from_hf", layer.norm2, layer.mlp.fc1, layer.mlp.fc2,
                            layer.mlp.activation)
        new = super().from_hf(layer)
        new._vitkern_gelu = approx
        ops = ["ln_mlp"]
        new.norm1 = LayerNorm.swap_in(layer.norm1) if layer_norm else layer.norm1
        if new.norm1 is not layer.norm1:
            ops.append("layer_norm")
        inner = layer.attention.attention  # Dinov2Attention = attention (Dinov2SelfAttention) + output
        if attention and not isinstance(inner, _SwappedHF):
            new.attention = _shallow_with_child(layer.attention, "attention", HFDinov2SelfAttention.from_hf(inner))
            ops.append("attention")
        if isinstance(new.attention.attention, HFDinov2SelfAttention) and type(
                new.attention.output.dense) is nn.Linear and _is_dinov2_layer_scale(new.layer_scale1):
            ops.append("linear_residual")
        new.vitkern_ops = tuple(ops)
        return new

    def _attention_residual(self, hidden_states: Tensor) -> Tensor:
        """hidden_states + layer_scale1(attention(norm1(hidden_states)))."""
        outer, ls1, x = self.attention, self.layer_scale1, self.norm1(hidden_states)
        inner, out = outer.attention, outer.output
        dense = out.dense
        if (isinstance(inner, HFDinov2SelfAttention) and _is_dinov2_layer_scale(ls1)
                and not (out.training and out.dropout.p > 0) and _bypassable(outer, out, ls1, linears=(dense,))
                and _same_dtype(hidden_states, dense.weight, dense.bias, ls1.lambda1)):
            o, _ = inner(x)  # called: HF captures the probabilities from this module
            return linear_residual(o, dense.weight, dense.bias, hidden_states, ls1.lambda1)
        return ls1(outer(x)) + hidden_states

    def forward(self, hidden_states: Tensor):
        if _drop_path_active(self.drop_path):
            return super().forward(hidden_states)
        h = self._attention_residual(hidden_states)
        norm, mlp, ls2 = self.norm2, self.mlp, self.layer_scale2
        if _same_dtype(h, norm.weight, norm.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias,
                       ls2.lambda1) and not mlp_must_call(norm, mlp, mlp.fc1, mlp.fc2, ls2,
                                                             ignoring=_HF_CAPTURE_HOOKS):
            return _mlp_tail(h, norm, mlp.fc1, mlp.fc2, ls2.lambda1, self._vitkern_gelu)
        return ls2(mlp(norm(h))) + h


def _is_dinov2_layer_scale(m: nn.Module) -> bool:
    return type(m).__name__ == "Dinov2LayerScale" and isinstance(getattr(m, "lambda1", None), Tensor)


def _shallow_with_child(module: nn.Module, name: str, child: nn.Module) -> nn.Module:
    """A copy of container ``module`` (same class, same parameters and hooks) with child ``name`` replaced, so the
    original container keeps its own child (restore needs nothing)."""
    new = type(module).__new__(type(module))
    state = dict(module.__dict__)
    for key in ("_parameters", "_buffers", "_modules"):
        state[key] = dict(state[key])
    state["_non_persistent_buffers_set"] = set(state["_non_persistent_buffers_set"])
    new.__dict__.update(state)
    setattr(new, name, child)
    return new


class HFSwinLayer(_SwappedHF):
    """Swin V1 block (HF ``SwinLayer``): the attention half as one ``window_attention`` between the qkv GEMM and
    o_proj, the MLP half as one ``ln_mlp`` (see the module docstring for what runs HF's forward instead)."""

    @classmethod
    def from_hf(cls, layer: nn.Module, *, layer_norm: bool = True, fuse_mlp: bool = True):
        attn = layer.attention
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "relative_position_bias", "scaling",
                     "num_attention_heads"):
            if not hasattr(attn, name):
                raise TypeError(f"{cls.__name__}.from_hf: {type(attn).__name__} has no {name!r} (transformers 5.x "
                                "SwinAttention expected)")
        if (attn.q_proj.bias is None) != (attn.k_proj.bias is None) or (attn.q_proj.bias is None) != (
                attn.v_proj.bias is None):
            raise ValueError(f"{cls.__name__}.from_hf: q/k/v Linears must all have a bias or all have none")
        approx = _check_mlp(f"{cls.__name__}.from_hf", layer.layernorm_after, layer.mlp.fc1, layer.mlp.fc2,
                            layer.mlp.activation_fn) if fuse_mlp else None
        new = super().from_hf(layer)
        new._vitkern_gelu = approx  # None: the MLP half stays HF's modules
        new._vitkern_ln_linear = fuse_mlp and layer_norm_reason(layer.layernorm_before, "layernorm_before") is None
        ops = ["window_attention"] + (["linear_residual"] if type(attn.o_proj) is nn.Linear else []) + (
            ["ln_mlp", "ln_linear"] if fuse_mlp else [])
        if layer_norm:  # used where the LayerNorms are not fused (ln_mlp off) and on HF's path
            new.layernorm_before = LayerNorm.swap_in(layer.layernorm_before)
            new.layernorm_after = LayerNorm.swap_in(layer.layernorm_after)
            if any(type(m) is LayerNorm for m in (new.layernorm_before, new.layernorm_after)):
                ops.append("layer_norm")
        if not isinstance(attn, _SwappedHF):
            new.attention = HFSwinAttention.from_hf(attn)  # the eager path and the attention-map recorder
        new.vitkern_ops = tuple(ops)
        return new

    def _vitkern_undo(self, parent: nn.Module, original: nn.Module) -> None:
        """HF's forward shrinks ``window_size`` / ``shift_size`` in place for small maps: hand that state back."""
        original.window_size, original.shift_size = self.window_size, self.shift_size

    def _fused_ok(self, x: Tensor, kwargs: dict) -> bool:
        attn = self.attention
        table = attn.relative_position_bias.relative_position_bias_table
        window, shift = self.window_size, self.shift_size
        training = self.training and (self.dropout.p > 0 or _drop_path_active(self.drop_path)
                                      or _attention_dropout_active(attn))
        return (not training and isinstance(window, int) and isinstance(shift, int)
                and tuple(attn.relative_position_bias.window_size) == (window, window)  # else HF's own error
                and 0 <= shift < window and attn._vitkern_attn_maps is None and not _wants_weights(kwargs)
                and _bypassable(self.layernorm_before, attn, attn.o_proj,
                                linears=(attn.q_proj, attn.k_proj, attn.v_proj))
                and _same_dtype(x, table, attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight,
                                attn.o_proj.weight, attn.o_proj.bias, self.layernorm_before.weight,
                                self.layernorm_before.bias))

    def forward(self, hidden_states: Tensor, input_dimensions: tuple[int, int], always_partition: bool = False,
                **kwargs):
        if not always_partition:
            self.set_shift_and_window_size(input_dimensions)  # HF's clamping (in place, as HF does)
        if not self._fused_ok(hidden_states, kwargs):
            return super().forward(hidden_states, input_dimensions, always_partition, **kwargs)
        attn = self.attention
        height, width = input_dimensions
        B, L, C = hidden_states.shape
        # [3C, C]: q | k | v rows (head-major each), the packed layout window_attention reads; concatenated in the
        # graph so gradients reach the three Linears and nothing stale is ever used
        w_qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        b_qkv = None if attn.q_proj.bias is None else torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        norm = self.layernorm_before
        if self._vitkern_ln_linear:
            qkv = ln_linear(hidden_states, norm.weight, norm.bias, w_qkv, b_qkv, norm.eps)
        else:
            qkv = F.linear(norm(hidden_states), w_qkv, b_qkv)
        table = attn.relative_position_bias.relative_position_bias_table
        out = window_attention(qkv.view(B, height, width, 3 * C), table, attn.num_attention_heads, self.window_size,
                               self.shift_size, qkv_bias=b_qkv, scale=attn.scaling,
                               pad_first=True)  # HF pads, then rolls the padded map
        o_proj = attn.o_proj
        if type(o_proj) is nn.Linear:  # o_proj + residual in one GEMM (drop path is inactive on this path)
            h = linear_residual(out.view(B, L, C), o_proj.weight, o_proj.bias, hidden_states)
        else:  # a wrapped Linear (e.g. a PEFT adapter) computes something else: call it
            h = hidden_states + o_proj(out).view(B, L, C)
        if self._vitkern_gelu is not None and _same_dtype(h, self.mlp.fc1.weight, self.mlp.fc2.weight,
                                                          self.layernorm_after.weight) and not mlp_must_call(
                self.layernorm_after, self.mlp, self.mlp.fc1, self.mlp.fc2, ignoring=_HF_CAPTURE_HOOKS):
            return _mlp_tail(h, self.layernorm_after, self.mlp.fc1, self.mlp.fc2, None, self._vitkern_gelu), None
        return self.dropout(self.mlp(self.layernorm_after(h))) + h, None


# ---------------------------------------------------------------------------------------------------- embeddings
def _check_projection(name: str, conv: nn.Module, label: str) -> None:
    why = patch_projection_reason(conv, label)
    if why:
        raise TypeError(f"{name}: {why}")


def _embed(self, pixel_values: Tensor, prefix: Tensor) -> Tensor:
    proj = self.patch_embeddings.projection
    pixel_values = whole_patches(pixel_values, proj.kernel_size)  # HF's stride-p conv drops a remainder
    return patch_embed(pixel_values.to(proj.weight.dtype), proj.weight, proj.bias, self.position_embeddings, prefix)


def _embed_ok(self, pixel_values: Tensor) -> bool:
    proj = self.patch_embeddings.projection
    return (not (self.training and self.dropout.p > 0) and pixel_values.dim() == 4 and pixel_values.is_floating_point()
            and pixel_values.shape[1] == self.patch_embeddings.num_channels
            and _same_dtype(proj.weight, proj.bias, self.position_embeddings, self.cls_token))


class HFViTEmbeddings(_SwappedHF):
    """ViT / DeiT embeddings (patch projection, class [+ distillation] token, position embedding) in one
    ``patch_embed``."""

    vitkern_ops = ("patch_embed",)

    @classmethod
    def from_hf(cls, module: nn.Module):
        _check_projection(f"{cls.__name__}.from_hf", module.patch_embeddings.projection, "patch_embeddings.projection")
        return super().from_hf(module)

    def forward(self, pixel_values: Tensor, bool_masked_pos: Optional[Tensor] = None,
                interpolate_pos_encoding: bool = False) -> Tensor:
        height, width = pixel_values.shape[-2:]
        same_grid = (height, width) == tuple(self.image_size) and (not interpolate_pos_encoding or height == width)
        if bool_masked_pos is not None or not same_grid or not _embed_ok(self, pixel_values):
            return super().forward(pixel_values, bool_masked_pos, interpolate_pos_encoding)
        dist = getattr(self, "distillation_token", None)
        prefix = self.cls_token if dist is None else torch.cat([self.cls_token, dist], dim=1)  # [1, P, D]
        return _embed(self, pixel_values, prefix)


class HFDinov2Embeddings(_SwappedHF):
    """Dinov2 embeddings in one ``patch_embed`` when HF would add the position embedding as it is (square input
    of the configured grid); otherwise (interpolation, mask tokens) HF's forward."""

    vitkern_ops = ("patch_embed",)

    @classmethod
    def from_hf(cls, module: nn.Module):
        _check_projection(f"{cls.__name__}.from_hf", module.patch_embeddings.projection, "patch_embeddings.projection")
        return super().from_hf(module)

    def forward(self, pixel_values: Tensor, bool_masked_pos: Optional[Tensor] = None) -> Tensor:
        height, width = pixel_values.shape[-2:]
        ph, pw = self.patch_embeddings.patch_size
        same_grid = height == width and (height // ph) * (width // pw) == self.position_embeddings.shape[1] - 1
        masked = bool_masked_pos is not None and self.use_mask_token
        if masked or not same_grid or not _embed_ok(self, pixel_values):
            return super().forward(pixel_values, bool_masked_pos)
        return _embed(self, pixel_values, self.cls_token)


class HFSwinPatchEmbeddings(_SwappedHF):
    """Swin's patch embeddings (HF pads the image to whole patches, then projects) with the projection on the fused
    op: returns ``(tokens [B, Np, D], (H', W'))`` as HF's does; the norm after it stays SwinEmbeddings'."""

    vitkern_ops = ("patch_embed",)

    @classmethod
    def from_hf(cls, module: nn.Module):
        _check_projection(f"{cls.__name__}.from_hf", module.projection, "projection")
        return super().from_hf(module)

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, tuple[int, int]]:
        proj = self.projection
        if not (pixel_values.dim() == 4 and pixel_values.is_floating_point()
                and pixel_values.shape[1] == proj.in_channels and _same_dtype(proj.weight, proj.bias)):
            return super().forward(pixel_values)  # HF's own code (and its error for a bad input)
        pixel_values = self.maybe_pad(pixel_values, *pixel_values.shape[-2:])
        grid = (pixel_values.shape[-2] // proj.kernel_size[0], pixel_values.shape[-1] // proj.kernel_size[1])
        return patch_embed(pixel_values.to(proj.weight.dtype), proj.weight, proj.bias), grid
