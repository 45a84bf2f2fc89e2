"""``vitkern`` command line: ``info`` (versions, GPU, backends and why not), ``check`` (per-op parity table),
``parity`` (per-block error of an optimized model vs the original) and ``bench`` (eager vs torch.compile vs vitkern
on a GPU; in :mod:`vitkern.bench.cli`).

Without a GPU the Triton kernels run in the Triton interpreter, which must be chosen before any kernel module is
imported: ``main`` sets TRITON_INTERPRET=1 first, and everything that touches kernels is imported after that.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


def _mode() -> str:
    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name()}"
    return "CPU, Triton interpreter mode (TRITON_INTERPRET=1): parity only, timings would mean nothing"


def _version(mod: str) -> str:
    try:
        return getattr(importlib.import_module(mod), "__version__", "?")
    except Exception as exc:  # an optional package that is absent or broken
        return f"not available ({exc.__class__.__name__})"


def _probe_calls() -> list[tuple[str, str, tuple, dict]]:
    """(label, op, args, kwargs): one representative call per op on the default device (ViT-B/16 at batch 64,
    Swin-T's first stage) with empty tensors of the right shapes, to show which backend each would get."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def e(*shape, dt=dtype):
        return torch.empty(*shape, device=device, dtype=dt)

    B, N, D, H = 64, 197, 768, 12
    x = e(B, N, D)
    return [
        ("ViT-B tokens", "layer_norm", (x, (D,), e(D), e(D)), {}),
        ("ViT-B norm1 + qkv", "ln_linear", (x, e(D), e(D), e(3 * D, D), e(3 * D)), {}),
        ("ViT-B proj + ls1 + residual", "linear_residual", (x, e(D, D), e(D), x, e(D)), {}),
        ("ViT-B norm2 + MLP", "ln_mlp", (x, e(D), e(D), e(4 * D, D), e(4 * D), e(D, 4 * D), e(D)), {}),
        ("ViT-B attention", "attention", (), {"qkv": e(B, N, 3 * D), "num_heads": H}),
        ("Swin-T stage 1, shifted", "window_attention",
         (e(B, 56, 56, 3 * 96), e(13 * 13, 3, dt=torch.float32), 3, 7, 3), {"qkv_bias": e(3 * 96)}),
        ("ViT-B/16 patches + cls + pos", "patch_embed",
         (e(B, 3, 224, 224), e(D, 3, 16, 16), e(D), e(1, N, D), e(1, 1, D)), {}),
    ]


def cmd_info(args: argparse.Namespace) -> int:
    import vitkern
    from vitkern import dispatch
    from vitkern.backends.triton_common import triton_status

    print(f"vitkern {vitkern.__version__}  ({_mode()})")
    print(f"python {platform.python_version()}  torch {torch.__version__}  CUDA {torch.version.cuda}  "
          f"triton {_version('triton')}")
    print(f"timm {_version('timm')}  torchvision {_version('torchvision')}  transformers {_version('transformers')}")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"GPU 0: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
    else:
        print("GPU: none visible (torch.cuda.is_available() is False)")
    ok, msg = triton_status()
    print(f"Triton: {msg}")
    if ok:
        from vitkern.kernels.triton import tuning

        try:
            print(f"Triton launch configs: {tuning.describe()}")
        except ValueError as exc:  # a bad VITKERN_AUTOTUNE: say so here rather than at the first launch
            print(f"Triton launch configs: {exc}")
    try:
        from vitkern._extension import extension_status

        st = extension_status()
        state = ("loaded, can run here" if st.can_run else "loaded, cannot run here") if st.available else "unavailable"
        print(f"CUDA C++ extension: {state}: {st.reason}")
    except ImportError as exc:
        print(f"CUDA C++ extension: unavailable: loader missing ({exc})")
    print("\nBackend choice for a representative call of each op (forward; the backward's choice after it):")
    for label, op, args, kwargs in _probe_calls():
        try:
            print(f"{op} ({label}): {dispatch.explain(op, *args, **kwargs)}")
        except Exception as exc:  # one op's probe failing must not hide the others
            print(f"{op} ({label}): probe failed: {exc.__class__.__name__}: {exc}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from vitkern import parity, reference

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    print(f"vitkern check: {args.model} img {args.img_size} batch {args.batch} {args.dtype} on {device}")
    print(f"mode: {_mode()}\n")
    torch.manual_seed(args.seed)
    overrides = {"img_size": args.img_size}
    if args.depth:
        overrides["depth" if "swin" not in args.model else "depths"] = (
            args.depth if "swin" not in args.model else tuple([args.depth] * 4))
    model = reference.create_model(args.model, **overrides).eval()
    # random init leaves LayerNorms at weight=1, bias=0: draw them too, so the affine part is exercised
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model = model.to(device=device, dtype=dtype)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device, dtype=dtype)
    prefer = None if device == "cuda" else "triton"  # on CPU the default is the reference: exercise the kernels
    rows = parity.op_rows(model, x, per_op_limit=args.per_op) + parity.model_rows(model, x, prefer)
    print(parity.format_rows(rows))
    failed = [r for r in rows if r.status.startswith("FAIL")]
    print(f"\n{len(rows) - len(failed)} ok or n/a, {len(failed)} failed")
    return 1 if failed else 0


def cmd_parity(args: argparse.Namespace) -> int:
    from vitkern import models, parity
    from vitkern.backends.triton_common import kernels_interpreted

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    img = args.img_size or (None if device == "cuda" else 64)  # the interpreter is slow: small images on CPU
    try:
        built = models.create_model(args.model, img_size=img, device=device, dtype=torch.float32,
                                    **models.parse_kwargs(args.model_arg))
    except (ValueError, TypeError) as exc:  # unknown name, bad --model-arg
        print(f"vitkern parity: {exc}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    if args.perturb:  # random init leaves LayerNorm weight=1, biases=0: draw them too, so every term is exercised
        with torch.no_grad():
            for p in built.module.parameters():
                p.add_(torch.randn_like(p) * args.perturb)
    x = built.example_input(args.batch, device=device, generator=torch.Generator().manual_seed(args.seed))
    interp = device == "cpu" and kernels_interpreted()

    def prefer(dt: torch.dtype) -> str | None:  # bf16 tl.dot is wrong in the Triton 3.6 interpreter
        return "triton" if interp and dt != torch.bfloat16 else None

    dtypes = [dtype] + ([torch.float32] if dtype != torch.float32 else [])
    print(f"vitkern parity: {args.model} ({built.source}) img {built.img_size} batch {args.batch} on {device}; "
          f"optimized vs original in {', '.join(parity.DTYPE_NAMES[d] for d in dtypes)}, float64 original as oracle")
    print(f"mode: {_mode()}" + ("; Triton kernels in the interpreter for fp32/fp16, bf16 on the reference backend"
                                 if interp else ""))
    rows, report, used = parity.model_block_parity(
        built.module, lambda m: models.logits(m(x.to(next(m.parameters()).dtype))), dtypes, prefer)
    print(f"\n{report}")
    for name, ops in used.items():
        print(f"backends that ran ({name}): " + (", ".join(f"{op}={'/'.join(b)}" for op, b in ops.items()) or "none"))
    print()
    print(parity.format_block_rows(rows))
    failed = [r.path for r in rows if any(e.status.startswith("FAIL") for e in r.errors.values())]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} blocks within bounds (err <= {parity.BLOCK_TOLERANCE.k:g} x "
          f"torch err + atol x scale)" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def cmd_bench(args: argparse.Namespace) -> int:
    from vitkern.bench.cli import cmd_bench as run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitkern", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU, and which backends are available (and why not)")
    c = sub.add_parser("check", help="run a small reference model through vitkern ops; print a per-op parity table")
    c.add_argument("--model", default="vit_small_patch16_224", help="a vitkern.reference model name (timm's names)")
    c.add_argument("--img-size", type=int, default=64)
    c.add_argument("--depth", type=int, default=2, help="blocks (ViT) / blocks per stage (Swin); 0 = the model's own")
    c.add_argument("--batch", type=int, default=2)
    c.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    c.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    c.add_argument("--per-op", type=int, default=3, help="how many calls of each op to check")
    c.add_argument("--seed", type=int, default=0)
    q = sub.add_parser("parity", help="per-block max error of vitkern.optimize(model) vs the original (and logits)")
    q.add_argument("--model", required=True, help="timm name, torchvision:NAME, hf:NAME or reference:NAME")
    q.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="model dtype (default: bf16 on "
                   "GPU, fp32 on CPU); fp32 is always compared too")
    q.add_argument("--img-size", type=int, default=None, help="default: the model's own on GPU, 64 on CPU")
    q.add_argument("--batch", type=int, default=2)
    q.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="constructor / config override, repeatable (e.g. depth=2 for a quick CPU run)")
    q.add_argument("--perturb", type=float, default=0.02, help="std of noise added to every parameter (0: none)")
    q.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    q.add_argument("--seed", type=int, default=0)
    from vitkern.bench.cli import add_parser

    add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    args = build_parser().parse_args(argv)
    return {"info": cmd_info, "check": cmd_check, "parity": cmd_parity, "bench": cmd_bench}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
