"""The one exception type that users see as a one-line message.

Library code raises `GPTSmallError` (or a subclass) for anything the user can fix: a bad flag, a
missing file, a text the tokenizer cannot encode. The CLI prints `error: <message>` and exits 2;
any other exception is a bug and keeps its traceback.
"""


class GPTSmallError(Exception):
    """A problem with the user's input, reported as one line."""


class ConfigError(GPTSmallError, ValueError):
    """A configuration field with an impossible value; the message names the field."""
