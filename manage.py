#!/usr/bin/env python
"""Django's command-line utility for the default popserver deployment."""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    if sys.argv[1:2] == ["deliver"]:
        # The MDA must exit with a sysexits status and a one-line reason whatever fails, also a settings
        # module that cannot be imported (Django's own start-up would print a traceback): 75 = retry later.
        try:
            from popserver.management.commands.deliver import main as deliver
        except BaseException as exc:  # noqa: BLE001
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())
            sys.stderr.write(f"deliver: cannot load popserver: {reason}\n")
            sys.exit(75)
        deliver(sys.argv)
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
