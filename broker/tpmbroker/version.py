"""The package's version, for the wire's HELLO, STATUS and --version (pyproject.toml
says it too)."""

from __future__ import annotations

__version__ = "0.1.0"
