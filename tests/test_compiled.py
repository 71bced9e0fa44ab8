"""Statements compiled once (``storage/compiled.py``): the rows the ORM would give or write, on every database."""

from datetime import timedelta

import pytest
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.db.models.signals import pre_save
from django.utils import timezone

from popserver.logins.audit import _LOGIN_EVENT
from popserver.logins.throttle import _give_back, _locked_scopes
from popserver.models import LoginEvent, LoginThrottle, Mailbox
from popserver.storage.compiled import CompiledInsert, CompiledQuery, Update
from popserver.storage.lock import _TAKE_FREE


@pytest.fixture
def mailbox(make_mailbox):
    return make_mailbox("alice")


def test_a_time_in_a_condition_compares_as_the_orm_compares_it(db):
    now = timezone.now()
    for scope, key, until in (
        ("account", "a|1", now + timedelta(seconds=1)),
        ("ip", "1", now - timedelta(seconds=1)),
    ):
        LoginThrottle.objects.create(scope=scope, key=key, locked_until=until, window_started=now)
    locked = _locked_scopes(2).rows(now, "account", "a|1", "ip", "1")
    assert locked == [("account",)]
    assert _locked_scopes(1).rows(now - timedelta(seconds=2), "ip", "1") == [("ip",)]
    assert _locked_scopes(1).rows(now, "ip", "2") == []


def test_an_update_writes_times_and_numbers_as_the_orm_would(mailbox):
    now = timezone.now().replace(microsecond=123456)
    holder = ("token", "node-1", 4321, "instance", "192.0.2.1:110", now, now + timedelta(seconds=5))
    assert _TAKE_FREE[True].execute(*holder, now - timedelta(days=1), mailbox.pk) == 1
    mailbox.refresh_from_db()
    assert (mailbox.lock_token, mailbox.lock_host, mailbox.lock_pid, mailbox.lock_instance) == holder[:4]
    assert (mailbox.lock_peer, mailbox.locked_at, mailbox.lock_heartbeat) == holder[4:]
    assert mailbox.last_login == now - timedelta(days=1)
    # Its condition holds: the lock is taken now, so the same UPDATE changes nothing.
    assert _TAKE_FREE[False].execute(*holder, mailbox.pk) == 0


def test_a_delete_removes_the_matching_row_alone(db):
    LoginThrottle.objects.create(scope="account", key="a|1", window_started=timezone.now())
    LoginThrottle.objects.create(scope="ip", key="a|1", window_started=timezone.now())
    LoginThrottle.objects.create(scope="account", key="b|1", window_started=timezone.now())
    assert _give_back().execute("a|1") == 1
    assert set(LoginThrottle.objects.values_list("scope", "key")) == {("ip", "a|1"), ("account", "b|1")}


def test_a_query_needs_every_value_among_its_parameters(db):
    ignoring = CompiledQuery(lambda pk, name: Mailbox.objects.filter(pk=pk), model=Mailbox, kinds=(int, str))
    with pytest.raises(ValueError, match="not among its parameters"):
        ignoring.rows(1, "x")


# The audit's own statement's fields, but the mailbox.
EVENT_FIELDS = tuple(field.attname for field in _LOGIN_EVENT.fields if field.attname != "mailbox_id")


def event_values(**changes):
    values = {
        "time": timezone.now().replace(microsecond=654321),
        "username": "ålice",
        "peer_ip": "2001:db8::1",
        "mechanism": "PLAIN",
        "tls": True,
        "tls_at_proxy": False,
        "node": "n1",
        "outcome": LoginEvent.SUCCESS,
        "reason": "",
        "mailbox_id": None,
    }
    return {**values, **changes}


@pytest.mark.django_db(transaction=True)
def test_an_insert_writes_the_row_as_save_would(mailbox):
    insert = CompiledInsert(LoginEvent, (*EVENT_FIELDS, "mailbox_id"))
    values = event_values(mailbox_id=mailbox.pk)
    insert.insert(**values)  # autocommitted: no transaction around it
    with transaction.atomic():
        insert.insert(**event_values(username="bob", peer_ip=None))  # behind a savepoint of its own
    first, second = LoginEvent.objects.order_by("id")
    assert {name: getattr(first, name) for name in values} == values
    assert (second.username, second.peer_ip, second.mailbox_id) == ("bob", None, None)


@pytest.mark.django_db(transaction=True)
def test_a_row_that_cannot_be_written_undoes_itself_alone(mailbox):
    insert = CompiledInsert(LoginEvent, EVENT_FIELDS)
    with transaction.atomic():
        Mailbox.objects.filter(pk=mailbox.pk).update(lock_peer="kept")
        with pytest.raises(IntegrityError):
            insert.insert(**event_values(username=None))  # NOT NULL: refused at once, on every database
        insert.insert(**event_values(username="after"))
        assert not transaction.get_rollback()
    assert Mailbox.objects.get(pk=mailbox.pk).lock_peer == "kept"
    assert list(LoginEvent.objects.values_list("username", flat=True)) == ["after"]


@pytest.mark.django_db(transaction=True)
def test_a_savepoint_that_cannot_be_rolled_back_loses_the_transaction_loudly(mailbox, monkeypatch):
    insert = CompiledInsert(LoginEvent, EVENT_FIELDS)
    monkeypatch.setattr(connection.ops, "savepoint_rollback_sql", lambda sid: "ROLLBACK TO no_such_savepoint")
    with pytest.raises(IntegrityError), transaction.atomic():
        Mailbox.objects.filter(pk=mailbox.pk).update(lock_peer="lost")
        try:
            insert.insert(**event_values(username=None))
        finally:
            # atomic() rolls back, instead of committing a broken transaction
            assert transaction.get_rollback()


@pytest.mark.django_db(transaction=True)
def test_a_sites_receivers_still_see_the_row(mailbox):
    seen = []

    def receiver(sender, instance, **kwargs):
        seen.append(instance.username)

    pre_save.connect(receiver, sender=LoginEvent)
    try:
        CompiledInsert(LoginEvent, EVENT_FIELDS).insert(**event_values(username="carol"))
        with transaction.atomic():
            CompiledInsert(LoginEvent, EVENT_FIELDS).insert(**event_values(username="dave"))
    finally:
        pre_save.disconnect(receiver, sender=LoginEvent)
    assert seen == ["carol", "dave"]
    assert sorted(LoginEvent.objects.values_list("username", flat=True)) == ["carol", "dave"]


def test_statements_are_prepared_on_postgresql_unless_switched_off(mailbox, settings):
    if connection.vendor != "postgresql":
        pytest.skip("prepared statements: PostgreSQL only")
    query = CompiledQuery(
        lambda pk: Update(Mailbox.objects.filter(pk=pk), lock_peer="prepared"), model=Mailbox, kinds=(int,)
    )

    def prepared() -> list[str]:
        with connection.cursor() as cursor:
            cursor.execute("SELECT statement FROM pg_prepared_statements")
            return [
                row[0]
                for row in cursor.fetchall()
                if '"lock_peer" = ' in row[0] and "lock_token" not in row[0]
            ]

    connection.ensure_connection()
    connection.connection.prepare_threshold = None  # as Django leaves a new connection
    settings.POPSERVER_DB_PREPARED_STATEMENTS = False  # a site behind an old PgBouncer
    assert query.execute(mailbox.pk) == 1
    assert prepared() == []
    settings.POPSERVER_DB_PREPARED_STATEMENTS = True
    assert query.execute(mailbox.pk) == 1
    assert len(prepared()) == 1
    assert connection.connection.prepare_threshold == 2**31  # Django's own queries are never prepared


def test_an_error_of_a_prepared_statement_is_djangos(mailbox):
    broken = CompiledQuery(lambda pk: Mailbox.objects.filter(pk=pk), model=Mailbox, kinds=(int,))
    broken._compile("default")  # then spoil its SQL
    key = next(iter(broken._compiled))
    compiler, sql, params, where = broken._compiled[key]
    broken._compiled[key] = (
        compiler,
        sql.replace("popserver_mailbox", "popserver_no_such_table"),
        params,
        where,
    )
    with pytest.raises(DatabaseError), transaction.atomic():
        broken.rows(mailbox.pk)


@pytest.mark.django_db(transaction=True)
def test_a_failed_statement_in_a_transaction_can_never_be_committed(mailbox):
    """As the ORM's writes: a caller that catches the error cannot go on to a COMMIT that PostgreSQL would turn
    into a silent ROLLBACK (atomic() rolls back instead)."""
    broken = CompiledQuery(
        lambda pk: Update(Mailbox.objects.filter(pk=pk), lock_token=None),
        model=Mailbox,
        kinds=(int,),
        write=True,
    )
    with transaction.atomic():
        Mailbox.objects.filter(pk=mailbox.pk).update(lock_peer="rolled back")
        with pytest.raises(DatabaseError):
            broken.execute(mailbox.pk)  # NOT NULL: refused on every database
        assert transaction.get_rollback()
    assert Mailbox.objects.get(pk=mailbox.pk).lock_peer == ""


def test_compiled_rows_are_a_list_on_every_database(db):
    assert _locked_scopes(1).rows(timezone.now(), "ip", "none") == []
    assert isinstance(_locked_scopes(1).rows(timezone.now(), "ip", "none"), list)


@pytest.fixture
def without_time_zones(settings):
    """A site with USE_TZ = False (statements are compiled per USE_TZ value)."""
    settings.USE_TZ = False


@pytest.mark.django_db(transaction=True)
def test_a_login_takes_and_frees_the_lock_on_a_site_without_time_zones(make_mailbox, without_time_zones):
    from popserver.storage.maildrop import open_maildrop

    mailbox = make_mailbox("alice")
    maildrop = open_maildrop(mailbox.pk, mailbox=Mailbox.objects.get(pk=mailbox.pk))
    assert Mailbox.objects.get(pk=mailbox.pk).lock_token == maildrop.token
    maildrop.release()
    assert Mailbox.objects.get(pk=mailbox.pk).lock_token == ""


def test_the_throttle_looks_up_on_a_site_without_time_zones(db, without_time_zones):
    from popserver.logins.throttle import DatabaseThrottle

    assert DatabaseThrottle().locked_out("zed", "192.0.2.9", trusted=False) is None
