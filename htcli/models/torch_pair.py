"""A torch and a torchvision built for each other, checked before a pipeline loads.

pip can pair builds that do not match (for instance when the CPU wheel index is unreachable and
it falls back to PyPI): importing torchvision then fails deep inside the pipeline's imports with
"operator torchvision::nms does not exist", reported as "Could not import module
'T5EncoderModel'". `check_torch_pair` imports torchvision first and says which pair to install.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

from htcli.errors import HTError

# The pair .ci/run installs and tests with (README, "Two commands").
TESTED_PAIR = ("2.14.1", "0.29.1")


def matching_torchvision(torch_version: str) -> str:
    """The torchvision release series built for `torch_version` (torch 2.N pairs with torchvision 0.(N+15))."""
    major, minor, *_ = (torch_version.split("+")[0] + ".0.0").split(".")
    return f"0.{int(minor) + 15}.*" if major == "2" else "the release built for it"


def _installed(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def check_torch_pair() -> None:
    """HTError in one line, naming the pair to install, when torchvision does not fit the
    installed torch; nothing when it does, or when torchvision is not installed."""
    try:
        import_module("torchvision")
    except ImportError:
        return
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            raise
        torch_version, vision = _installed("torch"), _installed("torchvision")
        torch_pin, vision_pin = TESTED_PAIR
        raise HTError(f"torchvision {vision} was not built for torch {torch_version} ({error}): install a matching "
                      f"pair, e.g. pip install torch=={torch_pin} torchvision=={vision_pin} (the pair the tests use), "
                      f"or torchvision {matching_torchvision(torch_version)} for your torch") from None
