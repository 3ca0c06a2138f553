"""Neuron Studio."""


def version() -> str:
    """The installed distribution's version (what About shows and bug reports need)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _version

    try:
        return _version("neuron-studio")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"
