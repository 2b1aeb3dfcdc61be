"""labelloop: a multi-label image classifier behind Label Studio that learns from annotations."""

__version__ = "0.1.0"
