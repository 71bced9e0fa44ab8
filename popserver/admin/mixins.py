"""What the admin's pages share: the owner's search fields, counted nouns, one date format, lists that fit the
screen, and the read-only admin base."""

from django.contrib import admin
from django.contrib.auth import get_user_model
from django.core.exceptions import FieldDoesNotExist
from django.utils import timezone
from django.utils.formats import date_format

User = get_user_model()
USERNAME_LOOKUP = f"user__{User.USERNAME_FIELD}"


def user_search_fields() -> list[str]:
    """The owner's login name and e-mail field, whatever the site's user model calls them."""
    fields = [USERNAME_LOOKUP]
    email = User.get_email_field_name()
    try:
        if email != User.USERNAME_FIELD and User._meta.get_field(email).concrete:
            fields.append(f"user__{email}")
    except FieldDoesNotExist:
        pass
    return fields


def counted(number: int, singular: str, plural: str = "") -> str:
    return f"{number} {singular if number == 1 else plural or singular + 's'}"


class FitsTheScreen:
    """A list that fits a 1280 px screen beside the admin's navigation and filters: long values (addresses,
    host names, unique ids) wrap anywhere instead of widening the table (``popserver/admin/lists.css``)."""

    class Media:
        css = {"all": ["popserver/admin/lists.css"]}


class ReadOnlyAdmin(FitsTheScreen, admin.ModelAdmin):
    """Rows written by the server: never added or changed here; superusers may delete them."""

    show_full_result_count = False  # a large table: no second COUNT over every row on each page
    list_per_page = 50

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return request.user.is_superuser and super().has_delete_permission(request, obj)


def when(moment) -> str:
    """A date and time in Django's DATETIME_FORMAT, in the current time zone: the one format of every page."""
    if moment is None:
        return "-"
    return date_format(timezone.localtime(moment), "DATETIME_FORMAT")
