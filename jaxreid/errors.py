"""Errors that carry a message for the user (what is wrong and what to do), shared by modules that
cannot import each other."""


class ConfigError(ValueError):
  """A config value that cannot work; the message starts with the key (`config.train.lr: ...`)."""
