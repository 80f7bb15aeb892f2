"""CLI subcommands of the export phase (placeholder until the export phase lands)."""


def add_export_commands(sub) -> None:
    """Register ``lepton export`` and ``lepton serve`` on the ``lepton`` subparsers; each parser
    sets ``handler=`` (a function taking the parsed args, returning an exit code)."""
