"""Pretrained weights that ship inside installed packages (nothing is downloaded at run time)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from selfimprove.errors import CheckpointError


def packaged_file(package: str, filename: str, what: str, install_hint: str, beside: tuple[str, ...] = ()) -> Path:
    """The file ``filename`` inside the installed ``package`` (found from its metadata, not imported),
    with the files ``beside`` in the same folder; a CheckpointError naming how to install it otherwise."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise CheckpointError(f"{what} needs the package {package!r}, which is not installed; install it with: "
                              f"{install_hint}") from None
    for f in dist.files or ():
        if f.name == filename:
            path = Path(str(dist.locate_file(f)))
            if path.is_file() and all((path.parent / other).is_file() for other in beside):
                return path
    raise CheckpointError(f"package {package!r} is installed but {', '.join((filename, *beside))} are not all in it; "
                          f"reinstall it with: {install_hint} --force-reinstall")
