"""Mailboxes and messages. Models know nothing of sockets or of the POP3 protocol."""
import secrets

from django.conf import settings
from django.db import models
from django.db.models.functions import Lower


def new_uid_validity() -> int:
    return secrets.randbelow(0xFFFFFFFF) + 1


class Mailbox(models.Model):
    """One per user. Holds the exclusive POP3 lock (RFC 1939 s.4) as row state, so that no database
    transaction stays open for the length of a session."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="mailbox")
    pop3_enabled = models.BooleanField("POP3 access", default=True)
    last_login = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    # Unique ids are Dovecot's `%08Xu%08Xv`: a per-mailbox counter that only grows, then uid_validity.
    uid_validity = models.PositiveBigIntegerField(default=new_uid_validity, editable=False)
    next_uid = models.PositiveBigIntegerField(default=1, editable=False)

    # The exclusive lock: empty token = free. Heartbeats let other hosts expire a crashed server's lock.
    lock_token = models.CharField(max_length=32, blank=True, default="", editable=False)
    lock_host = models.CharField(max_length=255, blank=True, default="", editable=False)
    lock_pid = models.PositiveIntegerField(null=True, blank=True, editable=False)
    lock_instance = models.CharField(max_length=32, blank=True, default="", editable=False)
    lock_peer = models.CharField(max_length=64, blank=True, default="", editable=False)
    locked_at = models.DateTimeField(null=True, blank=True, editable=False)
    lock_heartbeat = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        verbose_name_plural = "mailboxes"
        indexes = [models.Index(fields=["lock_instance"], name="popserver_mailbox_lock_idx")]

    def __str__(self) -> str:
        return str(self.user)

    @property
    def is_locked(self) -> bool:
        return bool(self.lock_token)


class Address(models.Model):
    """An address that delivers into a mailbox; unique, compared case-insensitively."""

    mailbox = models.ForeignKey(Mailbox, on_delete=models.CASCADE, related_name="addresses")
    address = models.CharField(max_length=254)

    class Meta:
        verbose_name_plural = "addresses"
        constraints = [models.UniqueConstraint(Lower("address"), name="popserver_address_unique_ci")]

    def __str__(self) -> str:
        return self.address


class Message(models.Model):
    """A message in the form the server presents it (bare LF as CRLF; every other byte unchanged).

    Numbered in arrival order (the primary key). Its bytes live behind the body store
    (``popserver.bodystore``), never on this row, so listing a mailbox reads no bodies.
    """

    mailbox = models.ForeignKey(Mailbox, on_delete=models.CASCADE, related_name="messages")
    uid = models.CharField("unique id", max_length=70)  # RFC 1939 s.7: 1-70 chars in 0x21-0x7E
    size = models.PositiveBigIntegerField(help_text="Octets as sent by RETR, before dot-stuffing.")
    arrived_at = models.DateTimeField(auto_now_add=True, db_index=True)
    subject = models.TextField(blank=True, default="")
    sender = models.TextField(blank=True, default="")
    date = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        constraints = [models.UniqueConstraint(fields=["mailbox", "uid"], name="popserver_message_uid_unique")]
        indexes = [models.Index(fields=["mailbox", "id"], name="popserver_message_mbox_idx")]

    def __str__(self) -> str:
        return self.subject or f"message {self.pk}"


class MessageChunk(models.Model):
    """Up to POPSERVER_BODY_CHUNK_SIZE octets of a message, read back one row per short query."""

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="chunks")
    seq = models.PositiveIntegerField()
    data = models.BinaryField()

    class Meta:
        ordering = ["message", "seq"]
        constraints = [models.UniqueConstraint(fields=["message", "seq"], name="popserver_chunk_seq_unique")]
