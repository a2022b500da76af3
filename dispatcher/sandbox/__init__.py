"""The sandbox stand-ins, in a room of their own: what sandbox mode (the default) delivers to
instead of real offices.

* :mod:`dispatcher.sandbox.smtp` — a local SMTP server keeping every letter as a file;
* :mod:`dispatcher.sandbox.faxlab` — the fax lab, a :class:`~dispatcher.channels.fax.base.FaxGateway`
  that places real T.30 calls in software (:mod:`dispatcher.sandbox.spandsp`).

Like httpx's ``MockTransport``, they implement the same interfaces as the real thing and are
first-class: dev mode, the tests and the benchmarks use them. Production channel packages
never import them; the wiring (:mod:`dispatcher.app`) hands them in when sandbox mode is on.
"""
