"""Exception types that callers branch on (never on message text)."""


class NotSupported(OSError):
    """The running kernel lacks a feature kernel mode needs (EINVAL/EOPNOTSUPP/ENOSYS/EPERM...)."""


class RequestError(Exception):
    """A control request that cannot be carried out; `code` is one of control.ERROR_CODES."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
