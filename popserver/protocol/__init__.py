"""The POP3 protocol with no sockets and no ORM: wire format, the session state machine, the verb registry."""
