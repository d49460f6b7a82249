"""Reading settings that come from config.yml or the environment."""


def flag(value):
    """A yes/no setting, given as YAML (``true``) or as text (``"1"``)."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)
