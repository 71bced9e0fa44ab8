"""Self-service views: a signed-in user lists, creates (the secret shown once) and revokes their POP3 app
passwords, and sees how to set up a mail client (with an Apple profile to download). Include
``popserver.urls`` in a site's URLconf; override the templates under ``popserver/app_passwords/`` and
``popserver/clientconfig/``."""

from dataclasses import replace

from django import forms
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils.http import content_disposition_header, urlencode
from django.views.decorators.http import require_http_methods, require_POST, require_safe

from .clientconfig import documents
from .clientconfig.checks import views_installed
from .clientconfig.logins import account_of
from .clientconfig.published import domain_config, domain_of
from .logins.app_passwords import create_app_password, revoke_app_password
from .models import Mailbox
from .storage.retention import policy_of_mailbox


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


def _client_setup(mailbox: Mailbox):
    """The signed-in user's account and what is published for its primary address's domain (or the site's),
    with this mailbox's own retention policy (what CAPA EXPIRE says after login)."""
    account = account_of(mailbox)
    config = (domain_config(domain_of(account.address)) if account.address else None) or domain_config(None)
    if config is not None:
        config = replace(config, expire_days=policy_of_mailbox(mailbox).expire_days)
    return account, config


@login_required
@require_safe
def mail_client_setup(request):
    mailbox = _mailbox(request)
    account, config = _client_setup(mailbox)
    autoconfig_url = None
    if config is not None and account.address and views_installed():
        query = urlencode({"emailaddress": account.address})
        autoconfig_url = f"{reverse('popserver_clientconfig:autoconfig')}?{query}"
    response = render(
        request,
        "popserver/clientconfig/setup.html",
        {
            "mailbox": mailbox,
            "account": account,
            "config": config,
            "autoconfig_url": autoconfig_url,
            "mobileconfig_available": config is not None and config.outgoing is not None,
        },
    )
    response["Cache-Control"] = "private"
    return response


@login_required
@require_safe
def mobileconfig(request):
    """The user's Apple configuration profile (unsigned: the device says "Unverified" before installing)."""
    mailbox = _mailbox(request)
    account, config = _client_setup(mailbox)
    if config is None or config.outgoing is None:
        raise Http404("No Apple profile: this site publishes no outgoing mail server.")
    user = mailbox.user
    full_name = user.get_full_name() if hasattr(user, "get_full_name") else ""
    body = documents.mobileconfig(
        config,
        account_key=f"mailbox{mailbox.pk}",
        username=account.username,
        address=account.address,
        full_name=full_name,
    )
    response = HttpResponse(body, content_type=documents.MOBILECONFIG_TYPE)
    filename = f"{config.domain or 'mail'}-pop3.mobileconfig"
    response["Content-Disposition"] = content_disposition_header(as_attachment=True, filename=filename)
    response["Cache-Control"] = "private, no-store"
    return response
