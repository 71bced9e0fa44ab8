from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("mail/", include("popserver.urls")),
    # Mail clients' discovery paths are fixed: /mail/config-v1.1.xml, /.well-known/autoconfig/...,
    # /autodiscover/autodiscover.xml. (/mail/config-v1.1.xml does not collide with popserver.urls.)
    path("", include("popserver.clientconfig.urls")),
]
