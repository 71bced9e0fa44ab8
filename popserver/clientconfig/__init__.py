"""Mail clients configure themselves: Thunderbird autoconfig, Outlook autodiscover, Apple configuration
profiles and the DNS records that point at them (``manage.py popdns``). See ``published`` for the settings."""
