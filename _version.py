"""The package's version, in one place: pyproject.toml reads it from here (``dynamic = ["version"]``),
and every module imports it from here at its top."""

__version__ = "0.1.0"
