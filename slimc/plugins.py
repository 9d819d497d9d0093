"""The plugin manager: built-ins and third-party plugins, loaded the same way.

Built-in modules are registered first (as pytest's default plugins), then every module named in
the ``slimc`` entry-point group. A plugin that fails to import, or whose hook raises, is recorded
in :attr:`Registry.broken` with its name and the reason and skipped; the rest of slimc keeps
working and ``slimc passes`` shows what went wrong.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import pluggy

from slimc import hookspec
from slimc.errors import PluginError, UsageError

ENTRY_POINT_GROUP = "slimc"
#: Environment variables for CI: load no third-party plugins / only these (comma-separated).
NO_PLUGINS_ENV = "SLIMC_NO_PLUGINS"
PLUGINS_ENV = "SLIMC_PLUGINS"
#: Set by the CLI's --plugins / --no-plugins for the current invocation.
cli_selection: tuple[str, ...] | None = None

#: Modules that implement slimc's own features through the public hooks.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "slimc.loaders.builtin",
    "slimc.evaluators",
    "slimc.passes.builtin",
    "slimc.backends.builtin",
)


@dataclass(frozen=True)
class BrokenPlugin:
    """A plugin that could not be used, and why."""

    name: str
    reason: str


@dataclass
class Registry:
    """Everything the plugins registered, by kind, with the plugin that provided each item."""

    passes: dict[str, Any] = field(default_factory=dict)
    targets: dict[str, Any] = field(default_factory=dict)
    backends: dict[str, Any] = field(default_factory=dict)
    loaders: list[Any] = field(default_factory=list)
    evaluators: dict[str, Any] = field(default_factory=dict)
    converters: dict[Any, Any] = field(default_factory=dict)
    provider: dict[tuple[str, str], str] = field(default_factory=dict)
    broken: list[BrokenPlugin] = field(default_factory=list)
    plugin_names: list[str] = field(default_factory=list)

    def provided_by(self, kind: str, name: str) -> str:
        """Name of the plugin that registered ``name`` of ``kind`` ("pass", "target", ...)."""
        return self.provider.get((kind, name), "?")


def _plugin_display_name(pm: pluggy.PluginManager, plugin: object) -> str:
    name = pm.get_name(plugin) or getattr(plugin, "__name__", repr(plugin))
    return name


def selected_plugins(plugins: Sequence[str] | None = None) -> tuple[str, ...] | None:
    """Which third-party plugins to load: ``plugins`` if given, else ``$SLIMC_NO_PLUGINS``
    (any non-empty value but 0: none) or ``$SLIMC_PLUGINS`` (comma-separated entry-point
    names); None means all installed ones."""
    if plugins is not None:
        return tuple(plugins)
    if cli_selection is not None:
        return cli_selection
    if os.environ.get(NO_PLUGINS_ENV, "").strip() not in ("", "0"):
        return ()
    listed = os.environ.get(PLUGINS_ENV)
    if listed is not None:
        return tuple(p.strip() for p in listed.split(",") if p.strip())
    return None


def _load_entry_points(pm: pluggy.PluginManager, registry: Registry,
                       only: tuple[str, ...] | None) -> None:
    available = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
                 if ep.value not in BUILTIN_PLUGINS]
    if only is not None:
        unknown = sorted(set(only) - {ep.name for ep in available})
        if unknown:
            raise UsageError(f"Plugin(s) {', '.join(unknown)} are not installed.",
                             hint="Installed plugins: "
                             f"{', '.join(sorted(ep.name for ep in available)) or 'none'}.")
    for ep in available:
        if pm.has_plugin(ep.name) or (only is not None and ep.name not in only):
            continue
        try:
            module = ep.load()
            pm.register(module, name=ep.name)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - a broken plugin must not
            # break slimc, not even one that calls sys.exit() at import
            what = (f"exited with sys.exit({exc.code!r}) while importing"
                    if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}")
            registry.broken.append(
                BrokenPlugin(ep.name, f"failed to load {ep.value!r}: {what}")
            )


def _collect(
    pm: pluggy.PluginManager,
    registry: Registry,
    hook_name: str,
    add: Callable[[str, Any], None],
) -> None:
    """Call one registration hook plugin by plugin, so one bad plugin is isolated."""
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        plugin_name = _plugin_display_name(pm, impl.plugin)
        try:
            items = impl.function()
            if items is None:
                continue
            for item in items.items() if isinstance(items, dict) else items:
                add(plugin_name, item)
        except PluginError as exc:
            registry.broken.append(BrokenPlugin(plugin_name, str(exc)))
        except (Exception, SystemExit) as exc:  # noqa: BLE001
            registry.broken.append(
                BrokenPlugin(plugin_name, f"hook {hook_name} raised {type(exc).__name__}: {exc}")
            )


def _add_named(registry: Registry, kind: str, table: dict[str, Any], names: Iterable[str]):
    def add(plugin_name: str, item: Any) -> None:
        for name in names(item) if callable(names) else names:
            key = name.lower()
            if key in table and table[key] is not item:
                other = registry.provided_by(kind, key)
                raise PluginError(
                    f"plugin {plugin_name!r} registers {kind} {name!r}, which plugin {other!r} "
                    "already provides; the second registration was ignored."
                )
            table[key] = item
            registry.provider[(kind, key)] = plugin_name

    return add


def build_registry(extra_plugins: Iterable[object] = (),
                   plugins: Sequence[str] | None = None) -> Registry:
    """Create a plugin manager, load built-ins + entry points, and collect registrations.

    ``plugins`` names the entry points to load (None: see :func:`selected_plugins`)."""
    registry = Registry()
    pm = pluggy.PluginManager("slimc")
    pm.add_hookspecs(hookspec)
    for module_name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    _load_entry_points(pm, registry, selected_plugins(plugins))
    for plugin in extra_plugins:
        pm.register(plugin)
    registry.plugin_names = [_plugin_display_name(pm, p) for p in pm.get_plugins()]

    _collect(pm, registry, "slimc_register_passes",
             _add_named(registry, "pass", registry.passes, lambda cls: [cls.name]))
    _collect(pm, registry, "slimc_register_targets",
             _add_named(registry, "target", registry.targets,
                        lambda spec: [spec.name, *spec.aliases]))

    _collect(pm, registry, "slimc_register_backends",
             _add_named(registry, "backend", registry.backends,
                        lambda backend: [backend.name, *backend.aliases]))

    def add_loader(plugin_name: str, loader: Any) -> None:
        registry.loaders.append(loader)
        registry.provider[("loader", loader.name)] = plugin_name

    _collect(pm, registry, "slimc_register_loaders", add_loader)
    _collect(pm, registry, "slimc_register_evaluators",
             _add_named(registry, "evaluator", registry.evaluators, lambda ev: [ev.name]))

    def add_converter(plugin_name: str, item: tuple[Any, Any]) -> None:
        key, fn = item
        registry.converters[key] = fn
        registry.provider[("converter", str(key))] = plugin_name

    _collect(pm, registry, "slimc_register_converters", add_converter)
    return registry


def get_registry(plugins: Sequence[str] | None = None) -> Registry:
    """The process-wide registry (plugins are discovered once per selection, as pytest does at
    start-up); ``plugins`` as in :func:`build_registry`."""
    return _cached_registry(selected_plugins(plugins))


@lru_cache(maxsize=4)
def _cached_registry(only: tuple[str, ...] | None) -> Registry:
    return build_registry(plugins=only)


get_registry.cache_clear = _cached_registry.cache_clear  # type: ignore[attr-defined]


def loaded_registries() -> list[Registry]:
    """The registries this process has built so far (none before the first get_registry)."""
    if _cached_registry.cache_info().currsize == 0:
        return []
    return [get_registry()]


def is_builtin(plugin_name: str) -> bool:
    return plugin_name in BUILTIN_PLUGINS
