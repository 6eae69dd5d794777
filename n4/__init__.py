"""The `n4` command. Serving lives in `server/`, kernels in `kernels/`, the model in `model/`; this package only
holds the command-line entry point that dispatches to them (nothing imports it)."""
__version__ = "0.1.0"
