"""The fleet's clock arithmetic: when to renew, when to stop, when the fence kills.

Logic layer (pure), used by the coordinator. Every deadline counts from the monotonic SEND
time of the last renewal etcd acknowledged: etcd restarted the lease's TTL after it received
that request, so the lease cannot expire before send time + TTL on our clock.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Timing:
    ttl: float

    @property
    def renew_every(self) -> float:
        return min(1.0, self.ttl / 6)  # five renewals can fail before the controller stops anything

    @property
    def sync_every(self) -> float:
        return min(1.0, self.ttl / 4)  # watches wake us sooner; this is the floor

    @property
    def request_timeout(self) -> float:
        return max(0.3, min(2.0, self.ttl / 6))

    @property
    def fence_margin(self) -> float:
        return max(0.2, self.ttl * 0.1)  # the fence's kill lands this long before the earliest expiry

    @property
    def stop_lead(self) -> float:
        return self.ttl * 0.25  # the controller's own stop starts this long before the fence kills

    def fence_at(self, acked_at: float) -> float:
        return acked_at + self.ttl - self.fence_margin

    def stop_at(self, acked_at: float) -> float:
        return self.fence_at(acked_at) - self.stop_lead
