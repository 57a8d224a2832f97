"""fusedrnn's benchmark harness: ``python -m fusedrnn.bench --help``.

Compares fusedrnn with torch.nn (cuDNN / oneDNN), the reference step loop and, when importable,
FlashRNN and haste, over a registry of configurations (configs.py), in inference and training
mode; every fusedrnn row also carries its error against torch.nn in float64. See bench/README.md.
"""
from .cli import main  # noqa: F401
