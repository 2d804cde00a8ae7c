class CTTError(Exception):
    """A problem the user can fix; its message is shown as one readable line, never a traceback."""
