"""Panel settings remembered between Slicer sessions (Qt's QSettings, "ACSGRegistration/<parameter>"): the
model and how to run and fine-tune it. Loaded into a new scene's parameter node, saved when they change."""

GROUP = "ACSGRegistration"


def load(parameters, names) -> None:
    """Set each named parameter from the settings (values of an older version that do not fit are skipped)."""
    import qt
    stored = qt.QSettings()
    for name in names:
        value = stored.value(f"{GROUP}/{name}")
        if value in (None, ""):
            continue
        try:
            setattr(parameters, name, type(getattr(parameters, name))(value))
        except (TypeError, ValueError):
            pass


def save(parameters, names) -> None:
    import qt
    stored = qt.QSettings()
    for name in names:
        stored.setValue(f"{GROUP}/{name}", str(getattr(parameters, name)))
