"""The ``cnnforge`` command: parse, call the Python API, print. One module per command group;
TensorFlow is imported lazily, inside the commands that need it, so ``--help`` and
``plugins list`` stay instant."""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from cnnforge import registry
from cnnforge.cli import (
    bench_commands,
    data_commands,
    deploy_commands,
    export_command,
    plugin_commands,
    report_commands,
    search_commands,
    serve_command,
)
from cnnforge.cli.output import err_console, show_warning, silence_tensorflow_logs
from cnnforge.core.errors import CnnforgeError, CnnforgeWarning
from cnnforge.core.version import __version__


class CnnforgeGroup(click.Group):
    """Turns user errors into one line and a non-zero exit; tracebacks only under --debug."""

    def invoke(self, ctx: click.Context) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("always", CnnforgeWarning)
            warnings.showwarning = functools.partial(show_warning, warnings.showwarning)
            return self._invoke(ctx)

    def _invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except CnnforgeError as exc:
            self._fail(ctx, str(exc))
        except KeyboardInterrupt:
            self._fail(
                ctx, "interrupted; state is saved: run the same command again to resume", code=130
            )
        except Exception as exc:
            self._fail(
                ctx,
                f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
            )

    @staticmethod
    def _fail(ctx: click.Context, message: str, code: int = 1) -> None:
        if ctx.obj and ctx.obj.get("debug"):
            raise
        # escaped: a message's own brackets (pip install 'cnnforge[serve]') are not markup
        line = f"[bold red]Error:[/] {escape(message)}".replace("\n", " ")
        err_console.print(line, soft_wrap=True)
        ctx.exit(code)


@click.group(cls=CnnforgeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, envvar="CNNFORGE_DEBUG", help="Show tracebacks.")
@click.option(
    "--plugin",
    "plugins",
    multiple=True,
    metavar="PATH",
    help="Load plugins from a .py file or module (repeatable; also CNNFORGE_PLUGINS).",
)
@click.option(
    "--unsafe-deserialization",
    is_flag=True,
    envvar="CNNFORGE_UNSAFE_DESERIALIZATION",
    help="Load .keras files that hold Python code (Lambda layers). Only for files you trust.",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="CNNFORGE_CACHE_DIR",
    help="Folder on disk for the decoded pixels of folders read from disk every epoch "
    "(also CNNFORGE_CACHE_DIR) [default: ~/.cache/cnnforge, else the temporary folder, "
    "whichever is not tmpfs].",
)
@click.version_option(__version__, prog_name="cnnforge")
@click.pass_context
def cli(
    ctx: click.Context,
    debug: bool,
    plugins: tuple[str, ...],
    unsafe_deserialization: bool,
    cache_dir: Path | None,
) -> None:
    """cnnforge: a labelled image dataset to a deployable, benchmarked ONNX classifier."""
    ctx.obj = {"debug": debug}
    if cache_dir:
        os.environ["CNNFORGE_CACHE_DIR"] = str(cache_dir)
    if debug:
        os.environ["CNNFORGE_DEBUG"] = "1"
    else:
        silence_tensorflow_logs()
    if unsafe_deserialization:
        os.environ["CNNFORGE_UNSAFE_DESERIALIZATION"] = "1"
    registry.load_plugins(plugins)


for _command in (
    plugin_commands.plugins_group,
    data_commands.data_command,
    search_commands.search,
    search_commands.run,
    export_command.export,
    search_commands.trials,
    bench_commands.bench_group,
    deploy_commands.evaluate,
    deploy_commands.inspect_command,
    deploy_commands.predict_command,
    serve_command.serve,
    report_commands.report,
    report_commands.explain,
):
    cli.add_command(_command)


def main() -> None:
    """The console script ``cnnforge``."""
    cli(prog_name="cnnforge")
