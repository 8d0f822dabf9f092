"""hilc: a hardware-in-the-loop deployment compiler for tiny neural networks."""

__version__ = "0.1.0"
