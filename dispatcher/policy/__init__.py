"""Sending policy: what may go out now, by our own rules rather than the other side's.

* :mod:`.limits` — rate limits per recipient, relay and gateway, held in Redis so they count
  every letter from every worker.
* :mod:`.hours` — office hours in the recipient's timezone, with closed days.

A letter held back by either is *deferred* (not a failure, not a retry). See docs/policy.md.
"""

from dispatcher.policy.hours import HoursSpecError, OfficeHours
from dispatcher.policy.limits import Rate, RateLimiter

__all__ = ["HoursSpecError", "OfficeHours", "Rate", "RateLimiter"]
