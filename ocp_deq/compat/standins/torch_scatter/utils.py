from . import broadcast

__all__ = ["broadcast"]
