"""``vitkern.nn.PatchEmbed`` (drop-in for timm's ``PatchEmbed``) and ``vitkern.nn.ViTEmbed`` (patch embedding +
class/distillation/register tokens + position embedding, with timm's parameter names), both on the fused op."""

from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkern.functional.patch_embed import _channel_values, _norm, patch_embed, resample_pos_embed, whole_patches
from vitkern.nn._hooks import must_call, share_hooks

__all__ = ["PatchEmbed", "ViTEmbed", "FusedViTPatchEmbed", "patch_projection_reason"]

_OUTPUT_FMTS = ("NCHW", "NHWC", "NCL", "NLC")


def patch_projection_reason(conv: nn.Module, name: str = "proj") -> Optional[str]:
    """Why ``conv`` is not a patch projection the fused op computes (None when it is): an ``nn.Conv2d`` tiling the
    image into non-overlapping patches (stride = kernel, no padding, dilation 1, groups 1). Every swap rule and
    ``from_*`` constructor asks this one question."""
    if not isinstance(conv, nn.Conv2d):
        return f"{name} is {type(conv).__name__}, not an nn.Conv2d"
    if (tuple(conv.stride) != tuple(conv.kernel_size) or conv.padding not in ((0, 0), "valid") or conv.groups != 1
            or tuple(conv.dilation) != (1, 1)):
        return (f"{name} ({conv}) is not a non-overlapping patch projection (the fused op needs stride = kernel, "
                "no padding, dilation 1, groups 1)")
    return None


def _pair(v: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class PatchEmbed(nn.Module):
    """timm ``PatchEmbed`` on the fused kernel: same constructor, attributes and state_dict (``proj.weight``,
    ``proj.bias``, ``norm.*``); ``proj`` stays an ``nn.Conv2d`` so checkpoints load unchanged.

    Supported: ``img_size`` (or None: any size divisible by the patch), ``norm_layer`` (applied after the fused
    op), ``flatten``, ``output_fmt`` in NCHW/NHWC/NCL/NLC (views of the token buffer), ``bias``,
    ``strict_img_size``, ``dynamic_img_pad`` (a plain ``F.pad`` before the kernel, not fused).
    """

    def __init__(
        self,
        img_size: Optional[Union[int, Tuple[int, int]]] = 224,
        patch_size: Union[int, Tuple[int, int]] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        norm_layer: Optional[Callable] = None,
        flatten: bool = True,
        output_fmt: Optional[str] = None,
        bias: bool = True,
        strict_img_size: bool = True,
        dynamic_img_pad: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.patch_size = _pair(patch_size)
        self._set_img_size(img_size)
        if output_fmt is not None:
            fmt = getattr(output_fmt, "value", output_fmt)
            if fmt not in _OUTPUT_FMTS:
                raise ValueError(f"vitkern.nn.PatchEmbed: output_fmt {output_fmt!r} is not one of {_OUTPUT_FMTS}")
            self.flatten, self.output_fmt = False, fmt
        else:
            self.flatten, self.output_fmt = flatten, "NCHW"
        self.strict_img_size = strict_img_size
        self.dynamic_img_pad = dynamic_img_pad
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias, **dd)
        self.norm = norm_layer(embed_dim, **dd) if norm_layer else nn.Identity()

    def _set_img_size(self, img_size) -> None:
        if img_size is None:
            self.img_size = self.grid_size = self.num_patches = None
            return
        self.img_size = _pair(img_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def check_and_pad(self, x: Tensor) -> Tensor:
        """timm's size checks (strict size / divisibility) and its dynamic padding (right and bottom). Where timm
        lets a size that is not a multiple of the patch through (strict_img_size with such an img_size, e.g.
        SigLIP so400m/14 at 384, or no img_size), its stride-p conv drops the last rows / columns: cropped here
        too (a view: the kernel reads the image by strides)."""
        H, W = x.shape[-2:]
        ph, pw = self.patch_size
        if self.img_size is not None:
            if self.strict_img_size and (H, W) != self.img_size:
                raise ValueError(f"vitkern.nn.PatchEmbed: input size {H}x{W} doesn't match the model's "
                                 f"img_size {self.img_size} (strict_img_size=True)")
            if not self.strict_img_size and not self.dynamic_img_pad and (H % ph or W % pw):
                raise ValueError(f"vitkern.nn.PatchEmbed: input size {H}x{W} is not divisible by the patch size "
                                 f"{ph}x{pw} (strict_img_size=False without dynamic_img_pad, as timm requires)")
        if self.dynamic_img_pad:
            return F.pad(x, (0, (pw - W % pw) % pw, 0, (ph - H % ph) % ph))
        return whole_patches(x, self.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.check_and_pad(x)
        B, grid = x.shape[0], (x.shape[-2] // self.patch_size[0], x.shape[-1] // self.patch_size[1])
        # the conv's output layout follows its input's: channels-last in, channels-last out; else contiguous
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        if must_call(self.proj):  # a hook on proj sees timm's call: the conv's [B, D, gh, gw]
            x = self.proj(x).flatten(2).transpose(1, 2)
        else:
            x = patch_embed(x, self.proj.weight, self.proj.bias)  # [B, Np, D]: also the NHWC map [B, gh, gw, D]
        if self.flatten or self.output_fmt == "NLC":
            return self.norm(x)
        if self.output_fmt == "NCL":  # timm's conv(x).flatten(2): contiguous, as code after it may .view() it
            return self.norm(x.transpose(1, 2).contiguous())
        x = x.view(B, *grid, x.shape[-1])
        if self.output_fmt == "NHWC":
            return self.norm(x)
        x = x.permute(0, 3, 1, 2)  # NCHW, as timm's conv(x) returns it
        return self.norm(x if channels_last else x.contiguous())

    def dynamic_feat_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        ph, pw = self.patch_size
        if self.dynamic_img_pad:
            return -(-img_size[0] // ph), -(-img_size[1] // pw)
        return img_size[0] // ph, img_size[1] // pw

    def feat_ratio(self, as_scalar: bool = True):
        return max(self.patch_size) if as_scalar else self.patch_size

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """timm's ``PatchEmbed.set_input_size``: a new image size (new grid), and a new patch size resampling ``proj``
        (timm's ``resample_patch_embed``). Built by :meth:`from_timm`, it runs the replaced module's own method and
        mirrors the result, so that module stays in step for ``vitkern.restore``."""
        original = getattr(self, "_original", None)
        if original is not None:
            setter = getattr(original, "set_input_size", None)
            if setter is None:
                raise AttributeError(f"{type(original).__qualname__} has no set_input_size")
            setter(img_size=img_size, patch_size=patch_size)
            self.proj, self.patch_size = original.proj, _pair(original.patch_size)
            self._set_img_size(original.img_size)
            return
        new_patch = _pair(patch_size) if patch_size is not None else None
        if new_patch is not None and new_patch != self.patch_size:
            self.proj = _resampled_projection(self.proj, new_patch)
            self.patch_size = new_patch
        img_size = img_size or self.img_size
        if img_size != self.img_size or new_patch is not None:
            self._set_img_size(img_size)

    @classmethod
    def from_timm(cls, module: nn.Module) -> "PatchEmbed":
        """A vitkern PatchEmbed sharing ``module.proj`` and ``module.norm`` (no copy)."""
        proj = module.proj
        why = patch_projection_reason(proj)
        if why:
            raise ValueError(f"vitkern.nn.PatchEmbed.from_timm: {why}")
        if getattr(module, "output_nhwc", False):  # vitkern.reference's PatchEmbed
            fmt = "NHWC"
        else:
            fmt = None if getattr(module, "flatten", True) else getattr(module, "output_fmt", "NCHW")
        new = cls(None, proj.kernel_size, proj.in_channels, proj.out_channels, device="meta", output_fmt=fmt,
                  bias=proj.bias is not None, strict_img_size=getattr(module, "strict_img_size", True),
                  dynamic_img_pad=getattr(module, "dynamic_img_pad", False))
        new._set_img_size(getattr(module, "img_size", None))
        new.proj, new.norm = proj, getattr(module, "norm", nn.Identity())
        object.__setattr__(new, "_original", module)  # a plain attribute: not a submodule, not in the state_dict
        new.train(module.training)
        return share_hooks(module, new)


def _resampled_projection(proj: nn.Conv2d, patch_size: Tuple[int, int]) -> nn.Conv2d:
    """``proj`` for a new patch size: the kernel resampled with timm's ``resample_patch_embed`` (FlexiViT's
    pseudo-inverse resize), the bias and the training flags kept."""
    try:
        from timm.layers import resample_patch_embed
    except ImportError as e:
        raise ImportError("vitkern.nn.PatchEmbed.set_input_size: a new patch_size resamples the projection with "
                          "timm's resample_patch_embed; install timm") from e
    with torch.no_grad():
        new = nn.Conv2d(proj.in_channels, proj.out_channels, kernel_size=patch_size, stride=patch_size,
                        bias=proj.bias is not None, device=proj.weight.device, dtype=proj.weight.dtype)
        new.weight.copy_(resample_patch_embed(proj.weight, list(patch_size)))
        new.weight.requires_grad_(proj.weight.requires_grad)
        if proj.bias is not None:
            new.bias.copy_(proj.bias)
            new.bias.requires_grad_(proj.bias.requires_grad)
    new.train(proj.training)
    return new


class ViTEmbed(nn.Module):
    """Everything a ViT does before its first block, from one kernel launch: patch projection + bias, the prefix
    tokens (``cls_token``, ``dist_token``, ``reg_token``, in timm's order) and the position embedding
    (``pos_embed``; timm's ``no_embed_class`` rule: covering the prefix rows too, or the patches only).

    Parameter names are timm's (``patch_embed.proj.*``, ``cls_token``, ``dist_token``, ``reg_token``,
    ``pos_embed``). ``set_input_normalization(mean, std)`` fuses the pixel normalisation (uint8 images too) into
    the kernel. A different input resolution needs ``dynamic_img_size=True``: the position embedding is then
    resampled (bicubic, as timm) once per grid and cached while it is not being trained; otherwise it is an error.
    """

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: Union[int, Tuple[int, int]] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        class_token: bool = True,
        distilled: bool = False,
        reg_tokens: int = 0,
        no_embed_class: bool = False,
        pos_embed: bool = True,
        dynamic_img_size: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, bias=bias,
                                      strict_img_size=not dynamic_img_size, **dd)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd)) if class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd)) if distilled else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim, **dd)) if reg_tokens else None
        self.no_embed_class = no_embed_class
        self.dynamic_img_size = dynamic_img_size
        n = self.patch_embed.num_patches + (0 if no_embed_class else self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.randn(1, n, embed_dim, **dd) * 0.02) if pos_embed else None
        self._pos_cache: dict = {}
        self.input_mean = self.input_std = None

    def set_input_normalization(self, mean, std) -> "ViTEmbed":
        """Normalise the input pixels inside the kernel, ``(x - mean) / std`` per channel (e.g. uint8 images with
        ``mean = 255 * IMAGENET_DEFAULT_MEAN``, ``std = 255 * IMAGENET_DEFAULT_STD``); ``None, None`` turns it off.
        The values are checked here and copied to each device once (no per-call host-to-device copy or sync)."""
        if mean is not None or std is not None:
            _norm(mean, std, self.patch_embed.proj.in_channels, "cpu", torch.float32)  # a bad mean / std fails now
        self.input_mean, self.input_std = mean, std
        return self

    def _normalization_on(self, device: torch.device) -> tuple:
        """(mean, std) as fp32 tensors on ``device``, made once per device for the objects set now (new
        ``input_mean`` / ``input_std`` objects, however assigned, start a new cache)."""
        mean, std = self.input_mean, self.input_std
        if mean is None or std is None:
            return mean, std  # off, or half set: the functional says what is missing
        made_of = self.__dict__.get("_norm_of", (None, None))
        if made_of[0] is not mean or made_of[1] is not std:
            self.__dict__.update(_norm_of=(mean, std), _norm_on={})
        cache = self.__dict__["_norm_on"]
        if device not in cache:
            C = self.patch_embed.proj.in_channels
            cache[device] = (_channel_values("mean", mean, C, device, torch.float32),
                             _channel_values("std", std, C, device, torch.float32))
        return cache[device]

    @property
    def num_prefix_tokens(self) -> int:
        return sum(t.shape[1] for t in self.prefix_params())

    def prefix_params(self) -> list[Tensor]:
        return [t for t in (self.cls_token, self.dist_token, self.reg_token) if t is not None]

    def pos_embed_for(self, grid: Tuple[int, int]) -> Optional[Tensor]:
        """The position embedding for a patch grid: the parameter itself, or its cached resampling."""
        pos, base = self.pos_embed, self.patch_embed.grid_size
        if pos is None or grid == base:
            return pos
        if not self.dynamic_img_size:
            raise ValueError(f"vitkern.nn.ViTEmbed: the input's patch grid {grid} differs from the model's {base}; "
                             "build it with dynamic_img_size=True to resample the position embedding")
        n_prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        # training: resample in the graph (differentiable); compiled: in the graph too (dynamo cannot trace the
        # cache's data_ptr key, and the compiled graph is built once per grid anyway)
        if (torch.is_grad_enabled() and pos.requires_grad) or torch.compiler.is_compiling():
            return resample_pos_embed(pos, grid, base, n_prefix)
        key = (grid, pos.data_ptr(), pos._version, pos.dtype, pos.device)
        hit = self._pos_cache.get(grid)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                self._pos_cache[grid] = hit = (key, resample_pos_embed(pos, grid, base, n_prefix))
        return hit[1]

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> tokens [B, P + Np, D] ready for the first block."""
        pe = self.patch_embed
        x = pe.check_and_pad(x)
        grid = (x.shape[-2] // pe.patch_size[0], x.shape[-1] // pe.patch_size[1])
        tokens = self.prefix_params()
        prefix = (tokens[0] if len(tokens) == 1 else torch.cat(tokens, dim=1)) if tokens else None
        mean, std = self._normalization_on(x.device)
        return patch_embed(x, pe.proj.weight, pe.proj.bias, self.pos_embed_for(grid), prefix, mean=mean, std=std)

    @classmethod
    def from_timm(cls, vit: nn.Module) -> "ViTEmbed":
        """Share the embedding parameters of a timm (or ``vitkern.reference``) ViT / DeiT (distilled) / reg model."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.patch_embed = _token_patch_embed(vit, "vitkern.nn.ViTEmbed.from_timm")
        new.cls_token = getattr(vit, "cls_token", None)
        new.dist_token = getattr(vit, "dist_token", None)
        new.reg_token = getattr(vit, "reg_token", None)
        new.pos_embed = getattr(vit, "pos_embed", None)
        new.no_embed_class = bool(getattr(vit, "no_embed_class", False))
        new.dynamic_img_size = bool(getattr(vit, "dynamic_img_size", False))
        new._pos_cache = {}
        new.input_mean = new.input_std = None
        new.train(vit.training)
        return new


def _token_patch_embed(vit: nn.Module, who: str) -> PatchEmbed:
    """A PatchEmbed sharing ``vit.patch_embed``'s proj, set up to emit the token rows [B, Np, D] (flat, NLC; any
    grid when the ViT has ``dynamic_img_size``)."""
    if not isinstance(getattr(vit.patch_embed, "norm", nn.Identity()), nn.Identity):
        raise ValueError(f"{who}: a patch_embed norm layer (between the projection and the position embedding) is "
                         "not supported")
    pe = PatchEmbed.from_timm(vit.patch_embed)
    pe.flatten, pe.output_fmt = True, "NLC"
    pe.strict_img_size = pe.strict_img_size and not getattr(vit, "dynamic_img_size", False)
    return pe


class _ViTTokens(ViTEmbed):
    """:class:`ViTEmbed`'s token logic over a ViT's own attributes, read at call time: a ViT whose parameters are
    replaced afterwards (``load_state_dict(assign=True)``, ``set_input_size``) is embedded as it is now."""

    def __init__(self, vit: nn.Module) -> None:
        nn.Module.__init__(self)
        object.__setattr__(self, "_vit", vit)  # not a submodule (the ViT owns us); deepcopy / pickle keep the cycle
        self._pos_cache = {}
        self.input_mean = self.input_std = None

    patch_embed = property(lambda self: self._vit.patch_embed)
    cls_token = property(lambda self: getattr(self._vit, "cls_token", None))
    dist_token = property(lambda self: getattr(self._vit, "dist_token", None))
    reg_token = property(lambda self: getattr(self._vit, "reg_token", None))
    pos_embed = property(lambda self: getattr(self._vit, "pos_embed", None))
    no_embed_class = property(lambda self: bool(getattr(self._vit, "no_embed_class", False)))
    dynamic_img_size = property(lambda self: bool(getattr(self._vit, "dynamic_img_size", False)))


class FusedViTPatchEmbed(PatchEmbed):
    """Sits in a ViT's ``patch_embed`` slot and returns the whole token sequence (patches + prefix tokens + position
    embedding) from one kernel launch, while the ViT's own position-embedding method (timm ``_pos_embed``,
    ``vitkern.reference``'s ``add_pos_embed``) is replaced on the instance by the identity.

    Registered submodules are those of the PatchEmbed it replaces (``proj``, ``norm``), so the state_dict is
    unchanged; the prefix tokens and ``pos_embed`` stay the ViT's parameters and are looked up on the ViT at each
    call. ``set_input_size`` runs the replaced PatchEmbed's own (timm's) and takes its new projection and sizes, so
    ``vit.set_input_size(...)`` works on an optimized ViT and after ``restore``. ``_vitkern_undo`` puts the ViT's
    method back.
    """

    vitkern_ops = ("patch_embed",)

    @classmethod
    def from_vit(cls, vit: nn.Module, pos_embed_method: str) -> "FusedViTPatchEmbed":
        new = _token_patch_embed(vit, "vitkern.nn.FusedViTPatchEmbed.from_vit")  # _original: vit.patch_embed
        new.__class__ = cls
        object.__setattr__(new, "_tokens", _ViTTokens(vit))  # plain attributes: not submodules, not in state_dict
        object.__setattr__(new, "_pos_embed_method", pos_embed_method)
        setattr(vit, pos_embed_method, _tokens_already_embedded)  # instance attribute shadows the class method
        return new

    def forward(self, x: Tensor) -> Tensor:
        # x: [B, C, H, W] -> [B, prefix + H'·W', D]
        if must_call(self.proj):  # a hook on proj (added after the swap) sees timm's calls: the ViT's own steps
            vit = self._tokens._vit
            return getattr(type(vit), self._pos_embed_method)(vit, self._original(x))
        return self._tokens(x)

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """PatchEmbed's (the replaced module's own, mirrored), and the cached resampled position embeddings cleared."""
        super().set_input_size(img_size=img_size, patch_size=patch_size)
        self._tokens._pos_cache.clear()

    def _vitkern_undo(self, vit: nn.Module, original: nn.Module) -> None:
        if self._pos_embed_method in vars(vit):
            delattr(vit, self._pos_embed_method)


def _tokens_already_embedded(x: Tensor) -> Tensor:
    """Stands in for the ViT's position-embedding step: FusedViTPatchEmbed already did it."""
    return x
