"""Registers slimc's built-in loaders through the public hook, like any plugin."""

from __future__ import annotations

from slimc.hookspec import hookimpl
from slimc.loaders.factory import FactoryLoader
from slimc.loaders.huggingface import HuggingFaceLoader
from slimc.loaders.pt2 import ExportedProgramLoader


@hookimpl
def slimc_register_loaders():
    return [ExportedProgramLoader(), HuggingFaceLoader(), FactoryLoader()]
