"""Self-service views: a signed-in user lists, creates (the secret shown once) and revokes their POP3 app
passwords. Include ``popserver.urls`` in a site's URLconf; override the templates under
``popserver/app_passwords/``."""

from django import forms
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from .logins.app_passwords import create_app_password, revoke_app_password
from .models import Mailbox


class AppPasswordForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="e.g. the device or program that will use it")


def _mailbox(request) -> Mailbox:
    mailbox = Mailbox.objects.filter(user=request.user).first()
    if mailbox is None:
        raise Http404("You have no mailbox.")
    return mailbox


@login_required
@require_http_methods(["GET", "POST"])
def app_password_list(request):
    mailbox = _mailbox(request)
    secret = created = None
    form = AppPasswordForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        created, secret = create_app_password(mailbox, form.cleaned_data["name"])
        form = AppPasswordForm()
    response = render(
        request,
        "popserver/app_passwords/list.html",
        {
            "mailbox": mailbox,
            "app_passwords": mailbox.app_passwords.all(),
            "form": form,
            "created": created,
            "secret": secret,
        },
    )
    response["Cache-Control"] = "no-store"  # the secret is on this page once
    return response


@login_required
@require_POST
def app_password_revoke(request, pk: int):
    app_password = get_object_or_404(_mailbox(request).app_passwords, pk=pk)
    revoke_app_password(app_password)
    return redirect("popserver:app-passwords")
