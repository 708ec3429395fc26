"""switchyard-eventsource: an eventsource-py event store that reads and writes through a
Switchyard proxy (see README.md)."""

from switchyard_eventsource.store import SwitchyardError, SwitchyardEventStore

__all__ = ["SwitchyardError", "SwitchyardEventStore"]
