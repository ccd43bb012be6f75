"""The compiled core must be what runs: fail loudly if kimiha._core is a pure-Python fallback or missing."""

import importlib.machinery
import inspect

import kimiha
import kimiha._core as core


def test_core_is_compiled_extension():
    path = core.__file__
    assert path is not None
    assert path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), path
    assert isinstance(core.__loader__, importlib.machinery.ExtensionFileLoader)
    # Cython functions are not Python functions: no __code__ a pure module would have.
    assert not inspect.isfunction(core.monotonic_ns)


def test_hot_classes_come_from_core():
    assert kimiha.Subscription.__module__ == "kimiha._core"
    assert kimiha.Channel.__module__ == "kimiha._core"
    assert issubclass(kimiha.EventBus, core.EventBusCore)


def test_help_works_on_compiled_classes():
    # embedsignature: help() shows real signatures
    assert "publish" in (core.EventBusCore.publish.__doc__ or "")
    assert core.Subscription.drain.__doc__
