#!/usr/bin/env bash
# Debian's Exim for tests/test_lmtp_exim.py on a machine that has Postfix: the exim4 and postfix packages
# replace each other, so exim4-daemon-light is downloaded (cached in data/tools/debs) and unpacked into
# data/tools/exim4 instead of installed. Its shared libraries are ordinary packages and are installed; the
# user Debian-exim that Debian's build runs as is created when missing. Needs root and apt (Debian 12+).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
tools="$PWD/data/tools"
unpacked="$tools/exim4"
package=exim4-daemon-light

candidate() { apt-cache policy "$package" 2>/dev/null | awk '/Candidate:/ {print $2}'; }
version=$(candidate)
if [ -z "$version" ] || [ "$version" = "(none)" ]; then
    apt-get update -qq
    version=$(candidate)
fi
if [ -z "$version" ] || [ "$version" = "(none)" ]; then
    echo "unpack-exim: apt knows no $package" >&2
    exit 1
fi
deb="$tools/debs/${package}_${version//:/%3a}_$(dpkg --print-architecture).deb"
if [ ! -s "$deb" ]; then
    mkdir -p "$tools/debs"
    rm -f "$tools/debs/${package}"_*.deb
    (cd "$tools/debs" && { apt-get download -qq -o APT::Sandbox::User=root "$package=$version" ||
        { apt-get update -qq && apt-get download -qq -o APT::Sandbox::User=root "$package=$version"; }; })
fi
if [ "$(cat "$unpacked/VERSION" 2>/dev/null)" != "$version" ]; then
    rm -rf "$unpacked"
    dpkg-deb -x "$deb" "$unpacked"
    # Run by root with its own -C configuration and deliver_drop_privilege: it never needs to regain root.
    chmod u-s "$unpacked/usr/sbin/exim4"
    echo "$version" > "$unpacked/VERSION"
fi
# The libraries it links to (its Depends that start with lib), installed as usual when missing.
missing=()
for lib in $(dpkg-deb -f "$deb" Depends | tr ',|' '\n\n' | awk '$1 ~ /^lib/ {print $1}'); do
    dpkg-query -W -f='${Status}' "$lib" 2>/dev/null | grep -q 'install ok installed' || missing+=("$lib")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get install -y -qq "${missing[@]}" >/dev/null ||
        { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; }
fi
if ldd "$unpacked/usr/sbin/exim4" | grep -q 'not found'; then
    ldd "$unpacked/usr/sbin/exim4" | grep 'not found' >&2
    exit 1
fi
getent passwd Debian-exim >/dev/null ||
    useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
        Debian-exim
chmod -R o+rX "$tools"
echo "Exim $version unpacked in $unpacked"
