"""The meshctl broker node: pure cores (topics, codec, routing, config) and the I/O loop."""

__version__ = "0.1.0"
