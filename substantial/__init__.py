"""Substantial: brokerless durable execution for Python."""

from substantial.errors import *  # noqa: F403

__version__ = "0.2.0.dev0"
