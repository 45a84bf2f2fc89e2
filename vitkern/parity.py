"""Per-op parity of vitkern against float64 on a real (small) model: what ``vitkern check`` prints; and per-block
parity of an optimized model against the original: what ``vitkern parity`` prints (at the end of this file).

The model's own modules are hooked to capture the inputs each op sees; every backend that accepts those inputs
then recomputes the op and is held to the numerics rule of :mod:`vitkern.testing.numerics`. Finally the model is
run end to end with vitkern modules swapped in. Each op family adds an :class:`OpParity` to ``OP_PARITY``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitkern import dispatch
from vitkern.integrations import optimize
from vitkern.nn.layer_norm import computes_layer_norm
from vitkern.testing.numerics import Tolerance, assert_close, max_abs_err


@dataclasses.dataclass
class ParityRow:
    op: str
    where: str
    shape: str
    dtype: str
    backend: str
    err: float | None = None
    torch_err: float | None = None
    bound: float | None = None
    status: str = ""  # "ok", "FAIL: ...", "n/a: ..."


@dataclasses.dataclass(frozen=True)
class OpParity:
    op: str
    captures: Callable[[nn.Module], bool]  # which modules' inputs to capture
    # (backend name, module, captured args) -> (vitkern out, float64 reference, PyTorch out in the same dtype)
    compute: Callable[[nn.Module, tuple], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    problem: Callable[[nn.Module, tuple], dispatch.Problem]


def _layer_norm_compute(m: nn.LayerNorm, args: tuple):
    from vitkern.functional import layer_norm

    (x,) = args
    w = m.weight.detach() if m.weight is not None else None
    b = m.bias.detach() if m.bias is not None else None
    out = layer_norm(x, m.normalized_shape, w, b, m.eps)
    ref = F.layer_norm(x.double(), m.normalized_shape, None if w is None else w.double(), None if b is None else b.double(), m.eps)
    return out, ref, F.layer_norm(x, m.normalized_shape, w, b, m.eps)


def _layer_norm_problem(m: nn.LayerNorm, args: tuple) -> dispatch.Problem:
    from vitkern.functional.layer_norm import _describe

    return _describe(args[0], m.normalized_shape, m.weight, m.bias, m.eps)


def _is_plain_attention(m: nn.Module) -> bool:
    from vitkern.reference.layers import Attention

    return isinstance(m, Attention) and isinstance(m.q_norm, nn.Identity)  # qk_norm: covered by the module tests


def _attention_qkv(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, m.qkv.weight.detach(), None if m.qkv.bias is None else m.qkv.bias.detach())


def _attention_compute(m: nn.Module, args: tuple):
    """The attention core on the packed qkv output (the part the kernel replaces; the linears stay cuBLAS)."""
    from vitkern.functional.attention import attention
    from vitkern.reference.layers import attention_reference, merge_heads, split_heads_qkv

    qkv = _attention_qkv(m, args[0])

    def reference(t):
        return merge_heads(attention_reference(*split_heads_qkv(t, m.num_heads), scale=m.scale))

    return attention(qkv=qkv, num_heads=m.num_heads, scale=m.scale), reference(qkv.double()), reference(qkv)


def _attention_problem(m: nn.Module, args: tuple) -> dispatch.Problem:
    from vitkern.functional.attention import _describe

    return _describe(qkv=_attention_qkv(m, args[0]), num_heads=m.num_heads, scale=m.scale)


def _is_reference_vit(m: nn.Module) -> bool:
    from vitkern.reference.vit import VisionTransformer

    return isinstance(m, VisionTransformer)


def _patch_embed_compute(vit: nn.Module, args: tuple):
    """Patch projection + bias + prefix tokens + position embedding, from the image."""
    from vitkern.nn.patch_embed import ViTEmbed

    (image,) = args
    vit64 = copy.deepcopy(vit).double()

    def reference(model, x):
        return model.add_pos_embed(model.patch_embed(x))

    return ViTEmbed.from_timm(vit)(image), reference(vit64, image.double()), reference(vit, image)


def _patch_embed_problem(vit: nn.Module, args: tuple) -> dispatch.Problem:
    from vitkern.functional.patch_embed import _describe

    return _describe(args[0], vit.patch_embed.proj.weight, vit.patch_embed.proj.bias)


OP_PARITY: list[OpParity] = [
    OpParity("patch_embed", _is_reference_vit, _patch_embed_compute, _patch_embed_problem),
    OpParity("layer_norm", computes_layer_norm, _layer_norm_compute, _layer_norm_problem),
    OpParity("attention", _is_plain_attention, _attention_compute, _attention_problem),
]


def _capture(model: nn.Module, x: torch.Tensor, per_op_limit: int) -> list[tuple[OpParity, str, nn.Module, tuple]]:
    seen: list[tuple[OpParity, str, nn.Module, tuple]] = []
    counts: dict[str, int] = {}
    hooks = []
    for path, module in model.named_modules():
        for spec in OP_PARITY:
            if spec.captures(module):
                def hook(mod, args, _path=path, _spec=spec):
                    if counts.get(_spec.op, 0) < per_op_limit:
                        counts[_spec.op] = counts.get(_spec.op, 0) + 1
                        seen.append((_spec, _path, mod, tuple(a.detach() for a in args)))
                hooks.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def op_rows(model: nn.Module, x: torch.Tensor, per_op_limit: int = 4) -> list[ParityRow]:
    rows = []
    for spec, path, module, args in _capture(model, x, per_op_limit):
        problem = spec.problem(module, args)
        for name, backend in dispatch.backends(spec.op).items():
            row = ParityRow(spec.op, path or "(model)", "x".join(map(str, args[0].shape)), str(args[0].dtype).replace("torch.", ""), name)
            reasons = [backend.availability()] if backend.availability() else backend.reject_reasons(problem)
            if reasons:
                row.status = "n/a: " + "; ".join(reasons)
            else:
                with dispatch.use_backend(name, op=spec.op), torch.no_grad():
                    out, ref, torch_out = spec.compute(module, args)
                try:
                    info = assert_close(f"{spec.op} {path}", out, ref, torch_out)
                    row.status = "ok"
                except AssertionError as exc:
                    info = {"err": max_abs_err(out, ref), "torch_err": max_abs_err(torch_out, ref), "bound": float("nan")}
                    row.status = f"FAIL: {exc}"
                row.err, row.torch_err, row.bound = info["err"], info["torch_err"], info["bound"]
            rows.append(row)
    return rows


def model_rows(model: nn.Module, x: torch.Tensor, prefer: str | None) -> list[ParityRow]:
    """End to end: the model with vitkern modules swapped in vs the original, both against the float64 model."""
    model64 = copy.deepcopy(model).double()
    fast = copy.deepcopy(model)
    report = optimize(fast)
    ctx = dispatch.use_backend(prefer, strict=False) if prefer else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        ref = model64(x.double())
        out = fast(x)
        base = model(x)
    row = ParityRow("model", f"{type(model).__name__} ({len(report.swapped)} modules swapped)",
                    "x".join(map(str, x.shape)), str(x.dtype).replace("torch.", ""), prefer or "default dispatch")
    try:
        info = assert_close("model logits", out, ref, base)
        row.status = "ok"
    except AssertionError as exc:
        info = {"err": max_abs_err(out, ref), "torch_err": max_abs_err(base, ref), "bound": float("nan")}
        row.status = f"FAIL: {exc}"
    row.err, row.torch_err, row.bound = info["err"], info["torch_err"], info["bound"]
    return [row]


def format_rows(rows: Iterable[ParityRow]) -> str:
    head = ("op", "where", "shape", "dtype", "backend", "max|err|", "torch err", "bound", "status")
    table = [head] + [
        (r.op, r.where, r.shape, r.dtype, r.backend,
         *("-" if v is None else f"{v:.2e}" for v in (r.err, r.torch_err, r.bound)),
         r.status if len(r.status) < 90 else r.status[:87] + "...")
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- per block
# ``vitkern parity``: the optimized model vs the original, block by block. Both models are hooked at the same
# module paths (optimize keeps the module tree's names), the float64 original is the oracle, and each block's
# output is judged by the numerics rule: err(optimized) <= k * err(original in the same dtype) + atol * scale.
# Errors carry over from block to block in both models alike, so the rule holds along the chain; k = 4 (instead
# of the per-op 2) because the optimized model's earlier, already-different block outputs feed each later block.
BLOCK_TOLERANCE = Tolerance(k=4.0)
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def _first_tensor(out) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return next((t for t in (_first_tensor(o) for o in out) if t is not None), None)
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        return _first_tensor(out.to_tuple())
    return None


def block_paths(model: nn.Module) -> list[str]:
    """Paths of the model's blocks, in forward order: the innermost elements of ``nn.ModuleList`` /
    ``nn.Sequential`` containers that are themselves composite (timm ``blocks.3``, ``layers.1.blocks.0``,
    torchvision ``encoder.layers.encoder_layer_3``, ``features.3.1``, HF ``vit.encoder.layer.3``)."""
    order = {path: i for i, (path, _) in enumerate(model.named_modules())}
    found = []
    for path, container in model.named_modules():
        if isinstance(container, (nn.ModuleList, nn.Sequential)):
            for name, child in container.named_children():
                if any(True for _ in child.children()) and any(True for _ in child.parameters()):
                    found.append(f"{path}.{name}" if path else name)
    found = [p for p in found if not any(q.startswith(p + ".") for q in found)]
    return sorted(found, key=lambda p: order[p])


def capture_blocks(model: nn.Module, run: Callable[[nn.Module], torch.Tensor], paths: Sequence[str]) -> dict:
    """{path: output of that block (first tensor, detached copy), "logits": run(model)}; a path that is not a
    module of ``model`` or whose hook never fired is absent."""
    outs: dict[str, torch.Tensor] = {}
    hooks = []
    modules = dict(model.named_modules())
    for path in paths:
        if path in modules:
            def hook(mod, args, out, _path=path):
                t = _first_tensor(out)
                if t is not None:
                    outs[_path] = t.detach().clone()
            hooks.append(modules[path].register_forward_hook(hook))
    try:
        with torch.no_grad():
            outs["logits"] = run(model).detach()
    finally:
        for h in hooks:
            h.remove()
    return outs


@dataclasses.dataclass
class BlockError:
    diff: float | None = None  # max |optimized - original|, both in this precision
    err: float | None = None  # max |optimized - float64 original|
    torch_err: float | None = None  # max |original in this precision - float64 original|
    bound: float | None = None
    status: str = ""  # ok | FAIL: ... | n/a: ...


@dataclasses.dataclass
class BlockRow:
    path: str
    shape: str
    scale: float | None  # max |float64 output|
    errors: dict[str, BlockError]  # precision name -> errors


def compare_block(path: str, ref64: torch.Tensor | None, orig: torch.Tensor | None, opt: torch.Tensor | None,
                  tol: Tolerance = BLOCK_TOLERANCE) -> BlockError:
    """One block in one precision, judged by the numerics rule against the float64 original."""
    if ref64 is None or orig is None:
        return BlockError(status="n/a: the original model produced no output here")
    if opt is None:
        return BlockError(status="FAIL: no output at this path in the optimized model (replaced by a parent, or "
                                 "its forward hook never fired)")
    if opt.shape != orig.shape:
        return BlockError(status=f"FAIL: shape {tuple(opt.shape)} != original {tuple(orig.shape)}")
    e = BlockError(diff=max_abs_err(opt, orig))
    try:
        info = assert_close(path, opt, ref64, orig, tol)
        e.status = "ok"
    except AssertionError as exc:
        info = {"err": max_abs_err(opt, ref64), "torch_err": max_abs_err(orig, ref64),
                "bound": tol.bound(max_abs_err(orig, ref64), opt.dtype, ref64.abs().max().item())}
        e.status = "FAIL: " + str(exc).split(": ", 1)[-1]
    e.err, e.torch_err, e.bound = info["err"], info["torch_err"], info["bound"]
    return e


def block_rows(ref64: dict, runs: dict[str, tuple[dict, dict]], paths: Sequence[str],
               tol: Tolerance = BLOCK_TOLERANCE) -> list[BlockRow]:
    """``runs``: precision -> (original's captures, optimized's captures); one row per path, then logits."""
    rows = []
    for path in [*paths, "logits"]:
        ref = ref64.get(path)
        rows.append(BlockRow(path, "-" if ref is None else "x".join(map(str, ref.shape)),
                             None if ref is None else ref.abs().max().item(),
                             {p: compare_block(path, ref, orig.get(path), opt.get(path), tol)
                              for p, (orig, opt) in runs.items()}))
    return rows


@contextlib.contextmanager
def record_backends():
    """Collect {op: sorted backend names} chosen by the dispatcher inside the block (its DEBUG log of each new
    choice; the choice cache is cleared first so that every choice is logged)."""
    import logging

    seen: dict[str, set[str]] = {}

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            choice = record.args[0] if isinstance(record.args, tuple) and record.args else None
            if isinstance(choice, dispatch.Choice) and choice.backend is not None:
                seen.setdefault(choice.problem.op, set()).add(choice.backend.name)

    logger, handler = dispatch.log, _Collect(logging.DEBUG)
    level = logger.level
    dispatch._choice_cache.clear()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def model_block_parity(model: nn.Module, run: Callable[[nn.Module], torch.Tensor], dtypes: Sequence[torch.dtype],
                       prefer: Callable[[torch.dtype], str | None] = lambda dt: None, **optimize_kwargs):
    """Per-block parity of ``vitkern.optimize``'d copies of ``model`` against the original, in each dtype.

    ``run(module)`` runs a module on the (fixed) input and returns logits; it must cast the input to the module's
    dtype. ``prefer(dtype)`` names a backend to prefer (non-strict) for the optimized model in that dtype.
    Returns (rows, optimize report of the first dtype, {dtype name: {op: backends that ran}}).
    """
    paths = block_paths(model)
    ref64 = capture_blocks(copy.deepcopy(model).double(), run, paths)
    runs, report, used = {}, None, {}
    for dt in dtypes:
        orig = copy.deepcopy(model).to(dt)
        opt = copy.deepcopy(orig)
        rep = optimize(opt, **optimize_kwargs)
        report = report or rep
        backend = prefer(dt)
        ctx = dispatch.use_backend(backend, strict=False) if backend else contextlib.nullcontext()
        with ctx, record_backends() as seen:
            opt_out = capture_blocks(opt, run, paths)
        name = DTYPE_NAMES.get(dt, str(dt))
        runs[name] = (capture_blocks(orig, run, paths), opt_out)
        used[name] = {op: sorted(b) for op, b in sorted(seen.items())}
        del orig, opt
    return block_rows(ref64, runs, paths), report, used


def format_block_rows(rows: Sequence[BlockRow]) -> str:
    precisions = list(rows[0].errors) if rows else []
    head = ["block", "shape", "max|ref|"]
    for p in precisions:
        head += [f"{p} |opt-orig|", f"{p} opt err", f"{p} torch err", f"{p} bound", f"{p} status"]
    fmt = lambda v: "-" if v is None else f"{v:.2e}"  # noqa: E731
    table = [head]
    for r in rows:
        line = [r.path, r.shape, fmt(r.scale)]
        for p in precisions:
            e = r.errors[p]
            status = e.status if len(e.status) < 60 else e.status[:57] + "..."
            line += [fmt(e.diff), fmt(e.err), fmt(e.torch_err), fmt(e.bound), status]
        table.append(line)
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
