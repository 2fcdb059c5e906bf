"""``clipkit`` entry point: global options (DESIGN §3) and a lazily-loaded command group."""
from __future__ import annotations

import importlib
import logging
import sys
import traceback
from dataclasses import dataclass

import click

# name -> (module, attribute). Command modules import only click at module level.
COMMANDS = {
    "score": ("clipkit.cli.score", "score"),
    "classify": ("clipkit.cli.classify", "classify"),
    "eval": ("clipkit.cli.eval", "eval_cmd"),
    "models": ("clipkit.cli.models", "models"),
    "train": ("clipkit.cli.train", "train"),
    "rerank": ("clipkit.cli.rerank", "rerank"),
    "embed": ("clipkit.cli.embed", "embed"),
    "caption": ("clipkit.cli.caption", "caption"),
    "generate": ("clipkit.cli.generate", "generate"),
    "index": ("clipkit.cli.index", "index"),
    "search": ("clipkit.cli.search", "search"),
    "serve": ("clipkit.cli.serve", "serve"),
}


class CliError(click.ClickException):
    """A user-fixable problem: ``Error: ...`` on one line, exit code 2."""
    exit_code = 2


@dataclass
class Settings:
    profile: str | None = None        # None: the default profile, chosen implicitly
    device: str = "auto"
    precision: str = "fp32"
    verbose: bool = False
    quiet: bool = False
    threads: int | None = None        # torch CPU threads; None: the command's default (generate: 1)


class LazyGroup(click.Group):
    def main(self, *args, **kwargs):
        """Usage errors as one line (``Error: ...``, exit 2) naming where to look, not the usage text."""
        if kwargs.get("standalone_mode", True):
            try:
                return super().main(*args, **{**kwargs, "standalone_mode": False})
            except click.UsageError as e:
                hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
                click.echo(f"Error: {e.format_message()}{hint}", err=True)
                sys.exit(e.exit_code)
            except click.ClickException as e:
                e.show()
                sys.exit(e.exit_code)
            except click.exceptions.Exit as e:
                sys.exit(e.exit_code)
            except click.Abort:
                _on_own_line("Error: interrupted")
                sys.exit(130)
        return super().main(*args, **kwargs)

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            _on_own_line("Error: interrupted")
            sys.exit(130)
        except Exception as e:  # the CLI boundary: library errors become one line
            from clipkit.core.errors import ClipkitError
            settings = ctx.find_object(Settings)
            if settings is not None and settings.verbose:
                traceback.print_exc()
            if isinstance(e, ClipkitError):
                raise CliError(str(e)) from None
            err = click.ClickException(
                f"unexpected failure: {type(e).__name__}: {e} (run with -v for the traceback)")
            err.exit_code = 1
            raise err from None


def _on_own_line(msg: str) -> None:
    """A message on a line of its own, even when a progress bar holds the terminal's current line."""
    prefix = "\n" if sys.stderr.isatty() else ""
    click.echo(prefix + msg, err=True)


class _Formatter(logging.Formatter):
    def format(self, record):
        return f"{record.levelname.lower()}: {record.getMessage()}"


def setup_logging(verbose: bool, quiet: bool) -> None:
    """clipkit's own lines on stderr; third-party warnings and log lines only with ``-v``."""
    import os
    import warnings
    if not verbose:
        # diffusers/transformers configure their own loggers from these at first use, after us
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        warnings.filterwarnings("ignore")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger("clipkit")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING)
    root.propagate = False
    # Libraries that log through the root logger (open_clip) or chatty ones (huggingface_hub):
    # quiet unless -v. A NullHandler on root also stops logging's implicit basicConfig.
    logging.getLogger().addHandler(logging.NullHandler())
    for name in ("huggingface_hub", "transformers", "diffusers", "root"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)
    if not verbose:
        logging.getLogger().setLevel(logging.CRITICAL)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--profile", type=click.Choice(["shapes", "sd"]), default=None,
              help="Model profile: 'shapes' (bundled, offline; default) or 'sd' (real hub models).")
@click.option("--device", default="auto", show_default=True,
              help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32",
              show_default=True, help="Model precision (scores are always computed in fp32).")
@click.option("--threads", type=click.IntRange(min=0), default=None,
              help="torch CPU threads (0 = torch's default, one per core). Default: 1 for generate (fastest for the "
                   "bundled models on a shared CPU, and the same bytes on any machine: the thread count changes "
                   "float rounding), torch's default elsewhere.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging and full tracebacks.")
@click.option("-q", "--quiet", is_flag=True, help="Errors only; no progress bars or notices.")
@click.version_option(package_name="clipkit")
@click.pass_context
def cli(ctx, profile, device, precision, threads, verbose, quiet):
    """clipkit: CLIP scoring, zero-shot classification, guided generation, captioning, reranking.

    Runs offline on the bundled Shapes demo models by default; use --profile sd or --clip SPEC
    (openclip:ARCH/TAG, hf:ORG/NAME, or a local directory) for real models.
    """
    setup_logging(verbose, quiet)
    ctx.obj = Settings(profile, device, precision, verbose, quiet, threads)
    if threads and ctx.invoked_subcommand != "generate":       # generate sets its own (clipkit.generate's threads=)
        set_threads(threads)


def set_threads(n: int) -> None:
    """torch's CPU threads for this process: before torch is imported, through OMP_NUM_THREADS (read
    at its import); after, through torch itself."""
    import os
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    else:
        os.environ["OMP_NUM_THREADS"] = str(n)


def main():  # pragma: no cover - console entry point alias
    cli()


if __name__ == "__main__":  # `python -m clipkit.cli.main` / `accelerate launch -m clipkit.cli.main`
    cli()
