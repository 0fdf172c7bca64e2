"""Marks the wheel as platform-specific: it carries compiled modules (the provider and
the broker's C session code) that build_provider.py compiles before setuptools runs,
so setuptools cannot see them as extensions by itself."""

from __future__ import annotations

from setuptools import setup
from setuptools.dist import Distribution


class BinaryDistribution(Distribution):  # type: ignore[misc]
    def has_ext_modules(self) -> bool:
        return True


setup(distclass=BinaryDistribution)
