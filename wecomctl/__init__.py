"""wecomctl: add campaign leads as WeCom customers and send the welcome."""

__version__ = "0.1.0"
