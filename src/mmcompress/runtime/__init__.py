"""Running loaded models: the decode engine (:mod:`.decode`)."""

import os


def huge_pages_on(environ=os.environ) -> bool:
    """Whether torch backs this process's large CPU allocations with transparent huge pages
    (``THP_MEM_ALLOC_ENABLE``; :func:`mmcompress.cli.huge_pages_for` sets it for the decoding commands)."""
    return environ.get("THP_MEM_ALLOC_ENABLE", "0") not in ("", "0")
