"""A tiny POP3 server with switchable faults, to prove that each check of the conformance kit can fail.

It is written from RFC 1939 on purpose, not from popserver's engine: the kit must catch bugs in servers
that are not ours. Without faults it is correct (dot-stuffing, CRLF sizes, an exclusive lock, DELE that
marks, UPDATE at QUIT, stable UIDLs, CAPA, STLS, SASL PLAIN/LOGIN, UTF8). Each name in ``FAULTS`` breaks one
thing. It also listens for LMTP and SMTP, so the kit can deliver to it from another process.
"""

from __future__ import annotations

import base64
import binascii
import re
import socketserver
import ssl
import threading

FAULTS = {
    # RFC 1939 states and commands
    "greeting_err": "the greeting is -ERR",
    "lowercase_ok": "NOOP answers '+ok'",
    "any_password": "every password is right",
    "quit_auth_silent": "QUIT before login closes without +OK",
    "stat_before_login": "STAT before login answers +OK 0 0",
    "case_sensitive": "lower-case verbs are unknown",
    "stat_wrong_octets": "STAT adds 1 to the octets",
    "list_zero_based": "LIST numbers messages from 0",
    "lax_numbers": "0 and numbers past the last mean message 1",
    "noop_err": "NOOP answers -ERR",
    "unknown_closes": "an unknown command closes the connection",
    "deleted_accessible": "a deleted message can still be retrieved",
    "renumber": "DELE renumbers the messages that follow",
    "immediate_dele": "DELE deletes at once",
    "quit_keeps": "QUIT deletes nothing",
    "no_rset": "RSET unmarks nothing",
    "no_lock": "no exclusive lock",
    "lock_breaks_holder": "a refused second login breaks the session holding the lock",
    "lock_kept_after_quit": "QUIT releases the lock 0.2 s late",
    "lock_kept_on_drop": "a dropped connection never releases the lock",
    "lock_no_code": "the lock refusal has no [IN-USE]",
    "live_view": "new mail shows up in the open session",
    "autologout_fast": "an idle session is closed after 0.3 s",
    # message bytes
    "wrong_sizes": "LIST sizes count the stored bytes (a bare LF as one octet)",
    "raw_lf": "RETR sends bare LFs as they are",
    "no_stuffing": "no dot-stuffing",
    "top_no_stuffing": "no dot-stuffing in TOP",
    "chunked_stuffing": "dot-stuffing 4096 octets at a time, forgetting what came before",
    "no_final_crlf": "no CRLF after an unterminated last line",
    "strip_8bit": "the eighth bit is cleared",
    "nul_truncate": "a message ends at its first NUL",
    "wrap_long_lines": "lines over 998 octets are wrapped",
    "lone_cr_to_crlf": "a lone CR becomes CRLF",
    "add_blank_line": "a message without a blank line gets one",
    "top_ignores_lines": "TOP sends the whole message",
    "top_no_blank": "TOP n 0 leaves out the blank line",
    # UIDL
    "uidl_long": "unique-ids of 80 characters",
    "uidl_dup": "every message has the same unique-id",
    "uidl_unstable": "unique-ids change with every session",
    "uidl_single_mismatch": "UIDL n gives another id than the listing",
    "uidl_shows_deleted": "the UIDL listing keeps deleted messages",
    "uidl_reuse": "unique-ids are positions, so they are reused",
    # RFC 2449
    "no_capa": "CAPA answers -ERR",
    "capa_auth_only": "CAPA after login answers -ERR",
    "capa_bad": "CAPA lists PIPELINE and 'LOGIN-DELAY soon'",
    "capa_lies": "TOP is announced but answers -ERR",
    "short_lines": "command lines over 100 octets are refused",
    "long_greeting": "a greeting of 600 octets",
    "bad_resp_code": "an unknown command gets '-ERR [UNKNOWN' (unclosed)",
    "no_auth_code": "a wrong password gets -ERR without [AUTH]",
    "no_pipelining": "only the first of several pipelined commands is answered",
    # TLS
    "implicit_plain": "the implicit-TLS port speaks plaintext",
    "stls_refused": "STLS is announced but answers -ERR",
    "stls_still_announced": "CAPA inside TLS still announces STLS",
    "stls_twice": "STLS inside TLS answers +OK",
    "stls_injection": "commands pipelined after STLS run inside TLS",
    "stls_injection_plaintext": "commands pipelined after STLS are answered in plaintext, then TLS starts",
    "stls_after_login": "STLS after login answers +OK",
    # SASL
    "sasl_ignores_ir": "AUTH PLAIN ignores the initial response",
    "sasl_no_continuation": "AUTH PLAIN without an initial response answers -ERR",
    "sasl_cancel_continues": "'*' does not cancel",
    "sasl_b64_lenient": "a response that is not base64 gets another challenge",
    "sasl_unknown_ok": "an unknown mechanism gets a challenge",
    "sasl_after_login": "AUTH after login answers +OK",
    "sasl_login_broken": "AUTH LOGIN answers -ERR",
    "auth_no_list": "AUTH without arguments answers -ERR",
    # UTF8
    "utf8_refused": "UTF8 is announced but answers -ERR",
    "utf8_after_login": "UTF8 after login answers +OK",
    "utf8_mangles": "after UTF8, 8-bit octets become '?'",
    # robustness
    "empty_line_closes": "an empty line closes the connection",
    "garbage_silent": "a line with a NUL gets no answer",
    "overlong_crash": "a line over 1000 octets stops the server",
    "lf_only_refused": "a command ended by a bare LF is refused",
}

# Correct behaviours other than the toy's own, for the checks that allow more than one.
VARIANTS = {
    "stls_pipelined_as_tls": "octets pipelined after STLS are taken as TLS data, so the handshake fails "
    "(Dovecot; emulated by closing the connection)",
}

BARE_LF = re.compile(rb"(?<!\r)\n")
LONE_CR = re.compile(rb"\r(?!\n)")


class Message:
    def __init__(self, serial: int, data: bytes):
        self.serial = serial
        self.data = data


class Store:
    """The maildrop: messages, the serial for unique-ids, and the lock."""

    def __init__(self):
        self.mutex = threading.Lock()
        self.messages: list[Message] = []
        self.serial = 0
        self.holder = None  # the session holding the lock

    def deliver(self, data: bytes) -> None:
        if data.startswith(b"From "):  # an MDA drops the mbox envelope line
            data = data.split(b"\n", 1)[1] if b"\n" in data else b""
        with self.mutex:
            self.serial += 1
            self.messages.append(Message(self.serial, data))


class ToyServer:
    """POP3 (with STLS when ``tls`` is given), POP3S, LMTP and SMTP listeners on free ports."""

    user, password = "toy", "toy-secret"

    def __init__(self, faults=(), tls: ssl.SSLContext | None = None):
        unknown = set(faults) - set(FAULTS) - set(VARIANTS)
        assert not unknown, unknown
        self.faults = set(faults)
        self.tls = tls
        self.store = Store()
        self.sessions = 0
        self.servers = [self._listen(Pop3Handler)]
        self.port = self.servers[0].server_address[1]
        self.tls_port = None
        if tls is not None:
            self.servers.append(self._listen(Pop3Handler, implicit_tls=True))
            self.tls_port = self.servers[-1].server_address[1]
        self.servers.append(self._listen(SmtpHandler, lmtp=True))
        self.lmtp_port = self.servers[-1].server_address[1]
        self.servers.append(self._listen(SmtpHandler, lmtp=False))
        self.smtp_port = self.servers[-1].server_address[1]
        self.threads = [
            threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            for s in self.servers
        ]
        for thread in self.threads:
            thread.start()

    def _listen(self, handler, **attributes):
        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        server.toy = self
        for name, value in attributes.items():
            setattr(server, name, value)
        return server

    def has(self, fault: str) -> bool:
        return fault in self.faults

    def crash(self) -> None:
        """Stop serving POP3 and close the port (the 'overlong_crash' fault), from a thread of its own."""

        def stop_pop3():
            self.servers[0].shutdown()
            self.servers[0].server_close()

        threading.Thread(target=stop_pop3, daemon=True).start()

    def stop(self) -> None:
        stoppers = [threading.Thread(target=server.shutdown) for server in self.servers]
        for stopper in stoppers:  # in parallel: each waits up to a poll interval
            stopper.start()
        for stopper in stoppers:
            stopper.join()
        for server in self.servers:
            server.server_close()


class Closed(Exception):
    pass


class Pop3Handler(socketserver.BaseRequestHandler):
    def handle(self):
        toy = self.server.toy
        sock = self.request
        sock.settimeout(30)
        if getattr(self.server, "implicit_tls", False) and not toy.has("implicit_plain"):
            try:
                sock = toy.tls.wrap_socket(sock, server_side=True)
            except (ssl.SSLError, OSError):
                return
        session = Session(toy, sock, tls=getattr(self.server, "implicit_tls", False))
        try:
            session.run()
        except (Closed, OSError, ssl.SSLError):
            pass
        finally:
            session.end()


class Session:
    def __init__(self, toy: ToyServer, sock, tls: bool):
        self.toy, self.sock, self.tls = toy, sock, tls
        self.buffer = b""
        self.state = "auth"
        self.user: bytes | None = None
        self.utf8 = False
        self.view: list[Message] = []
        self.deleted: set[int] = set()
        self.broken = False  # lock_breaks_holder
        self.quit_done = False
        self._presented: dict[tuple[int, bool], bytes] = {}
        toy.sessions += 1
        self.session_no = toy.sessions

    # I/O
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self, text: str) -> None:
        self.send(text.encode("utf-8") + b"\r\n")

    def read_line(self) -> bytes:
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line, self.buffer = self.buffer[: end + 1], self.buffer[end + 1 :]
                return line
            if len(self.buffer) > 8192:
                self.reply("-ERR Line too long")
                raise Closed
            if self.toy.has("autologout_fast") and self.state == "trans":
                self.sock.settimeout(0.3)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise Closed from None
            if not data:
                raise Closed
            self.buffer += data

    def run(self) -> None:
        if self.toy.has("greeting_err"):
            self.reply("-ERR go away")
            return
        self.reply("+OK toy ready" + (" " + "x" * 590 if self.toy.has("long_greeting") else ""))
        while True:
            raw = self.read_line()
            if self.toy.has("no_pipelining"):
                self.buffer = b""
            if self.broken:
                raise Closed
            if raw.endswith(b"\r\n"):
                line = raw[:-2]
            elif self.toy.has("lf_only_refused"):
                self.reply("-ERR Lines end with CRLF")
                continue
            else:
                line = raw[:-1]
            if len(raw) > 1000 and self.toy.has("overlong_crash"):
                self.toy.crash()
                raise Closed
            if len(raw) > 100 and self.toy.has("short_lines"):
                self.reply("-ERR Line too long")
                continue
            if b"\0" in line and self.toy.has("garbage_silent"):
                continue
            if not line and self.toy.has("empty_line_closes"):
                raise Closed
            verb, _, arg = line.partition(b" ")
            name = verb.decode("ascii", "replace")
            if self.toy.has("case_sensitive") and name != name.upper():
                self.reply("-ERR Unknown command")
                continue
            handler = getattr(self, "do_" + name.upper(), None) if name.isalnum() else None
            if handler is None:
                if self.toy.has("unknown_closes"):
                    raise Closed
                self.reply("-ERR [UNKNOWN" if self.toy.has("bad_resp_code") else "-ERR Unknown command")
                continue
            if handler(arg) == "close":
                return

    def end(self) -> None:
        keep = self.toy.has("lock_kept_on_drop") or (self.quit_done and self.toy.has("lock_kept_after_quit"))
        if self.toy.store.holder is self and not keep:
            self.toy.store.holder = None
        try:
            self.sock.close()
        except OSError:
            pass

    # Helpers
    def need(self, state: str) -> bool:
        if self.state != state:
            self.reply("-ERR Not in this state")
            return False
        return True

    def presented(self, message: Message) -> bytes:
        key = (message.serial, self.utf8)
        if key not in self._presented:
            self._presented[key] = self._present(message)
        return self._presented[key]

    def _present(self, message: Message) -> bytes:
        data = message.data
        if self.toy.has("nul_truncate") and b"\0" in data:
            data = data[: data.index(b"\0")]
        if not self.toy.has("raw_lf"):
            data = BARE_LF.sub(b"\r\n", data)
        if self.toy.has("lone_cr_to_crlf"):
            data = LONE_CR.sub(b"\r\n", data)
        if self.toy.has("strip_8bit") or (self.utf8 and self.toy.has("utf8_mangles")):
            data = data.translate(bytes(range(128)) + b"?" * 128)
        if self.toy.has("wrap_long_lines"):
            data = re.sub(rb"([^\r\n]{998})(?=[^\r\n])", rb"\1\r\n", data)
        if self.toy.has("add_blank_line") and b"\r\n\r\n" not in data:
            data = data + b"\r\n"
        return data

    def size(self, message: Message) -> int:
        return len(message.data) if self.toy.has("wrong_sizes") else len(self.presented(message))

    def visible(self) -> list[tuple[int, Message]]:
        if self.toy.has("live_view"):
            self.view = list(self.toy.store.messages)
        return [(n, m) for n, m in enumerate(self.view, start=1) if n not in self.deleted]

    def number(self, arg: bytes) -> int | None:
        if not arg.isdigit():
            self.reply("-ERR Bad number")
            return None
        n = int(arg)
        self.visible()
        if self.toy.has("lax_numbers") and (n == 0 or n > len(self.view)):
            n = 1
        if n < 1 or n > len(self.view) or (n in self.deleted and not self.toy.has("deleted_accessible")):
            self.reply("-ERR No such message")
            return None
        return n

    def uid(self, n: int, message: Message) -> str:
        if self.toy.has("uidl_dup"):
            return "same"
        if self.toy.has("uidl_long"):
            return f"toy{message.serial}".ljust(80, "x")
        if self.toy.has("uidl_unstable"):
            return f"toy{message.serial}s{self.session_no}"
        if self.toy.has("uidl_reuse"):
            return f"pos{self.toy.store.messages.index(message) + 1 if message in self.toy.store.messages else n}"
        return f"toy{message.serial}"

    def multiline(self, status: str, body: bytes, stuff: bool = True) -> None:
        if stuff and self.toy.has("chunked_stuffing"):
            pieces = [body[i : i + 4096] for i in range(0, len(body), 4096)]
            body = b"".join(
                (b"." + piece if i == 0 and piece.startswith(b".") else piece).replace(b"\r\n.", b"\r\n..")
                for i, piece in enumerate(pieces)
            )
        elif stuff:
            body = (b"." + body if body.startswith(b".") else body).replace(b"\r\n.", b"\r\n..")
        if not body.endswith(b"\r\n") and body and not self.toy.has("no_final_crlf"):
            body += b"\r\n"
        self.send(status.encode() + b"\r\n" + body + b".\r\n")

    def capabilities(self) -> list[str]:
        caps = ["CAPA", "TOP", "UIDL", "RESP-CODES", "PIPELINING", "AUTH-RESP-CODE"]
        if self.state == "auth":
            if self.toy.tls is not None and (not self.tls or self.toy.has("stls_still_announced")):
                caps.append("STLS")
            caps += ["USER", "SASL PLAIN LOGIN", "UTF8"]
        if self.toy.has("capa_bad"):
            caps += ["PIPELINE", "LOGIN-DELAY soon"]
        return caps + ["IMPLEMENTATION toy"]

    def login(self, user: bytes, password: bytes) -> str | None:
        right = user == self.toy.user.encode() and (
            password == self.toy.password.encode() or self.toy.has("any_password")
        )
        if not right:
            self.reply(
                "-ERR Authentication failed"
                if self.toy.has("no_auth_code")
                else "-ERR [AUTH] Authentication failed"
            )
            return None
        store = self.toy.store
        with store.mutex:
            holder = store.holder
            if holder is not None and not self.toy.has("no_lock"):
                if self.toy.has("lock_breaks_holder"):
                    holder.broken = True
                self.reply(
                    "-ERR Mailbox locked" if self.toy.has("lock_no_code") else "-ERR [IN-USE] Mailbox locked"
                )
                return None
            store.holder = self
            self.view = list(store.messages)
        self.state = "trans"
        self.reply(f"+OK {len(self.view)} messages")
        return None

    # AUTHORIZATION
    def do_CAPA(self, arg):
        if self.toy.has("no_capa") or (self.state == "trans" and self.toy.has("capa_auth_only")):
            self.reply("-ERR Unknown command")
            return
        self.send(b"+OK\r\n" + "".join(c + "\r\n" for c in self.capabilities()).encode() + b".\r\n")

    def do_STLS(self, arg):
        if self.state != "auth" and not self.toy.has("stls_after_login"):
            self.reply("-ERR Not after login")
            return None
        if (
            self.toy.tls is None
            or self.toy.has("stls_refused")
            or (self.tls and not self.toy.has("stls_twice"))
        ):
            self.reply("-ERR TLS not available")
            return None
        self.reply("+OK Begin TLS")
        if self.buffer and self.toy.has("stls_pipelined_as_tls"):
            return "close"
        if self.toy.has("stls_injection_plaintext"):
            for _ in range(self.buffer.count(b"\n")):
                self.reply("-ERR Unknown command")
        pending = self.buffer if self.toy.has("stls_injection") else b""
        self.buffer = b""
        try:
            self.sock = self.toy.tls.wrap_socket(self.sock, server_side=True)
        except (ssl.SSLError, OSError):
            return "close"
        self.tls = True
        self.buffer = pending
        return None

    def do_USER(self, arg):
        if self.need("auth"):
            self.user = arg
            self.reply("+OK")

    def do_PASS(self, arg):
        if self.need("auth"):
            user, self.user = self.user, None
            if user is None:
                self.reply("-ERR USER first")
            else:
                self.login(user, arg)

    def do_AUTH(self, arg):
        if self.state != "auth":
            self.reply("+OK Already in" if self.toy.has("sasl_after_login") else "-ERR Not after login")
            return
        mechanism, _, initial = arg.partition(b" ")
        mechanism = mechanism.upper()
        if not mechanism:
            if self.toy.has("auth_no_list"):
                self.reply("-ERR Give a mechanism")
            else:
                self.send(b"+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n")
        elif mechanism == b"PLAIN":
            if initial and not self.toy.has("sasl_ignores_ir"):
                return self.sasl_plain(initial)
            if self.toy.has("sasl_no_continuation"):
                self.reply("-ERR Give an initial response")
                return None
            self.reply("+ ")
            return self.sasl_plain(self.sasl_response())
        elif mechanism == b"LOGIN" and not self.toy.has("sasl_login_broken"):
            self.reply("+ " + base64.b64encode(b"Username:").decode())
            user = self.decode(self.sasl_response())
            if user is None:
                return None
            self.reply("+ " + base64.b64encode(b"Password:").decode())
            password = self.decode(self.sasl_response())
            if password is not None:
                self.login(user, password)
        elif self.toy.has("sasl_unknown_ok"):
            self.reply("+ ")
            self.sasl_response()
            self.reply("-ERR Failed")
        else:
            self.reply("-ERR Unsupported mechanism")
        return None

    def sasl_response(self) -> bytes:
        while True:
            line = self.read_line().rstrip(b"\r\n")
            if line == b"*" and self.toy.has("sasl_cancel_continues"):
                self.reply("+ ")
                continue
            return line

    def decode(self, response: bytes) -> bytes | None:
        if response == b"*":
            self.reply("-ERR Cancelled")
            return None
        try:
            return base64.b64decode(response, validate=True)
        except (binascii.Error, ValueError):
            if self.toy.has("sasl_b64_lenient"):
                self.reply("+ ")
                self.sasl_response()
            self.reply("-ERR [AUTH] Bad base64")
            return None

    def sasl_plain(self, response: bytes):
        message = self.decode(response)
        if message is None:
            return
        parts = message.split(b"\0")
        if len(parts) != 3:
            self.reply("-ERR [AUTH] Bad PLAIN message")
            return
        self.login(parts[1], parts[2])
        return

    def do_UTF8(self, arg):
        if self.state != "auth" and not self.toy.has("utf8_after_login"):
            self.reply("-ERR Only before login")
        elif self.toy.has("utf8_refused"):
            self.reply("-ERR No")
        else:
            self.utf8 = True
            self.reply("+OK UTF8 enabled")

    def do_QUIT(self, arg):
        if self.state == "auth":
            if not self.toy.has("quit_auth_silent"):
                self.reply("+OK Bye")
            return "close"
        store = self.toy.store
        self.quit_done = True
        marked = [self.view[n - 1] for n in self.deleted]
        with store.mutex:
            if not self.toy.has("quit_keeps"):
                store.messages = [m for m in store.messages if m not in marked]
            if self.toy.has("lock_kept_after_quit"):
                threading.Timer(0.2, self._release).start()
            else:
                store.holder = None
        self.reply("+OK Bye")
        return "close"

    def _release(self) -> None:
        if self.toy.store.holder is self:
            self.toy.store.holder = None

    # TRANSACTION
    def do_STAT(self, arg):
        if self.state == "auth" and self.toy.has("stat_before_login"):
            self.reply("+OK 0 0")
            return
        if self.need("trans"):
            visible = self.visible()
            octets = sum(self.size(m) for _, m in visible) + (1 if self.toy.has("stat_wrong_octets") else 0)
            self.reply(f"+OK {len(visible)} {octets}")

    def do_LIST(self, arg):
        if not self.need("trans"):
            return
        if arg:
            n = self.number(arg)
            if n is not None:
                self.reply(f"+OK {n} {self.size(self.view[n - 1])}")
            return
        shift = 1 if self.toy.has("list_zero_based") else 0
        lines = "".join(f"{n - shift} {self.size(m)}\r\n" for n, m in self.visible())
        self.send(b"+OK\r\n" + lines.encode() + b".\r\n")

    def do_RETR(self, arg):
        if self.need("trans"):
            n = self.number(arg)
            if n is not None:
                message = self.view[n - 1]
                self.multiline(
                    f"+OK {self.size(message)} octets",
                    self.presented(message),
                    stuff=not self.toy.has("no_stuffing"),
                )

    def do_TOP(self, arg):
        if not self.need("trans"):
            return
        if self.toy.has("capa_lies"):
            self.reply("-ERR TOP is not implemented")
            return
        number, _, lines = arg.partition(b" ")
        n = self.number(number)
        if n is None:
            return
        if not lines.isdigit():
            self.reply("-ERR Bad line count")
            return
        data = self.presented(self.view[n - 1])
        end = data.find(b"\r\n\r\n")
        head, body = (data, b"") if end < 0 else (data[: end + 4], data[end + 4 :])
        if self.toy.has("top_no_blank") and end >= 0:
            head = head[:-2]
        parts = body.split(b"\r\n")
        body_lines = [part + b"\r\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
        out = data if self.toy.has("top_ignores_lines") else head + b"".join(body_lines[: int(lines)])
        stuff = not (self.toy.has("no_stuffing") or self.toy.has("top_no_stuffing"))
        self.multiline("+OK", out, stuff=stuff)

    def do_DELE(self, arg):
        if self.need("trans"):
            n = self.number(arg)
            if n is None:
                return
            message = self.view[n - 1]
            if self.toy.has("renumber"):
                del self.view[n - 1]
            else:
                self.deleted.add(n)
            if self.toy.has("immediate_dele"):
                with self.toy.store.mutex:
                    self.toy.store.messages = [m for m in self.toy.store.messages if m is not message]
            self.reply("+OK Marked")

    def do_RSET(self, arg):
        if self.need("trans"):
            if not self.toy.has("no_rset"):
                self.deleted.clear()
            self.reply("+OK")

    def do_NOOP(self, arg):
        if self.need("trans"):
            self.send(
                b"+ok\r\n"
                if self.toy.has("lowercase_ok")
                else b"-ERR No\r\n"
                if self.toy.has("noop_err")
                else b"+OK\r\n"
            )

    def do_UIDL(self, arg):
        if not self.need("trans"):
            return
        if arg:
            n = self.number(arg)
            if n is not None:
                uid = self.uid(n, self.view[n - 1])
                self.reply(f"+OK {n} {uid}x" if self.toy.has("uidl_single_mismatch") else f"+OK {n} {uid}")
            return
        if self.toy.has("uidl_shows_deleted"):
            listing = list(enumerate(self.view, start=1))
        else:
            listing = self.visible()
        lines = "".join(f"{n} {self.uid(n, m)}\r\n" for n, m in listing)
        self.send(b"+OK\r\n" + lines.encode() + b".\r\n")


class SmtpHandler(socketserver.StreamRequestHandler):
    """Just enough LMTP (RFC 2033) and SMTP (RFC 5321) to take a message for the toy's mailbox."""

    def handle(self):
        toy = self.server.toy
        lmtp = self.server.lmtp
        self.wfile.write(b"220 toy " + (b"LMTP" if lmtp else b"ESMTP") + b" ready\r\n")
        recipients = 0
        while True:
            line = self.rfile.readline(4096)
            if not line:
                return
            verb = line[:4].upper()
            if verb in (b"LHLO", b"EHLO"):
                self.wfile.write(b"250-toy\r\n250-8BITMIME\r\n250 PIPELINING\r\n")
            elif verb == b"HELO":
                self.wfile.write(b"250 toy\r\n")
            elif verb in (b"MAIL", b"RSET", b"NOOP"):
                recipients = 0 if verb != b"NOOP" else recipients
                self.wfile.write(b"250 OK\r\n")
            elif verb == b"RCPT":
                ok = toy.user.encode() in line
                recipients += ok
                self.wfile.write(b"250 OK\r\n" if ok else b"550 No such user\r\n")
            elif verb == b"DATA":
                self.wfile.write(b"354 Go ahead\r\n")
                lines = []
                while True:
                    chunk = self.rfile.readline()
                    if chunk in (b".\r\n", b""):
                        break
                    lines.append(chunk[1:] if chunk.startswith(b".") else chunk)
                toy.store.deliver(b"".join(lines))
                self.wfile.write(b"250 Delivered\r\n" * (recipients if lmtp else 1))
            elif verb == b"QUIT":
                self.wfile.write(b"221 Bye\r\n")
                return
            else:
                self.wfile.write(b"500 What?\r\n")
            self.wfile.flush()
