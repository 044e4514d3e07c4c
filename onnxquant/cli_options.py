"""Options shared by the `onnxquant` commands, and the error boundary every command runs inside.

Every `Choice` is derived from a registry of the library (calibration methods, weight methods, table formats,
backends, requantization modes), so a new entry there is a new choice here.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import logging.handlers
import math
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path

import click

from onnxquant.api import BIT_ALLOC, load_rules
from onnxquant.calib.methods import METHODS, WEIGHT_METHODS
from onnxquant.calib.readers import ImageOptions, input_specs, open_data
from onnxquant.errors import InternalError, OnnxQuantError, first_line
from onnxquant.model import load_model
from onnxquant.progress import close_bars
from onnxquant.quant import MAX_BITS, MIN_BITS
from onnxquant.rules.schema import BIAS_CORRECTIONS

BITS = click.IntRange(MIN_BITS, MAX_BITS)
MODEL = click.Path(exists=True, dir_okay=True, path_type=Path)
CALIB_CHOICE = click.Choice(tuple(METHODS))
WEIGHT_CHOICE = click.Choice(tuple(WEIGHT_METHODS))
BIAS_CHOICE = click.Choice(BIAS_CORRECTIONS)
BIT_ALLOC_CHOICE = click.Choice([b for b in BIT_ALLOC if b])
IMAGE_LAYOUTS = ("NCHW", "NHWC")


def common(fn):
    """-v and --debug (also accepted before the command); a user error becomes one line on stderr and its exit
    code, an interrupt "interrupted" and 128 + the signal, a bug of ours exit 70."""

    @click.option("-v", "--verbose", count=True, help="More logging (-vv for debug logging).")
    @click.option("--debug", is_flag=True, help="Show Python tracebacks.")
    @functools.wraps(fn)
    def wrapper(*args, verbose: int = 0, debug: bool = False, **kwargs):
        verbose, debug = with_global_options(verbose, debug)
        level = logging.WARNING - 10 * min(verbose, 2)
        logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)
        logging.getLogger("onnxquant").setLevel(level)
        with warnings_held(not verbose):  # exited after the error line below is printed
            try:
                return fn(*args, **kwargs)
            except OnnxQuantError as exc:
                if debug:
                    raise
                click.echo(f"error: {exc}", err=True)
                sys.exit(exc.exit_code)
            except KeyboardInterrupt as exc:
                close_bars()
                exit_interrupted(exc)
            except (
                click.ClickException
            ) as exc:  # a usage error found by the command: here, before the warnings
                click.echo(usage_error_line(exc), err=True)
                sys.exit(exc.exit_code)
            except (click.exceptions.Exit, click.Abort):
                raise
            except Exception as exc:  # noqa: BLE001  (a bug of ours, InternalError or unforeseen: keep the traceback)
                traceback.print_exc(file=sys.stderr)
                click.echo(
                    f"internal error: {first_line(exc)} (a bug in onnxquant; please report it with the "
                    "traceback above)",
                    err=True,
                )
                sys.exit(InternalError.exit_code)

    return wrapper


LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def warnings_held(hold: bool) -> Iterator[None]:
    """Without -v, onnxquant's warnings are printed when the command ends, after its error line if it fails:
    DESIGN.md puts the error line first or alone, and a warning on the way (an opset lifted, a pass skipped)
    would otherwise stand where a script reads the error. With -v the log is live, as asked."""
    if not hold:
        yield
        return
    logger = logging.getLogger("onnxquant")
    target = logging.StreamHandler(sys.stderr)
    target.setFormatter(logging.Formatter(LOG_FORMAT))
    held = logging.handlers.MemoryHandler(10_000, flushLevel=logging.CRITICAL + 1, target=target)
    logger.addHandler(held)
    propagate, logger.propagate = logger.propagate, False
    try:
        yield
    finally:
        logger.removeHandler(held)
        logger.propagate = propagate
        held.close()  # flushes to stderr


def with_global_options(verbose: int, debug: bool) -> tuple[int, bool]:
    """The command's -v/--debug combined with those given before the command (`onnxquant --debug inspect`)."""
    ctx = click.get_current_context(silent=True)
    root = (ctx.find_root().obj if ctx is not None else None) or {}
    return verbose + root.get("verbose", 0), debug or root.get("debug", False)


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised like SIGINT's KeyboardInterrupt so staged outputs are removed on the way out."""

    signum = signal.SIGTERM


def raise_interrupted(signum, _frame) -> None:
    raise Interrupted()


def exit_interrupted(exc: BaseException) -> None:
    """One line, "interrupted", and the shell's code for the signal: 130 for SIGINT, 143 for SIGTERM."""
    click.echo("interrupted", err=True)
    sys.exit(128 + getattr(exc, "signum", signal.SIGINT))


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While a command runs, SIGTERM unwinds like Ctrl-C (temps removed) instead of killing at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def usage_error_line(exc: click.ClickException) -> str:
    """Click's usage error as the one line DESIGN.md asks for: the error, then where help is."""
    message = " ".join(line.strip() for line in exc.format_message().splitlines() if line.strip())
    ctx = getattr(exc, "ctx", None)
    where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    return f"error: {message}{where}"


class OneLineErrors(click.Group):
    """A group whose usage errors are one line (click prints "Usage:", "Try ..." and only then "Error:"),
    and where SIGTERM and an interrupt during parsing end like one during the command."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            with sigterm_interrupts():
                rv = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(usage_error_line(exc), err=True)
            sys.exit(exc.exit_code)
        except (click.Abort, KeyboardInterrupt) as exc:
            exit_interrupted(exc.__context__ or exc)
        sys.exit(rv if isinstance(rv, int) else 0)


class FiniteFloatRange(click.FloatRange):
    """A float range that also refuses nan (which no comparison rejects) and infinities."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


FINITE_FLOAT = FiniteFloatRange()
PERCENTILE = FiniteFloatRange(50, 100)


def _options(*options):
    def apply(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return apply


rules_option = click.option(
    "--rules", "rules_path", default=None, help="Rule file (YAML) or preset: default, tensorrt."
)

data_options = _options(
    click.option(
        "--batch-size",
        type=click.IntRange(min=1),
        default=32,
        show_default=True,
        help="Samples per inference batch.",
    ),
    click.option("--max-samples", type=click.IntRange(min=1), default=None, help="Use at most N samples."),
    click.option(
        "--calib-reader",
        metavar="MODULE:FUNCTION",
        default=None,
        help="A function returning an iterable of {input_name: array} batches.",
    ),
    click.option("--image-size", metavar="HxW", default=None, help="Resize images (image directories)."),
    click.option("--image-mean", metavar="M[,M,M]", default=None, help="Per-channel mean after scaling."),
    click.option("--image-std", metavar="S[,S,S]", default=None, help="Per-channel std after scaling."),
    click.option(
        "--image-layout",
        type=click.Choice(IMAGE_LAYOUTS),
        default=None,
        help="Layout of the model's image input.",
    ),
)

suggest_options = _options(
    click.option(
        "--suggest-rules",
        type=click.Path(path_type=Path),
        default=None,
        help="Write a rule file keeping the most sensitive layers at --high-bits.",
    ),
    click.option(
        "--target-sqnr",
        type=FINITE_FLOAT,
        default=None,
        help="Keep the fewest layers at --high-bits that reach this output SQNR (dB) on the calibration "
        "data, measured (automatic mixed precision); with --suggest-rules, the fewest predicted to.",
    ),
    click.option(
        "--top-k",
        type=click.IntRange(min=0),
        default=None,
        help="Keep this many layers (default 3 without --target-sqnr).",
    ),
    click.option("--high-bits", type=BITS, default=8, show_default=True, help="Width of the kept layers."),
)


def open_cli_data(
    model,
    path,
    batch_size,
    max_samples,
    calib_reader,
    image_size,
    image_mean,
    image_std,
    image_layout,
    extra_keys=(),
):
    """The batches the data options describe, or None when neither a path nor a reader was given."""
    if path is None and calib_reader is None:
        return None
    images = None
    if any(v is not None for v in (image_size, image_mean, image_std, image_layout)):
        images = ImageOptions(
            size=parse_numbers(image_size, "--image-size", "x", int) if image_size else None,
            mean=parse_numbers(image_mean, "--image-mean") if image_mean else (0.0, 0.0, 0.0),
            std=parse_numbers(image_std, "--image-std") if image_std else (1.0, 1.0, 1.0),
            layout=image_layout or "NCHW",
        )
    return open_data(
        path,
        input_specs(model),
        batch_size=batch_size,
        max_samples=max_samples,
        image_options=images,
        reader=calib_reader,
        extra_keys=extra_keys,
    )


def parse_numbers(text: str, flag: str, sep: str = ",", kind=float) -> tuple:
    try:
        return tuple(kind(v) for v in text.split(sep))
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: expected numbers separated by {sep!r}", param_hint=flag
        ) from None


def cli_rules(rules_path, **cli):
    """The rule file (or preset) with the command line's overrides applied."""
    return load_rules(rules_path).with_cli(**cli)


def rules_file(rules_path: str | None) -> Path | None:
    """The rule file a --rules value names, or None for a preset name."""
    return Path(rules_path) if rules_path and Path(rules_path).is_file() else None


def cli_model(path: Path):
    return load_model(path)


def split_bits(bits, wbits, abits) -> tuple[int | None, int | None]:
    if bits is not None and (wbits is not None or abits is not None):
        raise click.UsageError("use --bits N, or --wbits N and --abits N, not both")
    return (wbits if wbits is not None else bits), (abits if abits is not None else bits)


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
