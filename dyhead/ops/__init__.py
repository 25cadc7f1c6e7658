from .deform_conv import deform_conv2d, resolve_backend

__all__ = ["deform_conv2d", "resolve_backend"]
