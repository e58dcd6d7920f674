"""Where smartvm keeps built and downloaded artifacts that outlive one process.

One root for every cache (kernels, root filesystems, build trees, logs, locks) so that
`rm -rf` of one directory resets everything and CI can point it elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_DIR_ENV = "SMARTVM_CACHE_DIR"


def cache_root() -> Path:
    """The cache base directory: ``$SMARTVM_CACHE_DIR`` if set, else ``~/.cache/smartvm``.

    The directory is not created here; writers create what they need.
    """
    override = os.environ.get(CACHE_DIR_ENV)
    if override:
        return Path(override).expanduser().absolute()
    return Path.home() / ".cache" / "smartvm"
