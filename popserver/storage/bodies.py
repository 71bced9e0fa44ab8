"""Where message bytes live: one small interface, so that object storage can be added later.

The protocol and the maildrop read bodies only through ``get_body_store()``.
"""

from collections.abc import Iterable, Iterator

from django.utils.module_loading import import_string

from popserver.conf import get_setting
from popserver.exceptions import MessageExpunged


class BodyStore:
    """Interface: save a message's bytes, read them back in chunks, delete them."""

    def save(self, message, data: bytes) -> None:
        raise NotImplementedError

    def read_chunks(self, message_id: int) -> Iterator[bytes]:
        """Yield the bytes in order; raise MessageExpunged if the message is gone before the first chunk."""
        raise NotImplementedError

    def delete(self, message_ids: Iterable[int]) -> None:
        """Delete the bodies of these messages; runs inside the caller's transaction."""
        raise NotImplementedError


class DatabaseBodyStore(BodyStore):
    """Bytes in ``MessageChunk`` rows of at most BODY_CHUNK_SIZE octets. A small message is one row, read in
    one query; a large one is read row by row, each in its own short query (no transaction held open)."""

    def save(self, message, data: bytes) -> None:
        from popserver.models import MessageChunk

        size = get_setting("BODY_CHUNK_SIZE")
        parts = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
        MessageChunk.objects.bulk_create(
            [MessageChunk(message=message, seq=seq, data=part) for seq, part in enumerate(parts)],
            batch_size=1,
        )

    def read_chunks(self, message_id: int) -> Iterator[bytes]:
        from django.db.models import Exists, OuterRef

        from popserver.models import MessageChunk

        seq = 0
        while True:
            following = MessageChunk.objects.filter(message_id=OuterRef("message_id"), seq=seq + 1)
            row = (
                MessageChunk.objects.filter(message_id=message_id, seq=seq)
                .annotate(more=Exists(following))
                .values_list("data", "more")
                .first()
            )
            if row is None:  # gone: before the first chunk, or (after +OK was sent) in the middle
                raise MessageExpunged(message_id)
            yield bytes(row[0])
            if not row[1]:
                return
            seq += 1

    def delete(self, message_ids: Iterable[int]) -> None:
        from popserver.models import MessageChunk

        MessageChunk.objects.filter(message_id__in=list(message_ids)).delete()


def get_body_store() -> BodyStore:
    return import_string(get_setting("BODY_STORE"))()
