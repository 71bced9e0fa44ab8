from django.urls import path

from . import views

app_name = "popserver"
urlpatterns = [
    path("app-passwords/", views.app_password_list, name="app-passwords"),
    path("app-passwords/<int:pk>/revoke/", views.app_password_revoke, name="app-password-revoke"),
    path("setup/", views.mail_client_setup, name="mail-client-setup"),
    path("setup/pop3.mobileconfig", views.mobileconfig, name="mobileconfig"),
]
