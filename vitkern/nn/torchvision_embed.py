"""Fused patch embeddings for torchvision's ViT and Swin V1 (torchvision 0.26), built from the original with
``from_torchvision`` (parameters shared, state_dict keys unchanged).

ViT: torchvision embeds in three places — ``VisionTransformer._process_input`` (``conv_proj``, reshape, permute),
``VisionTransformer.forward`` (``torch.cat`` of the class token) and ``Encoder.forward`` (``+ pos_embedding``) —
each a full pass over the tokens. :class:`TorchvisionViTConvProj` takes the ``conv_proj`` slot and writes the whole
sequence [B, 1 + Np, D] in one ``patch_embed`` launch; the ViT's ``forward`` is replaced on the instance by the
same steps minus the concatenation and the addition (``_vitkern_undo`` removes it)::

    x = conv_proj(x, class_token, encoder.pos_embedding)    # patches + bias, class token, position embedding
    x = encoder.ln(encoder.layers(encoder.dropout(x)))      # the encoder's steps after its `+ pos_embedding`
    x = heads(x[:, 0])

The encoder keeps its own ``forward``: called directly (feature extractors, wrappers) it adds the position embedding
as torchvision's does. With a hook on ``conv_proj`` or ``encoder`` the ViT runs torchvision's own ``forward``, so the
hooks see the calls they would see in the original.

Swin V1: ``features[0]`` is ``Sequential(Conv2d, Permute([0, 2, 3, 1]), LayerNorm)``. The fused op's token buffer
[B, Np, D] *is* the NHWC map [B, H', W', D], so :class:`TorchvisionSwinPatchEmbed` (a Sequential with the same
three children) runs ``patch_embed`` and then the norm; the Permute has nothing left to do.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from vitkern.functional.patch_embed import patch_embed, whole_patches
from vitkern.nn._hooks import must_call
from vitkern.nn.layer_norm import LayerNorm

__all__ = ["TorchvisionViTConvProj", "TorchvisionSwinPatchEmbed"]


def _conv_like(conv: nn.Conv2d, cls: type) -> nn.Conv2d:
    """An instance of the nn.Conv2d subclass ``cls`` with ``conv``'s configuration and its very parameters."""
    new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, bias=conv.bias is not None,
              device="meta")
    new.weight, new.bias = conv.weight, conv.bias
    return new.train(conv.training)


# ----------------------------------------------------------------------------------------------------- ViT
class TorchvisionViTConvProj(nn.Conv2d):
    """torchvision ViT's ``conv_proj`` (an ``nn.Conv2d``: same parameters, same keys) that, called with the class
    token and the position embedding, returns the whole token sequence from one fused launch.

    ``conv_proj(x)`` alone is still the convolution it replaced, for code that calls it directly.
    """

    vitkern_ops = ("patch_embed",)

    @classmethod
    def from_torchvision(cls, vit: nn.Module) -> "TorchvisionViTConvProj":
        new = _conv_like(vit.conv_proj, cls)
        # an instance attribute shadows the class method; a partial, not a bound method, so that the model pickles
        # (a bound method pickles as getattr(vit, its function's name), which the ViT does not have)
        vit.forward = functools.partial(_vit_forward, vit)
        return new

    def forward(self, x: Tensor, class_token: Tensor | None = None, pos_embedding: Tensor | None = None) -> Tensor:
        if class_token is None and pos_embedding is None:
            return super().forward(x)
        # x: [B, C, H, W], class_token: [1, 1, D], pos_embedding: [1, 1 + Np, D] -> [B, 1 + Np, D]
        return patch_embed(x, self.weight, self.bias, pos_embedding, class_token)

    def _vitkern_undo(self, vit: nn.Module, original: nn.Module) -> None:
        vars(vit).pop("forward", None)


def _vit_forward(self, x: Tensor) -> Tensor:
    """``VisionTransformer.forward`` with the embedding fused (see the module docstring)."""
    encoder = self.encoder
    if must_call(self.conv_proj, encoder):  # hooks see torchvision's calls: conv_proj(x) [B, D, h, w], encoder(tokens)
        return type(self).forward(self, x)
    h, w = x.shape[-2:]
    torch._assert(h == self.image_size, f"Wrong image height! Expected {self.image_size} but got {h}!")
    torch._assert(w == self.image_size, f"Wrong image width! Expected {self.image_size} but got {w}!")
    x = self.conv_proj(x, self.class_token, encoder.pos_embedding)
    x = encoder.ln(encoder.layers(encoder.dropout(x)))
    return self.heads(x[:, 0])


# ----------------------------------------------------------------------------------------------------- Swin V1
class TorchvisionSwinPatchEmbed(nn.Sequential):
    """torchvision Swin's ``features[0]`` (``[Conv2d, Permute, norm]``, same children and keys): [B, C, H, W] ->
    the normalised NHWC map [B, H // ph, W // pw, D], with the projection on the fused op. Like the Conv2d it
    replaces, a remainder of H or W that does not fill a patch is dropped."""

    vitkern_ops = ("patch_embed",)

    @classmethod
    def from_torchvision(cls, stem: nn.Sequential, *, layer_norm: bool = True) -> "TorchvisionSwinPatchEmbed":
        conv, permute, norm = stem
        new = cls(conv, permute, LayerNorm.swap_in(norm) if layer_norm else norm)
        if new[2] is not norm:
            new.vitkern_ops = ("patch_embed", "layer_norm")
        return new.train(stem.training)

    def forward(self, x: Tensor) -> Tensor:
        conv, _, norm = self
        ph, pw = conv.kernel_size
        x = whole_patches(x, (ph, pw))
        gh, gw = x.shape[-2] // ph, x.shape[-1] // pw
        tokens = patch_embed(x, conv.weight, conv.bias)  # [B, gh·gw, D] = the NHWC map
        return norm(tokens.view(x.shape[0], gh, gw, -1))
