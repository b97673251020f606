"""The one exception type that users see as a one-line message.

Library code raises `GPTSmallError` (or a subclass) for anything the user can fix: a bad flag, a
missing file, a text the tokenizer cannot encode. The CLI prints `error: <message>` and exits 2;
any other exception is a bug and keeps its traceback.
"""


class GPTSmallError(Exception):
    """A problem with the user's input, reported as one line."""


class ConfigError(GPTSmallError, ValueError):
    """A configuration field with an impossible value; the message names the field."""


def one_line(e: BaseException) -> str:
    """A library's exception as one line. torch.load(weights_only=True) refusing a pickle prints
    five lines that end by suggesting weights_only=False, which would run the file's code: that
    refusal is said in our words instead."""
    import pickle

    if isinstance(e, pickle.UnpicklingError):
        return ("it holds pickled objects other than tensors, which gpt-small refuses to load "
                "(loading them could run code from the file)")
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(e).__name__
