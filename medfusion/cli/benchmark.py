"""``medfusion benchmark``: placeholder until its issue lands (owner replaces this module)."""


def register(subparsers) -> None:  # noqa: D103
    return None
