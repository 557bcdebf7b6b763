"""numbersvc: a gRPC service over Plivo's phone-number groups."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("numbersvc")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["__version__"]
