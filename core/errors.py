"""Typed errors. Every failure a user can cause has its own class and a message naming the problem."""


class MoetierError(Exception):
    """Base of every error moetier raises on purpose."""


class PluginError(MoetierError):
    """A plugin is malformed: unknown hook, duplicate name, failed import."""


class BackendUnavailable(MoetierError):
    """A backend was requested that cannot run on this host (the message carries the probe's reason)."""


class SelectionError(MoetierError):
    """Backend selection failed, e.g. a --strict run would have been downgraded."""


class ShapeError(MoetierError, ValueError):
    """A tensor has the wrong shape, rank or layout."""


class DTypeError(MoetierError, TypeError):
    """A tensor has a dtype the call does not accept."""


class DeviceError(DTypeError):
    """A tensor lives on another device than the backend computing it (a DTypeError for older callers)."""


class PreparedExpertsError(MoetierError, TypeError):
    """A forward got experts that this backend did not prepare (another backend's, or not PreparedExperts)."""


class ExpertIdError(MoetierError, IndexError):
    """An expert id lies outside [0, num_experts)."""


class FormatError(MoetierError, ValueError):
    """A weight format is unknown, malformed, or not supported by the chosen backend."""


class NonFiniteError(MoetierError, ValueError):
    """NaN or Inf found where the NaN policy forbids it."""


class CheckpointError(MoetierError):
    """A checkpoint is missing a tensor, truncated, or does not match its config."""


class LayoutError(MoetierError, ValueError):
    """A model config asks for something its family does not implement."""


class BudgetError(MoetierError, ValueError):
    """A placement cannot fit in the memory budget given."""


class SettingError(MoetierError):
    """A setting the user made (an option or an environment variable) cannot be honoured: never ignored."""


class KernelVariantError(MoetierError):
    """A compiled kernel variant was requested that this CPU cannot execute."""
