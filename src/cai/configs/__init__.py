"""Shipped run configs (also at the repository root as configs/)."""

from importlib.resources import files
from pathlib import Path


def shipped_config(name: str) -> Path:
    """Path of a config file that ships inside the package, e.g. ``demo.yaml``."""
    return Path(str(files("cai.configs").joinpath(name)))
