"""carapace-debug: the operator's command line.

Each command lives in its own module and is registered here, so importing
this file stays cheap and a broken command cannot hide the others.
"""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="carapace")
def cli() -> None:
    """Inspect and test a Carapace deployment."""


def _register() -> None:
    # Commands register themselves here, one import each.
    from carapace.debug.policy_cmd import policy
    from carapace.debug.sse_test import sse_test

    cli.add_command(sse_test)
    cli.add_command(policy)

    from carapace.debug.ops import audit, connections, health
    from carapace.debug.sniff import sniff

    for command in (health, connections, audit, sniff):
        cli.add_command(command)

    from carapace.debug.approvals import approvals, approve, deny

    for command in (approvals, approve, deny):
        cli.add_command(command)


_register()


def main() -> None:
    cli()
