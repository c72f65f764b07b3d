"""Errors the user can act on. Stages print them as one clear message, no traceback."""


class UserError(Exception):
    """A problem with input, params or environment that the user can fix.

    The message names the problem and the fix.
    """


class ParamError(UserError):
    """A params.yaml value is missing, of the wrong type or out of range."""

    def __init__(self, key: str, value: object, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"params.yaml: {key} = {short_repr(value)} is invalid: {allowed}")


class ParamErrors(ParamError):
    """Several params.yaml values are invalid: one line each. key/value/allowed are the first's."""

    def __init__(self, errors: list[ParamError]):
        self.errors = errors
        self.key, self.value, self.allowed = errors[0].key, errors[0].value, errors[0].allowed
        UserError.__init__(self, "\n".join(str(err) for err in errors))


def short_repr(value: object, limit: int = 80) -> str:
    """repr() of a value cut to about `limit` characters, without building the whole of a huge one."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxdict, r.maxlist, r.maxtuple, r.maxset = 3, 6, 6, 6, 6
    r.maxstring = r.maxother = r.maxlong = limit
    text = r.repr(value)
    return text if len(text) <= limit + 20 else text[:limit] + "..."


class UnsafeArchive(UserError):
    """An archive holds a member that would escape the target or exceed the caps."""
