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
