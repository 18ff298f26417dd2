"""Exceptions raised by the Metal emulator."""


class MetalEmulationError(RuntimeError):
    """A kernel failed under emulation (bad access, deadlock, crash, ...)."""


class MetalEmulationTimeout(MetalEmulationError):
    """A kernel ran past the time limit and was killed."""


class CompileError(MetalEmulationError):
    """The C++ compiler rejected a kernel (the message has its diagnostics)."""


class TranslationError(MetalEmulationError, ValueError):
    """The Metal source uses a construct the emulator does not translate."""
