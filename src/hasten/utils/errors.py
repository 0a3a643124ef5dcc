"""The exceptions hasten raises, in one hierarchy.

::

    Exception
    └── HastenError                          every error raised on purpose by hasten
        ├── DistributedOperationException    a collective called with mismatched inputs across ranks
        │                                    (Accelerate's name, kept importable)
        ├── ProcessGroupError                the process group could not be formed or used
        │   └── RendezvousTimeoutError       (also TimeoutError) a peer never arrived in time
        ├── ConfigurationError               (also ValueError) a setting or argument has a bad value
        ├── TreeNestingError                 (also ValueError) a nested structure contains itself or is
        │                                    nested deeper than Python can recurse
        ├── CheckpointError                  (also ValueError) a checkpoint is missing, corrupt or unsafe
        └── StateResetError                  (also AttributeError, RuntimeError) a shared state was read
                                             after its reset

    UserWarning
    └── CannotPadNestedTensorWarning         a nested tensor was left unpadded (Accelerate's name)

Where a builtin exception type is what callers already catch (``ValueError``
for a bad argument, ``TimeoutError`` for a timeout, ``ImportError`` for a
missing optional package), hasten raises that type or a subclass of both.
"""

from __future__ import annotations


class HastenError(Exception):
    """Base class of every exception hasten raises deliberately."""


class DistributedOperationException(HastenError):
    """A collective was called with inputs that do not match across ranks."""


class ProcessGroupError(HastenError):
    """The process group could not be created, joined or used."""


class RendezvousTimeoutError(ProcessGroupError, TimeoutError):
    """A peer did not arrive at the rendezvous (or a collective) before the timeout."""


class ConfigurationError(HastenError, ValueError):
    """A setting, argument or environment variable has a value hasten cannot use."""


class TreeNestingError(HastenError, ValueError):
    """A nested structure refers to itself, or is nested deeper than Python can recurse."""


class CheckpointError(HastenError, ValueError):
    """A checkpoint file or index is missing, corrupt, inconsistent or unsafe to read."""


class CannotPadNestedTensorWarning(UserWarning):
    """A nested tensor was passed to a padding operation and returned unpadded."""


class StateResetError(HastenError, AttributeError, RuntimeError):
    """A shared state (``PartialState``, ``AcceleratorState``, ``GradientState``) was read after its reset.

    An ``AttributeError`` so that ``getattr(state, name, default)`` returns the default, as with
    Accelerate (whose reset state has no attributes); a ``RuntimeError`` as hasten raised before.
    """
