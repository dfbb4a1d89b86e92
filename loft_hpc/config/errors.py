class ConfigError(ValueError):
    """A bad configuration value: the message names the key and the value, on one line."""
