"""Unique ids compare as bytes on every database (RFC 1939 s.7: "abc" and "ABC" are different ids).

MariaDB/MySQL collations are case-insensitive by default; PostgreSQL and SQLite already compare bytes. A
database-specific step, not ``db_collation`` on the field, so SQLite and PostgreSQL migrate unchanged.
"""
from django.db import migrations


def uid_to_binary_collation(apps, schema_editor):
    if schema_editor.connection.vendor != "mysql":
        return
    schema_editor.execute(
        "ALTER TABLE popserver_message MODIFY uid varchar(70) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL"
    )


def uid_to_default_collation(apps, schema_editor):
    if schema_editor.connection.vendor != "mysql":
        return
    schema_editor.execute("ALTER TABLE popserver_message MODIFY uid varchar(70) NOT NULL")


class Migration(migrations.Migration):
    atomic = False  # MySQL cannot roll DDL back; Django refuses DDL inside a transaction there
    dependencies = [("popserver", "0001_initial")]
    operations = [migrations.RunPython(uid_to_binary_collation, uid_to_default_collation, elidable=False)]
