"""Run a manage.py command that kills itself with SIGKILL at one point of the stored-body code (kill -9 at that
moment, for tests/test_stored_bodies_crash.py):

    python tests/crashpoint.py POINT COMMAND [ARGS...]

POINT is one of:
- ``after-object-write``: ``deliver`` dies once the object is written, before the row that refers to it;
- ``after-row-commit``: ``deliver`` dies once the message row is committed;
- ``before-object-removal``: the server dies after a QUIT's commit, before the unreferenced object is removed;
- ``during-object-removal``: the server dies after deleting the object, before its row's deletion commits.
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def after(function):
    def wrapper(*args, **kwargs):
        result = function(*args, **kwargs)
        die()
        return result

    return wrapper


def main() -> None:
    point, *argv = sys.argv[1:]
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    import django

    django.setup()
    from django.core.files.storage import FileSystemStorage

    from popserver.mailin import delivery
    from popserver.storage import bodies

    if point == "after-object-write":
        bodies.write_object = after(bodies.write_object)
    elif point == "after-row-commit":
        delivery.store_prepared = after(delivery.store_prepared)
    elif point == "before-object-removal":
        bodies.remove_unreferenced = lambda *args, **kwargs: die()
        bodies.count_down.__globals__["remove_unreferenced"] = bodies.remove_unreferenced
    elif point == "during-object-removal":
        delete = FileSystemStorage.delete

        def delete_then_die(self, name):
            delete(self, name)
            if not name.startswith("probe/"):  # runpop3's start-up probe is not a body
                die()

        FileSystemStorage.delete = delete_then_die
    else:
        raise SystemExit(f"unknown point {point!r}")
    from django.core.management import execute_from_command_line

    execute_from_command_line(["manage.py", *argv])


if __name__ == "__main__":
    main()
