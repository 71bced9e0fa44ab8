"""The verb registry: one ``pop_VERB`` method per POP3 command, described once by the ``@command`` decorator.

The decorator records a verb's states, arity, syntax, capability tag and availability (as aiosmtpd's
``@syntax``); ``collect_commands`` builds the table once per session class. The state gate, the arity check
and CAPA (RFC 2449 s.5) are all derived from that table, so they cannot drift from what is implemented.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar


class State(enum.Enum):
    """RFC 1939 s.3: the states of a POP3 session, in the order a session goes through them."""

    AUTHORIZATION = 1
    TRANSACTION = 2
    UPDATE = 3  # after QUIT in TRANSACTION; the session is over


AUTHORIZATION_ONLY = frozenset({State.AUTHORIZATION})
TRANSACTION_ONLY = frozenset({State.TRANSACTION})
BOTH_STATES = frozenset({State.AUTHORIZATION, State.TRANSACTION})


class CommandError(Exception):
    """Refuse the current command: ``text`` goes after ``-ERR `` and the command counts as a bad one
    (before login only an ``UnknownCommand`` counts, as in Dovecot's pop3-login)."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text


class UnknownCommand(CommandError):
    """A verb that does not exist, or is not valid in the current state."""


class Session(Protocol):
    """What the registry needs of a session (``Pop3Session`` is one); no import of it, so no circle."""

    state: State


SessionPredicate = Callable[[Session], bool]
CapabilityTag = str | Callable[[Session], str | None]
UnavailableReply = str | Callable[[Session], str]

_ATTRIBUTE = "_pop3_command"
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class Command:
    """One verb as the registry knows it."""

    verb: str
    handler: Callable[..., Any]
    states: frozenset[State]
    min_args: int
    max_args: int
    rest_of_line: bool  # the argument is everything after one space, spaces included (PASS, RFC 1939 s.7)
    syntax: str
    capability: CapabilityTag | None
    available: SessionPredicate | None
    unavailable: UnavailableReply
    flush_before: bool  # hand earlier output to the server before running (QUIT commits)

    def allowed_in(self, state: State) -> bool:
        return state in self.states

    def is_available(self, session: Session) -> bool:
        return self.available is None or bool(self.available(session))

    def unavailable_reply(self, session: Session) -> str:
        return self.unavailable(session) if callable(self.unavailable) else self.unavailable

    def capability_tag(self, session: Session) -> str | None:
        """The CAPA line for this verb now, or None.

        RFC 2449 s.5 lists what the server supports; as Dovecot does, a tag is shown while its verb can still
        be used in this session: in the current state or a later one, and only when available.
        """
        if self.capability is None or not self.is_available(session):
            return None
        if not any(state.value >= session.state.value for state in self.states):
            return None
        return self.capability(session) if callable(self.capability) else self.capability

    @property
    def survives_login(self) -> bool:
        return State.TRANSACTION in self.states

    def parse_arguments(self, rest: bytes | None) -> tuple[bytes, ...]:
        """Split the argument part of a command line (``None`` when the line had no space after the verb).

        RFC 1939 s.3 separates arguments by a single space; runs of whitespace are accepted too. A verb that
        takes no arguments ignores any it is given, as Dovecot does (``QUIT now`` still logs out).
        """
        if self.rest_of_line:
            if rest is None:
                raise CommandError(f"Missing argument. Syntax: {self.syntax}")
            return (rest,)
        if self.max_args == 0:
            return ()
        args = tuple(rest.split()) if rest else ()
        if len(args) < self.min_args:
            raise CommandError(f"Missing argument. Syntax: {self.syntax}")
        if len(args) > self.max_args:
            raise CommandError(f"Too many arguments. Syntax: {self.syntax}")
        return args


def command(
    verb: str,
    *,
    states: Iterable[State],
    min_args: int = 0,
    max_args: int | None = None,
    rest_of_line: bool = False,
    syntax: str | None = None,
    capability: CapabilityTag | None = None,
    available: SessionPredicate | None = None,
    unavailable: UnavailableReply = "Command not available.",
    flush_before: bool = False,
) -> Callable[[F], F]:
    """Register the decorated ``pop_<VERB>`` method as the handler of ``verb``.

    ``capability``: the CAPA tag (a string, or a callable of the session returning one or None).
    ``available``: whether the verb can be used on this session now (it also hides the tag);
    ``unavailable``: the ``-ERR`` text when it cannot. ``max_args`` defaults to ``min_args``.
    """
    verb = verb.upper()

    def decorate(handler: F) -> F:
        setattr(
            handler,
            _ATTRIBUTE,
            Command(
                verb=verb,
                handler=handler,
                states=frozenset(states),
                min_args=min_args,
                max_args=min_args if max_args is None else max_args,
                rest_of_line=rest_of_line,
                syntax=syntax or verb,
                capability=capability,
                available=available,
                unavailable=unavailable,
                flush_before=flush_before,
            ),
        )
        return handler

    return decorate


def collect_commands(cls: type) -> dict[str, Command]:
    """The verb table of a session class, in definition order (base classes first; overrides keep the place).

    Built once per class, never by ``getattr`` on client input. Handlers must be named ``pop_<VERB>`` so
    that a reader finds the code for RETR by searching for ``pop_RETR``.
    """
    table: dict[str, Command] = {}
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            cmd = getattr(value, _ATTRIBUTE, None)
            if not isinstance(cmd, Command):
                continue
            if name != f"pop_{cmd.verb}":
                raise TypeError(
                    f"{klass.__name__}.{name}: the handler of {cmd.verb} must be named pop_{cmd.verb}"
                )
            table[cmd.verb] = cmd
    return table


def capability_tags(
    commands: dict[str, Command],
    session: Session,
    extensions: Iterable[str],
    implementation: str = "",
) -> list[str]:
    """CAPA's lines (RFC 2449 s.5), in Dovecot's order.

    First the tags of verbs that stay usable after login (CAPA, TOP, UIDL), then the engine's extensions
    (RESP-CODES, PIPELINING, AUTH-RESP-CODE), then the tags of login-only verbs (STLS, USER, SASL), then
    IMPLEMENTATION (RFC 2449 s.6.9). Within a group, the order of definition in the session class.
    """
    persistent: list[str] = []
    login_only: list[str] = []
    for cmd in commands.values():
        tag = cmd.capability_tag(session)
        if tag:
            (persistent if cmd.survives_login else login_only).append(tag)
    tags = [*persistent, *extensions, *login_only]
    if implementation:
        tags.append(f"IMPLEMENTATION {implementation}")
    return tags
