"""cai: Constitutional AI for your own model, from a written list of principles."""

__version__ = "0.1.0"
