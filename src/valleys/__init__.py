"""valleys: landscape-aware optimizers, schedules and loss-landscape diagnostics for PyTorch."""

__version__ = "0.1.0"
