"""DNS questions the preflight asks: a DKIM key record (TXT) and a bounce domain's MX.

:class:`Lookup` is what the preflight needs of a resolver; :class:`SystemDns` asks the
machine's resolvers through dnspython with a short deadline. Tests hand the preflight a small
object of their own, so no test ever depends on the network.
"""

from __future__ import annotations

from typing import Protocol

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver

from dispatcher.errors import DispatchError

#: seconds for one question, every retry and server included
DNS_TIMEOUT = 5.0


class DnsUnanswered(DispatchError):
    """No server answered the question (no network, resolvers down, timed out): the record may
    well exist."""


class Lookup(Protocol):
    async def txt(self, name: str) -> list[str] | None:
        """The name's TXT records, each with its strings joined; None: the name or the record
        does not exist. Raises :class:`DnsUnanswered`."""
        ...

    async def mx(self, name: str) -> list[str] | None:
        """The name's mail exchangers (host names, most preferred first); None: no MX, or a
        null MX."""
        ...


class SystemDns:
    """The machine's resolvers (/etc/resolv.conf), each question within ``timeout`` seconds."""

    def __init__(self, timeout: float = DNS_TIMEOUT) -> None:
        self.timeout = timeout

    async def txt(self, name: str) -> list[str] | None:
        answer = await self._ask(name, "TXT")
        if answer is None:
            return None
        return [b"".join(rdata.strings).decode("ascii", "replace") for rdata in answer]

    async def mx(self, name: str) -> list[str] | None:
        answer = await self._ask(name, "MX")
        if answer is None:
            return None
        ordered = sorted(answer, key=lambda rdata: rdata.preference)
        # a "null MX" (RFC 7505: MX 0 .) says the domain takes no mail at all
        hosts = [rdata.exchange.to_text(omit_final_dot=True) for rdata in ordered if rdata.exchange != dns.name.root]
        return hosts or None

    async def _ask(self, name: str, rdtype: str) -> dns.resolver.Answer | None:
        try:
            resolver = dns.asyncresolver.Resolver()
            return await resolver.resolve(name, rdtype, lifetime=self.timeout, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except dns.resolver.NoResolverConfiguration:
            raise DnsUnanswered("this machine has no DNS resolver configured") from None
        except dns.exception.Timeout:
            raise DnsUnanswered(f"no answer for {name} {rdtype} within {self.timeout:g} s") from None
        except (dns.resolver.NoNameservers, dns.exception.DNSException, OSError) as exc:
            raise DnsUnanswered(f"{name} {rdtype}: {exc}") from None
