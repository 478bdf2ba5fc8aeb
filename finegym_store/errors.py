"""Exception types of finegym-store.

Every error a user can cause is one of these (or a KeyError, IndexError,
OSError from the standard hierarchy), and its message names the file, the key
or the field involved and what was expected.
"""

from __future__ import annotations

import pickle

from ._core import ForkedJobError, FormatError

__all__ = ["FormatError", "ConversionError", "LabelSpaceError", "UnsafePickleError", "ForkedJobError"]

FormatError.__doc__ = (
    "A store file is corrupt, truncated, foreign or of an unsupported format "
    "version. A ValueError; the message names the path and what is wrong."
)
FormatError.__module__ = "finegym_store"

ForkedJobError.__doc__ = (
    "A background gather (a loader's prefetch) started in another process was "
    "waited for in a fork()ed child. A RuntimeError: start a new iteration in the child."
)
ForkedJobError.__module__ = "finegym_store"


class ConversionError(ValueError):
    """Input to ``convert`` is unusable: the message names the file and the key."""


class UnsafePickleError(ConversionError, pickle.UnpicklingError):
    """A pickle asked for a global outside the allow-list (numpy arrays and
    plain containers). Pass ``trust_pickle=True`` only for files you trust."""


class LabelSpaceError(ConversionError):
    """Labels do not fit a label space: a split's labels against the
    categories converted with them (gym99 labels with gym288 names), or a
    train store against a val store in the probe. The message names both."""
