"""The ``dclsify`` command line: thin layers over the documented Python functions."""

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)


def main() -> None:
    app()
