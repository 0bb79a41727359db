"""One exception type for every mistake a user can fix.

The CLI turns a ``UserError`` into a single line on stderr and exit code 2, so
bad input never ends in a traceback. Library code raises it with a message that
names the file, key or value and says what would be valid.
"""


class UserError(Exception):
    """A problem with the user's input, config or files (not a bug)."""
