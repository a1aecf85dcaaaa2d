"""Packaging shim: the metadata lives in setup.cfg.

``twisted.plugins`` is listed there by hand because ``find_packages()`` skips it (it has no
``__init__.py``, on purpose: it is Twisted's namespace for plugins).
"""

from setuptools import setup

setup()
