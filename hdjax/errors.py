"""The one exception type that launchers turn into a one-line message and a non-zero exit."""


class HdjaxError(Exception):
  """A user-facing error: bad input, missing file, unsupported model. Its message is one line."""
