"""numbersvc: a gRPC service over Plivo's phone-number groups."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    __version__: str

__all__ = ["__version__"]


def __getattr__(name: str) -> Any:
    """Read `__version__` from the installed metadata on first use (PEP 562).

    NOTE: importlib.metadata costs tens of milliseconds that `numbersvc --help` need not pay.
    """
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        value = version("numbersvc")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        value = "0.0.0"
    globals()["__version__"] = value
    return value
