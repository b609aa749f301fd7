"""Entry points into the trainers users already run: TRL (`rlhf_fast.integrations.trl`), verl and
OpenRLHF. Each module imports its peer lazily, inside its functions, so the core never does; this
package holds only what they share: the check of the peer's installed version against the range the
entry point was tested with.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
import warnings

__all__ = ["UntestedVersionWarning", "check_version"]


class UntestedVersionWarning(UserWarning):
    """A peer's installed version is outside the range an entry point was tested with.

    A warning, not an error: a patch release usually works, and the entry points' own checks (an
    option they do not support raises, naming it) still hold. To make it an error:
    `warnings.simplefilter("error", rlhf_fast.integrations.UntestedVersionWarning)`.
    """


def _release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: "1.16.0rc1" -> (1, 16, 0), "2.5" -> (2, 5, 0)."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    if match is None:
        raise ValueError(f"cannot read a version number from {version!r}")
    parts = tuple(int(p) for p in match.group(1).split("."))
    return parts + (0,) * (3 - len(parts))


def check_version(package: str, tested: str, lo: str, hi: str) -> str:
    """Check the installed `package` against the range `[lo, hi)` an entry point was tested in.

    Args:
        package: the distribution name, as pip spells it ("trl", "verl", "openrlhf").
        tested: the version(s) the tests ran on, for the message ("1.16.0").
        lo: the lowest supported release, inclusive ("1.16").
        hi: the first unsupported release, exclusive ("1.17").

    Returns the installed version string. Raises `ImportError` naming the package when it is not
    installed. Warns `UntestedVersionWarning`, naming the installed version, the tested one and the
    range, when the installed release is outside `[lo, hi)` (pre-releases count as their release).
    """
    try:
        installed = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(
            f"rlhf_fast.integrations: {package} is not installed; this entry point was tested with "
            f"{package} {tested} (supported range >={lo},<{hi})"
        ) from None
    if not _release(lo) <= _release(installed) < _release(hi):
        warnings.warn(
            f"rlhf_fast.integrations: {package} {installed} is installed, outside the range this entry "
            f"point was tested with (>={lo},<{hi}; tested on {tested}); its internals may have changed",
            UntestedVersionWarning,
            stacklevel=3,
        )
    return installed


@functools.cache
def warn_once_if_untested(package: str, tested: str, lo: str, hi: str) -> None:
    """``check_version`` once per process for drop-ins that do not need the peer: warns when an
    installed ``package`` is outside ``[lo, hi)``, and says nothing when it is absent."""
    try:
        check_version(package, tested, lo, hi)
    except ImportError:
        pass
