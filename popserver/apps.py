from django.apps import AppConfig
from django.core.checks import register


class PopserverConfig(AppConfig):
    name = "popserver"
    verbose_name = "POP3 server"
    # Set here so a site's DEFAULT_AUTO_FIELD never makes `makemigrations` want a popserver migration.
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the system checks)
        from .clientconfig.checks import check_client_configuration

        register(check_client_configuration)

        from django.db.models.signals import pre_delete

        from .models import Mailbox
        from .storage.bodies import release_mailbox_bodies

        # A mailbox deleted with its user or by the admin: its stored bodies' references are counted down.
        pre_delete.connect(
            release_mailbox_bodies, sender=Mailbox, dispatch_uid="popserver.release_mailbox_bodies"
        )
