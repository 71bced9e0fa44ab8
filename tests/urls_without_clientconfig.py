"""A site that includes popserver.urls but not popserver.clientconfig.urls (for the system checks)."""

from django.urls import include, path

urlpatterns = [path("mail/", include("popserver.urls"))]
