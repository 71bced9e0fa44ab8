"""A progress counter for management commands: on a terminal only, one line rewritten in place."""

import time


class Progress:
    """``progress(done)`` shows ``"\\r<verb> done/total"`` at most every ``interval`` seconds (and at the end)
    when ``stream`` is a terminal; ``finish()`` ends the line. Elsewhere (cron, pipes, tests) it writes nothing."""

    interval = 0.1

    def __init__(self, stream, total: int, verb: str, clock=time.monotonic):
        self.stream, self.total, self.verb, self.clock = stream, total, verb, clock
        self.enabled = bool(getattr(stream, "isatty", None) and stream.isatty())
        self.shown_at = None

    def __call__(self, done: int) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if done < self.total and self.shown_at is not None and now - self.shown_at < self.interval:
            return
        self.shown_at = now
        self.stream.write(f"\r{self.verb} {done}/{self.total}", style_func=_plain, ending="")
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled and self.shown_at is not None:
            self.stream.write("", style_func=_plain, ending="\n")
            self.stream.flush()


def _plain(text: str) -> str:
    return text
