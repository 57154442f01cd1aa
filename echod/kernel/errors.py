"""Exception types that callers branch on (never on message text)."""


class NotSupported(OSError):
    """The running kernel lacks a feature kernel mode needs (EINVAL/EOPNOTSUPP/ENOSYS/EPERM...)."""
