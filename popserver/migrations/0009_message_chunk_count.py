"""Message.chunk_count: the number of body chunks, read with the snapshot (issue 15).

Existing rows get their count from their chunks in one UPDATE with a correlated subquery (indexed by the
chunks' unique (message, seq)); reversing drops the column.
"""

from django.db import migrations, models
from django.db.models import Count, OuterRef, Subquery, Value
from django.db.models.functions import Coalesce


def count_chunks(apps, schema_editor):
    Message = apps.get_model("popserver", "Message")
    MessageChunk = apps.get_model("popserver", "MessageChunk")
    counts = (
        MessageChunk.objects.filter(message=OuterRef("pk"))
        .order_by()
        .values("message")
        .annotate(n=Count("*"))
        .values("n")
    )
    messages = Message.objects.using(schema_editor.connection.alias)
    messages.update(chunk_count=Coalesce(Subquery(counts), Value(0)))


class Migration(migrations.Migration):
    dependencies = [("popserver", "0008_overview_quota_warnings")]
    operations = [
        migrations.AddField(
            model_name="message",
            name="chunk_count",
            field=models.PositiveIntegerField(default=0, editable=False),
        ),
        migrations.RunPython(count_chunks, migrations.RunPython.noop, elidable=True),
    ]
