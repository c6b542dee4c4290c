"""The one source of Triton's interpreter flag. Importing this module does not import Triton."""

from __future__ import annotations

import os


def interpreting() -> bool:
    """True when Triton runs (or would run) in its CPU interpreter: ``TRITON_INTERPRET`` set and not ``0``.

    Triton reads the variable when it is imported, so it must be set before the first Triton import.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
