"""URLs as Conclave prints them. A light module: the CLI imports it at start."""

from __future__ import annotations

import re
from urllib.parse import quote, urlsplit, urlunsplit

# A URL's scheme and authority in a text (up to the path, query, fragment, a space or a quote).
# Tried only where a run of the scheme's characters starts, the scheme being that run from its
# first letter (`shown`): tried at each of the run's characters, a long run with no "://" (a
# word, a 1 MB error text) took time growing with its square.
_URL_AUTHORITY = re.compile(r"(?<![A-Za-z0-9+.-])([A-Za-z0-9+.-]+://)([^/?#\s'\"<>]*)")
_SCHEME_START = re.compile(r"[A-Za-z]")
# An IPv6 host with a zone, as Conclave holds it (`[fe80::1%eth0]`: see `cli.zone_decoded`);
# no "[" inside, for the same reason (an authority of many "[").
_ZONED_HOST = re.compile(r"\[([^\[\]%]*)%([^\[\]]*)\]")


def shown_url(url: str) -> str:
    """`url` for printing (output and errors): a password in it as ***, and the zone of an IPv6
    host as RFC 6874 writes it (`http://[fe80::1%25eth0]:8470`), the form `--ds` and `--sfu`
    take: the URLs Conclave holds have it decoded (`[fe80::1%eth0]`, what aiohttp connects
    to), which the user did not type (`--ds 'http://[fe80::1%eth0]:8470'`, as curl takes it,
    is taken too, and shown in the one form)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL urlsplit takes (a bad port, say): read as in a text
        return shown_urls(url)
    if password is None:
        return shown_urls(url)
    host = parts.netloc.rpartition("@")[2]
    return shown_urls(urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}")))


def shown_urls(text: str) -> str:
    """`text` with every URL in it shown as `shown_url` shows one: the password as ***, an IPv6
    zone as `%25` and the zone, percent-encoded. For the texts of errors about URLs Conclave
    holds (aiohttp quotes a URL it cannot use whole, user information and all; the SFU client
    names the SFU's), never for what the user typed, whose `%25` would be encoded again. The
    user information ends at the authority's last "@", as urlsplit reads it."""

    def shown(m: re.Match[str]) -> str:
        start = _SCHEME_START.search(m[1])
        if start is None:  # no letter before "://": no scheme
            return m[0]
        userinfo, at, host = m[2].rpartition("@")
        if at and ":" in userinfo:
            userinfo = f"{userinfo.partition(':')[0]}:***"
        host = _ZONED_HOST.sub(lambda h: f"[{h[1]}%25{quote(h[2], safe='')}]", host)
        return f"{m[1]}{userinfo}{at}{host}"

    return _URL_AUTHORITY.sub(shown, text)
