"""ppbridge: HTTP into private networks over Redis pub/sub, with end-to-end encryption."""

__version__ = "0.1.0"
