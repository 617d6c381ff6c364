"""The errors cpp_ext raises on purpose.

cpp_ext imports nothing from guard, so that serving code can depend on it and not the
other way round; guard translates these into its own typed errors where it calls cpp_ext
(guard/folded.py). Each subclasses the builtin a caller would expect."""


class ExtensionError(Exception):
    """Base class of every error cpp_ext raises on purpose."""


class ExtensionUnavailableError(ExtensionError, ImportError):
    """The clip_guard operators cannot be called here: the extension is not built, or its
    build failed. The message has the reason and how to build it."""
