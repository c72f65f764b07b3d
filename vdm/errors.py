"""Errors the user can act on. Stages print them as one clear message, no traceback."""


class UserError(Exception):
    """A problem with input, params or environment that the user can fix.

    The message names the problem and the fix.
    """


class ParamError(UserError):
    """A params.yaml value is missing, of the wrong type or out of range."""

    def __init__(self, key: str, value: object, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"params.yaml: {key} = {value!r} is invalid: {allowed}")


class UnsafeArchive(UserError):
    """An archive holds a member that would escape the target or exceed the caps."""
