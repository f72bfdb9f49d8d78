"""``noisescale profile``: step time against batch size, and the largest batch that fits.

MODEL is a built-in reference model (``mnist-cnn``, ``gpt-small``), ``module:function`` or
``path/to/file.py:function`` (e.g. ``examples/profile_model.py:build``). The
function is called with the ``--model-option`` values as keyword arguments and returns
``(model, loss_fn, make_batch)``:

- ``model``: an ``nn.Module``; it is moved to ``--device``;
- ``loss_fn(model(inputs), targets)``: the scalar training loss;
- ``make_batch(batch_size, device)``: a batch ``(inputs, targets)`` of ``batch_size`` examples on
  ``device``; synthetic data of the real shapes is enough.

The module is imported with the current directory on ``sys.path``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import statistics
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from noisescale.commands import _args
from noisescale.errors import NoiseScaleInputError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from noisescale.hardware.profile import ThroughputProfile
    from noisescale.reference_models import LossFn, MakeBatch

_DEFAULT_LIMIT = {"cpu": 256, "cuda": 65536}
#: Bounds that catch typos (a batch of 10⁹ examples, 10⁶ repeats) before they hang the machine.
MAX_BATCH_LIMIT = 1 << 24
MAX_REPEATS = 10_000
MAX_THREADS = 1024


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "profile",
        help="measure step time against batch size and the largest batch that fits in memory",
        description="Find the largest micro-batch a training step (forward, backward, optimizer "
        "step) fits in memory, time steps at several batch sizes, fit t(b) = α + β·b and write "
        "a profile JSON that `noisescale recommend` reads.",
        epilog="MODEL: mnist-cnn (the paper's MNIST CNN), gpt-small (a small GPT; "
        "--model-option n_layer=6 d_model=512 n_head=8 block_size=256 for the benchmark one), "
        "or module:function / path/to/file.py:function returning (model, loss_fn, make_batch) "
        "with make_batch(batch_size, device) -> (inputs, targets); see "
        "examples/profile_model.py.",
    )
    parser.add_argument("model", metavar="MODEL", help="built-in model name or module:function")
    parser.add_argument(
        "--model-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keyword argument for the model builder (repeatable; values parsed as JSON "
        "when possible, e.g. n_layer=6, tie_embeddings=true)",
    )
    parser.add_argument(
        "--batch-sizes",
        type=_args.positive_int_list,
        metavar="B1,B2,...",
        help="micro-batch sizes to time (default: powers of two up to the largest that fits, "
        "or up to --max-batch-limit (64 if not given) with --no-memory-search)",
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)"
    )
    parser.add_argument(
        "--optimizer",
        choices=("adamw", "sgd", "none"),
        default="adamw",
        help="optimizer step included in each timed step; its state counts towards memory "
        "(default: adamw)",
    )
    parser.add_argument(
        "--warmup", type=_args.nonnegative_int, default=2, help="untimed steps per batch size"
    )
    parser.add_argument(
        "--repeats", type=_args.positive_int, default=5, help="timed steps per batch size"
    )
    parser.add_argument(
        "--max-batch-limit",
        type=_args.positive_int,
        default=None,
        help="largest batch the memory search tries (default 256 on cpu, 65536 on cuda; on "
        "cpu the OS may kill the process instead of failing an allocation, so keep it modest)",
    )
    parser.add_argument(
        "--no-memory-search",
        action="store_true",
        help="skip the search for the largest batch that fits",
    )
    parser.add_argument(
        "--threads",
        type=_args.positive_int,
        default=None,
        help="CPU threads for torch (default: torch's own)",
    )
    parser.add_argument(
        "--seed", type=_args.nonnegative_int, default=0, help="torch seed for the model weights"
    )
    parser.add_argument("-o", "--output", help="write the profile JSON to this file (.json)")
    _args.add_force(parser)
    parser.add_argument("--json", action="store_true", help="print the profile as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from noisescale.hardware import (
        ThroughputProfile,
        describe_device,
        describe_model,
        find_max_batch_size,
        make_training_step,
        profile_throughput,
        time_optimizer_update,
    )
    from noisescale.hardware.memory import free_memory, is_out_of_memory

    if args.warmup > MAX_REPEATS or args.repeats > MAX_REPEATS:
        raise NoiseScaleInputError(
            f"--warmup and --repeats must be at most {MAX_REPEATS} steps per batch size"
        )
    if args.threads is not None and args.threads > MAX_THREADS:
        raise NoiseScaleInputError(f"--threads must be at most {MAX_THREADS}, got {args.threads}")
    limit_given = args.max_batch_limit
    if limit_given is not None and limit_given > MAX_BATCH_LIMIT:
        raise NoiseScaleInputError(
            f"--max-batch-limit must be at most {MAX_BATCH_LIMIT}, got {limit_given}"
        )
    if args.batch_sizes and max(args.batch_sizes) > MAX_BATCH_LIMIT:
        raise NoiseScaleInputError(f"--batch-sizes must be at most {MAX_BATCH_LIMIT} each")
    # The fit t(b) = α + β·b needs two batch sizes: said before measuring, and not blamed on memory.
    if args.batch_sizes and len(set(args.batch_sizes)) < 2:
        raise NoiseScaleInputError(
            "fitting t(b) = α + β·b needs at least two batch sizes; give two or more "
            "--batch-sizes, e.g. --batch-sizes 8,16"
        )
    if not args.batch_sizes and args.max_batch_limit == 1:
        raise NoiseScaleInputError(
            "--max-batch-limit 1 leaves one batch size to time, and fitting t(b) = α + β·b "
            "needs two: give a larger --max-batch-limit or two or more --batch-sizes"
        )
    # Where the profile goes is settled before minutes of measuring, not after.
    output = (
        _args.check_output_file(args.output, flag="-o", force=args.force, suffixes=(".json",))
        if args.output
        else None
    )
    device = _device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    options = _options(args.model_option)
    torch.manual_seed(args.seed)
    model, loss_fn, make_batch = resolve_model(args.model, options)
    if not any(p.requires_grad for p in model.parameters()):
        raise NoiseScaleInputError(
            f"{args.model}: the model has no trainable parameters, so a training step does "
            "nothing to time; return the model you train"
        )
    model.to(device).train()
    optimizer: torch.optim.Optimizer | None = None
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    elif args.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    step = _checked_step(
        make_training_step(model, loss_fn, make_batch, optimizer=optimizer, device=device),
        args.model,
        options,
    )

    search = None
    if not args.no_memory_search:
        limit = args.max_batch_limit or _DEFAULT_LIMIT.get(device.type, 256)
        _note(args, f"searching the largest batch that fits (up to {limit}) ...")
        search = find_max_batch_size(step, limit=limit, model=model, optimizer=optimizer)
    if args.batch_sizes:
        batch_sizes = args.batch_sizes
    else:
        top = search.max_batch_size if search else (args.max_batch_limit or 64)
        batch_sizes = [2**i for i in range(top.bit_length()) if 2**i <= top]
    _note(args, f"timing batch sizes {', '.join(map(str, batch_sizes))} ...")
    out_of_memory: list[int] = []
    points = profile_throughput(
        step,
        batch_sizes,
        warmup=args.warmup,
        repeats=args.repeats,
        device=device,
        model=model,
        optimizer=optimizer,
        on_out_of_memory=out_of_memory.append,
    )
    oom = out_of_memory[0] if out_of_memory else None
    timed = [p.batch_size for p in points]
    dropped = sorted(set(batch_sizes) - set(timed))
    if oom is not None:
        # Said even with --json (on stderr): the sizes asked for were not all timed.
        print(
            f"warning: batch size {oom} ran out of memory while timing, so the largest batch "
            f"that fits is below {oom}; not timed: {', '.join(map(str, dropped))}",
            file=sys.stderr,
        )
    if len(points) < 2:
        raise NoiseScaleInputError(_too_few_points(points, oom, search))
    # A timed step includes one optimizer update; an accumulated step of k micro-batches runs
    # k passes and one update, so `recommend` needs the update's time on its own.
    update_times: tuple[float, ...] = ()
    update_s: float | None = 0.0
    if optimizer is not None:
        _note(args, "timing the optimizer update alone ...")
        try:
            update_times = time_optimizer_update(
                step,
                optimizer.step,
                points[0].batch_size,
                warmup=args.warmup,
                repeats=args.repeats,
                device=device,
                model=model,
                optimizer=optimizer,
            )
            update_s = statistics.median(update_times)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            update_s = None  # not timed apart: recommend prices it as part of every pass
        if update_s is None:
            free_memory()
            print(
                "warning: the optimizer update ran out of memory when timed alone; the profile "
                "leaves its time unknown, and recommend charges it on every accumulated pass",
                file=sys.stderr,
            )
    extra: dict[str, Any] = {"spec": args.model, "options": options}
    config = getattr(model, "config", None)
    block_size = getattr(config, "block_size", None)
    if isinstance(block_size, int):
        extra |= {"example_unit": "sequences", "tokens_per_example": block_size}
    else:
        extra["example_unit"] = "examples"
    profile = ThroughputProfile.from_points(
        points,
        device=describe_device(device),
        model=describe_model(model, args.model, **extra),
        max_batch_size=search.max_batch_size if search else None,
        max_batch_search=search.state_dict() if search else None,
        settings={
            "warmup": args.warmup,
            "repeats": args.repeats,
            "optimizer": args.optimizer,
            "seed": args.seed,
            "timed_batch_sizes": timed,
            "requested_batch_sizes": sorted(set(batch_sizes)),
            "dropped_batch_sizes": dropped,
        },
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        optimizer_update_s=update_s,
        optimizer_update_times_s=update_times,
        out_of_memory_batch_size=oom,
    )
    text = json.dumps(profile.to_dict(), indent=2, allow_nan=False) + "\n"
    if args.json:
        print(text, end="")
    else:
        print(format_profile(profile))
    try:
        profile.pricing_fit()
    except NoiseScaleInputError as err:
        # kept as measured (--json too: until 2026-12-07 only the text said so, a fuzzer)
        print(f"warning: {err}; `noisescale recommend` refuses it", file=sys.stderr)
    if output is not None:
        # Measured minutes ago: if the file cannot be written now, keep it somewhere and say so.
        # Without --force, a file that appeared while measuring is never replaced.
        _args.write_or_rescue(output, text, what="the measured profile", replace=args.force)
        if not args.json:
            print(f"wrote {output}")
    return 0


def _too_few_points(points: list[Any], oom: int | None, search: Any) -> str:
    """Why fewer than two batch sizes were timed, and what to give instead."""
    timed = f"only batch size {points[0].batch_size} was timed" if points else "nothing was timed"
    if oom is not None:
        return (
            f"fitting t(b) = α + β·b needs two batch sizes, but batch size {oom} ran out of "
            f"memory ({timed}); give smaller --batch-sizes"
        )
    if search is not None and search.capped:
        return (
            f"fitting t(b) = α + β·b needs two batch sizes, but the memory search stopped at "
            f"its limit, {search.max_batch_size} ({timed}): give a larger --max-batch-limit or "
            "two or more --batch-sizes"
        )
    if search is not None:
        return (
            f"fitting t(b) = α + β·b needs two batch sizes, but only batch size "
            f"{search.max_batch_size} fits in memory (the memory search); use a device with "
            "more memory or a smaller model"
        )
    return f"fitting t(b) = α + β·b needs at least two batch sizes ({timed})"


def resolve_model(spec: str, options: dict[str, Any]) -> tuple[nn.Module, LossFn, MakeBatch]:
    """``(model, loss_fn, make_batch)`` from a built-in name or ``module:function``."""
    import torch

    from noisescale.reference_models import REFERENCE_MODELS

    if spec in REFERENCE_MODELS:
        builder = REFERENCE_MODELS[spec]
    elif ":" in spec:
        module_name, _, attr = spec.rpartition(":")
        module = _import(module_name)
        builder = getattr(module, attr, None)
        if not callable(builder):
            raise NoiseScaleInputError(f"module {module_name!r} has no function {attr!r}")
    else:
        known = ", ".join(sorted(REFERENCE_MODELS))
        raise NoiseScaleInputError(
            f"unknown model {spec!r}: give a built-in model ({known}) or module:function"
        )
    try:
        built = builder(**options)
    except TypeError as err:
        raise NoiseScaleInputError(f"{spec}: bad model options {options}: {err}") from None
    except Exception as err:  # the user's code, e.g. a negative width reaching torch
        raise NoiseScaleInputError(
            f"{spec} failed to build the model with options {options}: "
            f"{type(err).__name__}: {err}; check the --model-option values"
        ) from None
    if not (
        isinstance(built, tuple)
        and len(built) == 3
        and isinstance(built[0], torch.nn.Module)
        and callable(built[1])
        and callable(built[2])
    ):
        raise NoiseScaleInputError(
            f"{spec} must return (model: nn.Module, loss_fn, make_batch), got {type(built)!r}"
        )
    return built


def _checked_step(step: Any, spec: str, options: dict[str, Any]) -> Any:
    """``step``, with an error of the user's model, loss or batch (other than running out of
    memory, which the search and the timing handle) turned into a one-line input error."""
    from noisescale.hardware.memory import is_out_of_memory

    def checked(batch_size: int) -> None:
        try:
            step(batch_size)
        except NoiseScaleInputError:
            raise
        except Exception as err:
            if is_out_of_memory(err):
                raise
            raise NoiseScaleInputError(
                f"{spec} (options {options}): a training step at batch size {batch_size} failed: "
                f"{type(err).__name__}: {err}; check that make_batch(batch_size, device) gives "
                "inputs the model takes and targets its loss_fn takes"
            ) from None

    return checked


def _import(module_name: str) -> Any:
    """A module by dotted name (the current folder importable) or from a ``.py`` file."""
    try:
        if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
            path = Path(module_name)
            if not path.is_file():
                raise NoiseScaleInputError(f"no such file: {module_name}")
            # Like `python path/to/model.py`: the file's folder is importable (its helpers).
            if str(path.resolve().parent) not in sys.path:
                sys.path.insert(0, str(path.resolve().parent))
            name = f"_noisescale_profile_{path.stem}"
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                raise NoiseScaleInputError(f"cannot load {module_name} as a Python module")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            return module
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        return importlib.import_module(module_name)
    except NoiseScaleInputError:
        raise
    except Exception as err:
        raise NoiseScaleInputError(
            f"cannot import module {module_name!r}: {type(err).__name__}: {err}"
        ) from None


def format_profile(profile: ThroughputProfile) -> str:
    """The profile as a text table with the fit and the memory limit."""
    device = profile.device
    where = device.get("name") or device["type"]
    if device["type"] == "cpu":
        threads = device.get("torch_threads")
        where += f", {threads} thread{'s' * (threads != 1)}"
    lines = [
        f"noisescale profile: {profile.model['name']} "
        f"({profile.model['parameters']:,} parameters) on {device['type']} ({where}), "
        f"optimizer {profile.settings.get('optimizer')}",
        f"{'batch':>7} {'step (ms)':>10} {'samples/s':>11} {'peak memory':>12}",
    ]
    for p in profile.points:
        memory = "" if p.peak_memory_bytes is None else f"{p.peak_memory_bytes / 2**20:.0f} MiB"
        lines.append(
            f"{p.batch_size:>7} {p.step_time_s * 1e3:>10.3f} {p.samples_per_s:>11.1f} {memory:>12}"
        )
    fit = profile.fit
    lines.append(
        f"fit: t(b) = α + β·b, α = {_pm(fit.alpha_s, fit.alpha_se_s, 1e3)} ms, "
        f"β = {_pm(fit.beta_s, fit.beta_se_s, 1e3)} ms/example "
        f"(largest relative residual {fit.max_rel_residual:.1%})"
    )
    if profile.optimizer_update_s is not None and profile.optimizer_update_times_s:
        lines.append(
            f"optimizer update alone: {profile.optimizer_update_s * 1e3:.4g} ms (part of α; "
            "paid once per step however many micro-batches are accumulated)"
        )
    search = profile.max_batch_search
    oom = profile.out_of_memory_batch_size
    if oom is not None and (profile.max_batch_size is None or profile.max_batch_size >= oom):
        searched = "not searched" if search is None else f"the search said {profile.max_batch_size}"
        lines.append(
            f"largest batch in memory: below {oom}, which ran out of memory while timing "
            f"({searched}); the largest timed, {profile.largest_fitting_batch_size}, fits"
        )
    elif search is None:
        lines.append("largest batch in memory: not searched")
    elif search["capped"]:
        lines.append(
            f"largest batch in memory: ≥ {profile.max_batch_size} (the search stopped at its "
            "limit, --max-batch-limit)"
        )
    else:
        lines.append(
            f"largest batch in memory: {profile.max_batch_size} ({len(search['trials'])} trials)"
        )
    return "\n".join(lines)


def _pm(value: float, se: float | None, scale: float) -> str:
    return f"{value * scale:.4g}" if se is None else f"{value * scale:.4g} ± {se * scale:.2g}"


def _note(args: argparse.Namespace, message: str) -> None:
    if not args.json:
        print(message, file=sys.stderr)


def _device(spec: str | None) -> torch.device:
    import torch

    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise NoiseScaleInputError(f"unknown device {spec!r}: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise NoiseScaleInputError(f"unsupported device {spec!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NoiseScaleInputError("--device cuda: CUDA is not available on this machine")
    return device


def _options(pairs: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.isidentifier():
            raise NoiseScaleInputError(f"--model-option needs KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(text)
        except json.JSONDecodeError:
            options[key] = text
    return options
