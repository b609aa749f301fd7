"""The optional parts of rlhf_fast and the packages each needs (pyproject.toml's extras).

The kernel library (ops, nn, backends, reference, kernels, extension) needs only torch and numpy;
training needs the ``[train]`` extra and the benchmark reports the ``[bench]`` one. A part that
lacks its packages fails on import with one line naming the extra, not with a traceback from deep
inside transformers.
"""

from __future__ import annotations

import importlib.util

# extra -> {module imported: distribution to install}
EXTRAS: dict[str, dict[str, str]] = {
    "train": {
        "transformers": "transformers",
        "tokenizers": "tokenizers",
        "safetensors": "safetensors",
        "tqdm": "tqdm",
        "matplotlib": "matplotlib",
        "yaml": "pyyaml",
    },
    "bench": {"matplotlib": "matplotlib", "transformers": "transformers"},  # plots; the RL-step model
}


class MissingExtra(ImportError):
    """A part of rlhf_fast was used without the packages of its extra."""


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a blocked or half-imported module counts as missing
        return False


def missing(extra: str) -> list[str]:
    """The distributions of ``extra`` that cannot be imported here."""
    return [dist for module, dist in EXTRAS[extra].items() if not _importable(module)]


def require(extra: str, part: str) -> None:
    """Raise MissingExtra naming the extra when ``part`` cannot have its packages."""
    lacking = missing(extra)
    if lacking:
        raise MissingExtra(f"{part} needs the [{extra}] extra (missing: {', '.join(lacking)}); "
                           f"install it with: python -m pip install 'rlhf_fast[{extra}]'")
