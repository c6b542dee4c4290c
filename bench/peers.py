"""The peers' installed versions, and verl's kernel modules imported without verl's package ``__init__``.

verl 0.9.1's ``import verl`` pulls in Ray and its protocol (and verl pins ``transformers<5.11``), none of
which the lm-head functions need: ``verl.utils.experimental.torch_functional`` (``FusedLinearForPPO``) imports
torch alone, ``verl.utils.kernel.linear_cross_entropy`` torch and Triton. :func:`verl_module` registers
verl's package folders as bare packages and imports just the module asked for, so the bench can run beside
transformers 5.x with ``pip install --no-deps verl==0.9.1`` (see README, "Benchmarks").
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from importlib.metadata import PackageNotFoundError, version

PEER_PACKAGES = ("trl", "verl", "liger-kernel", "cut-cross-entropy", "transformers", "triton")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PEER_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def verl_module(name: str) -> types.ModuleType:
    """Import ``verl.<name>`` without running the ``__init__`` of ``verl`` or of the packages above it.

    Raises:
        ImportError: verl is not installed (``pip install --no-deps verl==0.9.1``).
    """
    full = f"verl.{name}"
    if full in sys.modules:
        return sys.modules[full]
    if "verl" in sys.modules:
        root = list(sys.modules["verl"].__path__)[0]
    else:
        spec = importlib.util.find_spec("verl")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("verl is not installed: pip install --no-deps 'verl==0.9.1'")
        root = list(spec.submodule_search_locations)[0]
    parts = full.split(".")
    for i in range(1, len(parts)):
        pkg = ".".join(parts[:i])
        if pkg not in sys.modules:
            bare = types.ModuleType(pkg)
            bare.__path__ = [root + "/" + "/".join(parts[1:i])] if i > 1 else [root]
            sys.modules[pkg] = bare
    return importlib.import_module(full)
