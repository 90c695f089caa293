"""Where the world's data lives: one function, `data_dir()`, for the source tree and the wheel.

The JSON files stay in the repository's top-level ``data/`` folder (the project's layout is
fixed: minidpo/, lessons/, tests/, data/, ...). ``pyproject.toml`` maps that folder onto the
subpackage ``minidpo.data`` (``package-dir``), so a wheel ships it as package data at
``site-packages/minidpo/data/``. Two layouts therefore exist, and `data_dir()` checks them in
this order:

- installed from a wheel: ``<package>/data``, next to this file;
- a source checkout (the repository on ``sys.path``, or the editable install, which imports
  ``minidpo`` from the checkout): ``<package>/../data``, the top-level folder.

A path relative to the package, not ``importlib.resources``: the callers need a real
`pathlib.Path` (they glob ``topics/*.json`` and print paths in error messages), wheels are
always installed unzipped, and ``importlib.resources.files("minidpo.data")`` would not resolve
in a plain checkout, where no ``minidpo/data`` folder exists.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def data_dir() -> Path:
    """The folder holding ``gravity_example.json`` and ``explain/`` (installed or source).

    Returns the source-tree path when neither exists, so the loader's error names a real
    place to look (`minidpo.world.load_world` raises `MinidpoError` for a missing folder).
    """
    installed = _PACKAGE_DIR / "data"
    if installed.is_dir():
        return installed
    return _PACKAGE_DIR.parent / "data"
