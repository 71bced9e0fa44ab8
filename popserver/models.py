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

    # Quotas (see popserver.mailin.quota): empty = the site's default (POPSERVER_QUOTA_BYTES, POPSERVER_QUOTA_MESSAGES),
    # 0 = unlimited for this mailbox whatever the default, N = at most N.
    quota_bytes = models.PositiveBigIntegerField(
        "size quota",
        null=True,
        blank=True,
        help_text="Octets all messages may take together. Empty: the site default; 0: unlimited.",
    )
    quota_messages = models.PositiveIntegerField(
        "message quota",
        null=True,
        blank=True,
        help_text="Messages the mailbox may hold. Empty: the site default; 0: unlimited.",
    )

    # What becomes of deleted and of retrieved mail (popserver.storage.retention): empty = the site's default.
    keep_deleted_days = models.PositiveIntegerField(
        "keep deleted messages (days)",
        null=True,
        blank=True,
        help_text="Messages deleted through POP3 disappear at once but are kept, restorable, for this many days. "
        "Empty: the site default; 0: deleted at once.",
    )
    expire_policy = models.CharField(
        "expire retrieved messages",
        max_length=8,
        blank=True,
        default="",
        choices=[("", "site default"), ("never", "never"), ("days", "after the days below")],
        help_text="Delete messages some days after their first retrieval (RETR), as announced by CAPA's EXPIRE.",
    )
    expire_days = models.PositiveIntegerField(
        "expire after (days)",
        null=True,
        blank=True,
        help_text="With 'after the days below': days after the first retrieval; 0 deletes retrieved messages "
        "when the session ends with QUIT.",
    )

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

    def clean(self):
        from django.core.exceptions import ValidationError

        if self.expire_policy == "days" and self.expire_days is None:
            raise ValidationError(
                {"expire_days": "Give the number of days (0 deletes retrieved messages at QUIT)."}
            )


class Address(models.Model):
    """An address that delivers into a mailbox; unique, compared case-insensitively."""

    mailbox = models.ForeignKey(Mailbox, on_delete=models.CASCADE, related_name="addresses")
    address = models.CharField(max_length=254)

    class Meta:
        verbose_name_plural = "addresses"
        constraints = [models.UniqueConstraint(Lower("address"), name="popserver_address_unique_ci")]

    def __str__(self) -> str:
        return self.address


class MessageQuerySet(models.QuerySet):
    def visible(self):
        """Messages POP3 shows: not deleted into the keep-deleted retention (``deleted_at`` empty)."""
        return self.filter(deleted_at__isnull=True)

    def recently_deleted(self):
        return self.filter(deleted_at__isnull=False)


class StoredBody(models.Model):
    """A message body held by a Django storage (``DjangoStorageBodyStore``), once per content.

    The object's name is derived from the SHA-256 of its bytes, so identical bodies (one message to many local
    recipients, a re-import) share one object. ``refs`` counts the messages that reference it; it changes in
    the same transaction as those message rows. At 0 the object is removed after the commit (or by
    ``popgc``); an object whose row says 0 may already be gone.
    """

    sha256 = models.CharField(max_length=64, unique=True, editable=False)  # lower-case hex
    size = models.PositiveBigIntegerField(editable=False)
    refs = models.PositiveIntegerField(default=0, editable=False)
    created_at = models.DateTimeField(auto_now_add=True, editable=False)

    class Meta:
        verbose_name = "stored body"
        indexes = [models.Index(fields=["refs"], name="popserver_storedbody_refs_idx")]

    def __str__(self) -> str:
        return self.sha256


class Message(models.Model):
    """A message in the form the server presents it (bare LF as CRLF; every other byte unchanged).

    Numbered in arrival order (the primary key). Its bytes live behind the body store
    (``popserver.storage.bodies``), never on this row, so listing a mailbox reads no bodies.
    """

    mailbox = models.ForeignKey(Mailbox, on_delete=models.CASCADE, related_name="messages")
    uid = models.CharField("unique id", max_length=70)  # RFC 1939 s.7: 1-70 chars in 0x21-0x7E
    size = models.PositiveBigIntegerField(help_text="Octets as sent by RETR, before dot-stuffing.")
    # How many MessageChunk rows hold the body, kept here so that the snapshot knows it and a read is one
    # plain indexed query per chunk. 0: not known (rows written without a body store) and counted at read.
    chunk_count = models.PositiveIntegerField(default=0, editable=False)
    # Set when the body is in a Django storage instead (then chunk_count is 0 and there are no chunks).
    stored_body = models.ForeignKey(
        StoredBody, null=True, blank=True, editable=False, on_delete=models.PROTECT, related_name="messages"
    )
    arrived_at = models.DateTimeField(auto_now_add=True, db_index=True)
    subject = models.TextField(blank=True, default="")
    sender = models.TextField(blank=True, default="")
    date = models.DateTimeField(null=True, blank=True)
    # False for a message whose header has no blank line after it (Dovecot's oe-ns-eoh workaround adds one).
    has_header_end = models.BooleanField(default=True, editable=False)
    first_retrieved_at = models.DateTimeField(null=True, blank=True, editable=False)
    # Set by a QUIT under a keep-deleted policy: hidden from POP3, restorable until purged.
    deleted_at = models.DateTimeField(null=True, blank=True, editable=False)
    # A message the server wrote itself (a quota warning): it never counts against the quota.
    server_notice = models.BooleanField(default=False, editable=False)

    objects = MessageQuerySet.as_manager()

    class Meta:
        ordering = ["id"]
        # view_message shows a message's fields; reading its bytes (text view, download) needs this one too.
        permissions = [("view_message_content", "Can read the contents of messages")]
        constraints = [
            models.UniqueConstraint(fields=["mailbox", "uid"], name="popserver_message_uid_unique")
        ]
        indexes = [
            models.Index(fields=["mailbox", "id"], name="popserver_message_mbox_idx"),
            # A mailbox's total size, all of it (the admin's list) or what counts against the quota (delivery's
            # check), from the index alone.
            models.Index(fields=["mailbox", "server_notice", "size"], name="popserver_message_quota_idx"),
            models.Index(fields=["first_retrieved_at"], name="popserver_message_retr_idx"),
            models.Index(fields=["deleted_at"], name="popserver_message_deleted_idx"),
        ]

    def __str__(self) -> str:
        # Never the database id: a POP3 client knows a message by its unique id (UIDL) and its position.
        return self.subject or f"message {self.uid}"


class MessageChunk(models.Model):
    """Up to POPSERVER_BODY_CHUNK_SIZE octets of a message, read back one row per short query."""

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="chunks")
    seq = models.PositiveIntegerField()
    data = models.BinaryField()

    class Meta:
        ordering = ["message", "seq"]
        constraints = [models.UniqueConstraint(fields=["message", "seq"], name="popserver_chunk_seq_unique")]


class LoginThrottle(models.Model):
    """Failed-login counter for one scope and key, shared by every server process (the database throttle)."""

    ACCOUNT_IP = "account"  # key: "<login name>|<ip>"
    IP = "ip"  # key: "<ip>"
    SCOPES = [(ACCOUNT_IP, "account and IP"), (IP, "IP")]

    scope = models.CharField(max_length=8, choices=SCOPES)
    key = models.CharField(max_length=255)
    failures = models.PositiveIntegerField(default=0)
    window_started = models.DateTimeField()
    locked_until = models.DateTimeField(null=True, blank=True, db_index=True)

    class Meta:
        verbose_name = "login lock-out"
        constraints = [models.UniqueConstraint(fields=["scope", "key"], name="popserver_throttle_unique")]

    def __str__(self) -> str:
        return f"{self.get_scope_display()} {self.key}"


class AppPassword(models.Model):
    """A named, random, revocable password for POP3 only, stored as a keyed SHA-256 (it is high-entropy)."""

    mailbox = models.ForeignKey(Mailbox, on_delete=models.CASCADE, related_name="app_passwords")
    name = models.CharField(max_length=100)
    digest = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_used_peer = models.CharField(max_length=64, blank=True, default="", editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["mailbox", "name"]

    def __str__(self) -> str:
        return self.name

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None


class LoginEvent(models.Model):
    """One POP3 login attempt (audit). Never holds a password."""

    SUCCESS, FAILED, LOCKED_OUT, IN_USE, LOGIN_DELAY, ERROR = (
        "success",
        "failed",
        "locked_out",
        "in_use",
        "login_delay",
        "error",
    )
    OUTCOMES = [
        (SUCCESS, "success"),
        (FAILED, "failed"),
        (LOCKED_OUT, "locked out"),
        (IN_USE, "in use"),
        (LOGIN_DELAY, "login delay"),
        (ERROR, "error"),
    ]

    time = models.DateTimeField(auto_now_add=True)  # indexed with the outcome, below
    peer_ip = models.GenericIPAddressField(unpack_ipv4=True, null=True)
    username = models.CharField(max_length=255)
    mailbox = models.ForeignKey(Mailbox, on_delete=models.SET_NULL, null=True, blank=True)
    mechanism = models.CharField(max_length=16)
    tls = models.BooleanField(default=False, help_text="The client used TLS, here or at a proxy.")
    tls_at_proxy = models.BooleanField(
        "TLS at proxy",
        default=False,
        help_text="TLS was terminated by a load balancer (PROXY protocol v2 SSL TLV).",
    )
    node = models.CharField(
        max_length=64, blank=True, default="", help_text="The server node (POPSERVER_NODE_NAME)."
    )
    outcome = models.CharField(max_length=16, choices=OUTCOMES, db_index=True)
    reason = models.CharField(max_length=64, blank=True, default="")

    class Meta:
        ordering = ["-time"]
        # The admin's list (newest first) and the overview's counts per hour and outcome, from the index alone.
        indexes = [models.Index(fields=["time", "outcome"], name="popserver_loginevent_time_idx")]

    def __str__(self) -> str:
        return f"{self.time:%Y-%m-%d %H:%M:%S} {self.username} {self.outcome}"


class SessionRecord(models.Model):
    """One logged-in POP3 session (audit)."""

    mailbox = models.ForeignKey(Mailbox, on_delete=models.SET_NULL, null=True, blank=True)
    username = models.CharField(max_length=255)
    peer_ip = models.GenericIPAddressField(unpack_ipv4=True, null=True)
    started_at = models.DateTimeField(db_index=True)
    duration = models.FloatField(help_text="seconds")
    end_reason = models.CharField(max_length=64)
    node = models.CharField(
        max_length=64, blank=True, default="", help_text="The server node (POPSERVER_NODE_NAME)."
    )
    retrieved_count = models.PositiveIntegerField(default=0)
    retrieved_bytes = models.PositiveBigIntegerField(default=0)
    deleted_count = models.PositiveIntegerField(default=0)
    deleted_bytes = models.PositiveBigIntegerField(default=0)

    class Meta:
        ordering = ["-started_at"]

    def __str__(self) -> str:
        return f"{self.started_at:%Y-%m-%d %H:%M:%S} {self.username}"


class Node(models.Model):
    """A running ``runpop3`` node. It claims its name at start and keeps a heartbeat, so a second node that
    starts with the name of a live one is stopped: lock holders are named by node, and a node frees the locks
    of its own dead processes at once."""

    name = models.CharField(max_length=64, unique=True)
    host = models.CharField(max_length=255, help_text="The machine's host name.")
    pid = models.PositiveIntegerField()
    instance = models.CharField(max_length=32)
    started_at = models.DateTimeField()
    heartbeat = models.DateTimeField()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class DeliveryCount(models.Model):
    """Messages delivered in one hour (UTC), for the admin's overview: messages are deleted at QUIT, so
    counting the stored ones would miss most deliveries. Written after each delivery commits."""

    hour = models.DateTimeField(unique=True)
    messages = models.PositiveIntegerField(default=0)
    octets = models.PositiveBigIntegerField(default=0)

    class Meta:
        ordering = ["-hour"]

    def __str__(self) -> str:
        return f"{self.hour:%Y-%m-%d %H:00} {self.messages}"


class Overview(Mailbox):
    """No data of its own: the admin's "POP3 overview" page is listed on the admin index through it."""

    class Meta:
        proxy = True
        verbose_name = verbose_name_plural = "POP3 overview"
        default_permissions = ()  # the page needs the view permissions of what it shows instead
