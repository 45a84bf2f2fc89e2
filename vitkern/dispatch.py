"""Backend registry and per-call dispatch (xformers-style).

Every op family (``layer_norm``, later ``attention``, ``window_attention``, ``mlp``, ``patch_embed``) registers
backends. A backend declares what it supports by returning the reasons it *cannot* run a given problem; the
dispatcher picks, per call, the most preferred backend with no reasons, and :func:`explain` shows the choice and
every rejection. Forcing a backend (``VITKERN_BACKEND`` or :func:`use_backend`) is strict: if the forced backend
rejects the call the error lists its reasons instead of silently running something else.

Preference on CUDA: the measured winner for the call's shape class on this GPU model, when the speed table
(:mod:`vitkern.backends.speed_table`, ``vitkern/data/speed_table.json``, ``$VITKERN_SPEED_TABLE``) has one; then
``cuda_rank`` order. The table is written from committed GPU benchmark results, never by timing a user call.

Dispatch runs inside the custom ops at run time, so torch.compile sees one opaque op and the choice (including
forcing by context manager) still applies to compiled code.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
import os
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch

log = logging.getLogger("vitkern.dispatch")

ENV_BACKEND = "VITKERN_BACKEND"  # "triton" (all ops) or "layer_norm=triton,attention=reference"
FORWARD, BACKWARD = "forward", "backward"


class BackendError(RuntimeError):
    """A forced backend cannot run this call, or no backend can."""


class Problem(NamedTuple):
    """What a backend needs to know to accept or reject one call (no tensors, hashable). A named tuple: built and
    hashed on every call (the choice cache's key), which a frozen dataclass makes ~1 µs slower."""

    op: str
    direction: str  # FORWARD or BACKWARD
    device: str  # "cuda" / "cpu"
    dtype: torch.dtype
    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # (argument name, shape)
    attrs: tuple[tuple[str, Any], ...] = ()  # op-specific: eps, head_dim, window, strides ok, ...

    def shape(self, name: str) -> tuple[int, ...]:
        return dict(self.shapes)[name]

    def attr(self, name: str, default: Any = None) -> Any:
        return dict(self.attrs).get(name, default)

    def describe(self) -> str:
        shapes = ", ".join(f"{k}={tuple(v)}" for k, v in self.shapes)
        attrs = ", ".join(f"{k}={v}" for k, v in self.attrs)
        return f"{self.op} {self.direction} [{self.device}, {str(self.dtype).replace('torch.', '')}, {shapes}" + (
            f", {attrs}]" if attrs else "]"
        )


class Backend:
    """Base class. Subclasses set ``name`` and implement ``reject_reasons`` and the op's entry points."""

    name: str = "?"
    # Default order on CUDA (lower runs first); on CPU the reference path always comes first.
    cuda_rank: int = 100

    def availability(self) -> str | None:
        """Why this backend cannot run at all in this process (None if it can)."""
        return None

    def reject_reasons(self, problem: Problem) -> list[str]:
        """Why this backend cannot run ``problem`` (empty list = supported)."""
        raise NotImplementedError

    def settings(self) -> tuple[tuple[str, Any], ...]:
        """Process settings outside the Problem that change what this backend accepts or runs (e.g. which CUDA
        kernel): part of the choice cache key, and shown by explain next to the chosen backend."""
        return ()


@dataclasses.dataclass
class Choice:
    problem: Problem
    backend: Backend | None
    why: str
    rejected: dict[str, list[str]]
    considered: list[str]
    backward: "Choice | str | None" = None  # explain() fills it: the backward's choice (or why none can run)

    def __str__(self) -> str:
        lines = [f"vitkern.{self.problem.describe()}"]
        settings = "".join(f" [{k}={v}]" for k, v in (self.backend.settings() if self.backend else ()))
        lines.append(f"  -> {self.backend.name if self.backend else 'NONE'}{settings}: {self.why}")
        for name in self.considered:
            if self.backend is not None and name == self.backend.name:
                continue
            reasons = self.rejected.get(name)
            lines.append(f"     {name}: " + ("rejected: " + "; ".join(reasons) if reasons else "supported, lower preference"))
        if isinstance(self.backward, Choice):
            lines += ["  " + line for line in str(self.backward).splitlines()]
        elif self.backward is not None:
            lines.append(f"  backward: {self.backward}")
        return "\n".join(lines)

    @property
    def backend_name(self) -> str | None:
        return self.backend.name if self.backend else None


_REGISTRY: dict[str, dict[str, Backend]] = {}
_DESCRIBERS: dict[str, Callable[..., Problem]] = {}
_forced: contextvars.ContextVar[tuple[tuple[str | None, str, bool], ...]] = contextvars.ContextVar(
    "vitkern_forced_backends", default=()
)
_choice_cache: dict[tuple, Choice] = {}


def register_backend(op: str, backend: Backend) -> Backend:
    _REGISTRY.setdefault(op, {})[backend.name] = backend
    _choice_cache.clear()
    return backend


def register_describer(op: str, describe: Callable[..., Problem]) -> None:
    """``describe(*args, **kwargs)`` maps the functional op's arguments to a forward Problem (used by explain)."""
    _DESCRIBERS[op] = describe


def backends(op: str) -> dict[str, Backend]:
    _ensure_ops_loaded()
    if op not in _REGISTRY:
        raise KeyError(f"unknown vitkern op {op!r}; known ops: {sorted(_REGISTRY)}")
    return _REGISTRY[op]


def ops() -> list[str]:
    _ensure_ops_loaded()
    return sorted(_REGISTRY)


def _ensure_ops_loaded() -> None:
    import vitkern.functional  # noqa: F401  (registers every op family's backends and describers)


def _env_forced() -> tuple[tuple[str | None, str, bool], ...]:
    return _parse_forced(os.environ.get(ENV_BACKEND, ""))


@functools.lru_cache(maxsize=64)
def _parse_forced(spec: str) -> tuple[tuple[str | None, str, bool], ...]:
    spec = spec.strip()
    if not spec:
        return ()
    out = []
    for item in spec.split(","):
        item = item.strip()
        if "=" in item:
            op, name = (s.strip() for s in item.split("=", 1))
            out.append((op, name, True))
        elif item:
            out.append((None, item, True))
    return tuple(out)


@contextlib.contextmanager
def use_backend(name: str, op: str | None = None, strict: bool = True) -> Iterator[None]:
    """Force backend ``name`` for ``op`` (or every op) inside the block.

    strict=True: a call the backend rejects raises :class:`BackendError` with its reasons.
    strict=False: prefer ``name`` where it is supported, otherwise dispatch as usual.
    """
    if op is not None:
        known = backends(op)
        if name not in known:
            raise ValueError(f"use_backend: op {op!r} has no backend {name!r}; it has {sorted(known)}")
    token = _forced.set(_forced.get() + ((op, name, strict),))
    try:
        yield
    finally:
        _forced.reset(token)


def _forced_for(op: str) -> tuple[str, bool, str] | None:
    # innermost context manager wins over outer ones, which win over the environment
    for source, entries in (("use_backend()", _forced.get()), (f"${ENV_BACKEND}", _env_forced())):
        for f_op, name, strict in reversed(entries):
            if f_op is None or f_op == op:
                return name, strict, source
    return None


def _order(op: str, device: str) -> list[Backend]:
    table = backends(op)
    ranked = sorted(table.values(), key=lambda b: (b.cuda_rank if device == "cuda" else (0 if b.name == "reference" else b.cuda_rank)))
    return ranked


def select(problem: Problem) -> Choice:
    """Pick the backend for one call. Cached per (problem, forcing, speed table) so the hot path is a dict lookup."""
    forced = _forced_for(problem.op)
    table = speed_table.active()  # the entry also depends on the device name: fixed per process (speed_table.reset)
    settings = tuple((b.name, s) for b in backends(problem.op).values() if (s := b.settings()))
    key = (problem, forced, table, settings)
    choice = _choice_cache.get(key)
    if choice is not None:
        return choice
    ranked = _order(problem.op, problem.device)
    measured = speed_table.lookup(problem, table)
    # the measured winner is tried first; the others keep their rank order behind it (stable sort)
    order = sorted(ranked, key=lambda b: b.name != measured.backend) if measured is not None else ranked
    rejected: dict[str, list[str]] = {}
    for b in order:
        reason = b.availability()
        rejected[b.name] = [reason] if reason else b.reject_reasons(problem)
    considered = [b.name for b in order]
    chosen: Backend | None = None
    if forced is not None:
        name, strict, source = forced
        known = backends(problem.op)
        if name not in known:
            if strict:
                raise BackendError(f"{source} forces backend {name!r}, but op {problem.op!r} has only {sorted(known)}")
        elif not rejected[name]:
            chosen, why = known[name], f"forced by {source}"
        elif strict:
            raise BackendError(
                f"{source} forces backend {name!r} for {problem.describe()}, which it rejects: "
                + "; ".join(rejected[name])
            )
    if chosen is None:
        for b in order:
            if not rejected[b.name]:
                chosen = b
                if measured is not None and b.name == measured.backend:
                    why = measured.reason()
                else:
                    pref = " > ".join(r.name for r in ranked)
                    why = f"first supported backend in preference order ({pref}) for device {problem.device}"
                    if measured is not None:  # say why the measurement was not followed
                        what = "it rejected this call" if measured.backend in rejected else "the op lacks it"
                        why += f"; the speed table prefers {measured.backend!r} for {measured.shape_class}, but {what}"
                if forced is not None:
                    why += f"; {forced[2]} prefers {forced[0]!r} (not strict) but it rejected this call"
                break
    if chosen is None:
        details = "; ".join(f"{n}: {', '.join(r)}" for n, r in rejected.items())
        raise BackendError(f"no vitkern backend can run {problem.describe()}: {details}")
    choice = Choice(problem, chosen, why, {n: r for n, r in rejected.items() if r}, considered)
    if len(_choice_cache) > 4096:
        _choice_cache.clear()
    _choice_cache[key] = choice
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s", choice)
    return choice


def explain(op: str | Callable[..., Any], *args: Any, **kwargs: Any) -> Choice:
    """Which backend would run ``op(*args, **kwargs)`` and why the others were rejected.

    ``op`` is an op name (``"layer_norm"``) or a vitkern functional (``vitkern.functional.layer_norm``);
    the arguments are the functional's.
    """
    _ensure_ops_loaded()
    name = getattr(op, "__vitkern_op__", op)
    if name not in _DESCRIBERS:
        raise KeyError(f"explain: unknown op {op!r}; known ops: {sorted(_DESCRIBERS)}")
    forward = select(_DESCRIBERS[name](*args, **kwargs))
    # the backward of a training step is chosen on its own (e.g. a CUDA forward followed by the Triton backward);
    # its problem has the forward's shapes, so this is the choice autograd will make for these inputs
    try:
        backward = select(forward.problem._replace(direction=BACKWARD))
    except BackendError as e:
        backward = f"no backend: {e}"
    return dataclasses.replace(forward, backward=backward)


def tensor_problem(
    op: str,
    direction: str,
    tensors: Sequence[tuple[str, torch.Tensor | None]],
    attrs: Sequence[tuple[str, Any]] = (),
) -> Problem:
    """Build a Problem from named tensors: device and dtype come from the first one."""
    first = tensors[0][1]
    assert first is not None
    if first.device.type == "cuda":  # the capability check needs the device
        attrs = tuple(attrs) + (("device_index", first.device.index),)
    return Problem(
        op=op,
        direction=direction,
        device=first.device.type,
        dtype=first.dtype,
        shapes=tuple((n, tuple(t.shape)) for n, t in tensors if t is not None),
        attrs=tuple(attrs),
    )


def register_autograd(op: "CustomOp", backward: Callable[..., Any], setup_context: Callable[..., Any]) -> None:
    """``torch.library.register_autograd`` for ``op``, carrying the caller's vitkern context (forced backends, output
    poisoning) from the forward into the backward.

    Both are ContextVars, and the autograd engine runs CUDA backwards on its own device threads, which start with an
    empty context: without this, ``with use_backend(...)`` around ``loss.backward()`` would silently not apply to
    the backward ops. (Under torch.compile the backward graph is traced once; the forcing seen at trace time holds.)
    """

    def setup_with_context(ctx, inputs, output):
        ctx.vitkern_context = contextvars.copy_context()
        return setup_context(ctx, inputs, output)

    def backward_in_context(ctx, *grads):
        # a copy per call: one Context object cannot be entered by two threads at once
        return ctx.vitkern_context.copy().run(backward, ctx, *grads)

    torch.library.register_autograd(op.qualname, backward_in_context, setup_context=setup_with_context)

    # The same formula as an autograd.Function around the op, for eager calls that need gradients (CustomOp.__call__):
    # it skips the generated Function's per-call argument binding (~10 µs a LayerNorm fwd+bwd at a tiny shape, CPU).
    # forward(ctx, *args), not a separate setup_context, which Function.apply would bind with inspect on every call.
    def forward(ctx, *args):
        with _BELOW_AUTOGRAD():  # grad mode is off in here: the op's autograd kernel would only redispatch
            output = op.overload(*args)
        setup_with_context(ctx, args, output)
        return output

    methods = {"forward": staticmethod(forward), "backward": staticmethod(backward_in_context)}
    op.function = type(op.qualname.replace("::", "_"), (torch.autograd.Function,), methods)


def without_autocast(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` with autocast off. An op's backends fix their own precision (fp32 accumulation, fp32 softmax and
    statistics; vitkern/functional/_autocast.py casts the inputs as autocast would hand them). Inside a custom op
    the caller's autocast is still on and would recast a backend's fp32 torch matmuls to bf16: the reference
    attention's logits rounded to bf16 before its logsumexp gave a 13% error where SDPA has 0.3%."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        on = [device for device in ("cuda", "cpu") if torch.is_autocast_enabled(device)]
        if not on:
            return fn(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            for device in on:
                stack.enter_context(torch.autocast(device, enabled=False))
            return fn(*args, **kwargs)

    return run


def outside_dynamo(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run with dynamo's frame evaluation off, as ``torch.library.custom_op`` runs an implementation
    (``torch._disable_dynamo``): an op that runs eagerly inside a region torch.compile watches (a frame dynamo
    skipped, after a graph break) must not have its implementation's frames compiled. That wrapper costs ~2.9 us per
    call on CI's CPU; with no dynamo callback set (eager code: no compiled region is running) there is nothing to
    switch off, and ``fn`` is called directly (~0.02 us for the check)."""
    disabled = torch._disable_dynamo(fn)

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        if _eval_frame_callback is not None and _eval_frame_callback() is None:
            return fn(*args, **kwargs)
        return disabled(*args, **kwargs)

    return run


def _skip_frames_of(code) -> None:
    """Dynamo leaves frames of ``code`` alone (frames they call are its business as usual): what
    ``torch._dynamo.eval_frame.skip_code`` does, from torch._C, so that importing vitkern does not import dynamo."""
    from torch._C._dynamo.eval_frame import _FrameAction, _FrameExecStrategy, set_code_exec_strategy

    set_code_exec_strategy(code, _FrameExecStrategy(_FrameAction.SKIP, _FrameAction.DEFAULT))


try:  # private; without it, outside_dynamo always takes torch's wrapper
    from torch._C._dynamo.eval_frame import get_eval_frame_callback as _eval_frame_callback

    # outside_dynamo's wrapper runs inside compiled regions too: dynamo must not try to compile it (it would, once
    # per op, and find nothing to trace)
    _skip_frames_of(outside_dynamo(lambda: None).__code__)
except (ImportError, AttributeError, TypeError):  # pragma: no cover
    _eval_frame_callback = None


# Excludes the autograd dispatch keys for the calls inside it (private in torch 2.x; None: always dispatch normally)
_BELOW_AUTOGRAD = getattr(torch._C, "_AutoDispatchBelowAutograd", None)


class CustomOp:
    """One vitkern op: ``torch.ops.vitkern.<name>``, registered with ``torch.library.define``/``impl``, a fake
    (``register_fake``) and an autograd formula (:func:`register_autograd`), so that torch.compile and torch.export
    see one opaque, differentiable op. Calling this object calls the op; the functionals do.

    Host cost per call (CPU, 2026-11-22, a LayerNorm op at a tiny shape; pytorch/pytorch#139500):
    ``torch.library.custom_op`` wraps every call in Python checks (aliasing, dynamo): ~4 µs over the implementation
    in inference mode, ~8 µs under ``torch.no_grad()``; define/impl costs ~2 µs. Outside inference mode the
    dispatcher also runs the Python autograd kernel (~4 µs) even when nothing needs a gradient: this object skips the
    autograd keys then (``_AutoDispatchBelowAutograd``, what that kernel does itself once it finds no gradient
    needed), so an eval-mode model under ``torch.no_grad()`` pays ~3 µs per op instead of ~8.
    """

    def __init__(self, qualname: str, fn: Callable[..., Any], schema: str) -> None:
        self.qualname = qualname
        torch.library.define(qualname, schema)
        torch.library.impl(qualname, "CompositeExplicitAutograd", outside_dynamo(without_autocast(fn)))
        namespace, name = qualname.split("::")
        self.overload = getattr(getattr(torch.ops, namespace), name).default
        self.function: type[torch.autograd.Function] | None = None  # register_autograd sets it
        functools.update_wrapper(self, fn)

    def register_fake(self, fake: Callable[..., Any]) -> Callable[..., Any]:
        torch.library.register_fake(self.qualname, fake)
        return fake

    def __call__(self, *args: Any) -> Any:
        # compiling: dynamo traces the op (and cannot trace is_inference_mode_enabled); inference mode excludes the
        # autograd keys already
        if torch.compiler.is_compiling() or _BELOW_AUTOGRAD is None or torch.is_inference_mode_enabled():
            return self.overload(*args)
        if torch.is_grad_enabled():
            for a in args:
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    return self.function.apply(*args) if self.function is not None else self.overload(*args)
        with _BELOW_AUTOGRAD():
            return self.overload(*args)


def custom_op(name: str, *, mutates_args: Sequence[str] | str = ()) -> Callable[[Callable[..., Any]], CustomOp]:
    """Register ``fn`` as the op ``name`` (schema from its annotations); its implementation runs
    :func:`without_autocast`."""

    def register(fn: Callable[..., Any]) -> CustomOp:
        schema = torch.library.infer_schema(fn, mutates_args=mutates_args)  # from fn's annotations, in its module
        return CustomOp(name, fn, schema)

    return register


# last: the backends package's modules subclass this module's Backend, so it must be complete before they import
from vitkern.backends import speed_table  # noqa: E402
