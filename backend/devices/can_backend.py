"""One CAN controller shared by several virtio-can links: the switch plus the bus.

:class:`CanBackend` routes between the links (each a
:class:`~ivshmem_virtio.backend.devices.can_service.CanLinkService`) and the bus bridge, on the
daemon's one event loop. A frame a link sends goes to the bus first; the other links receive it
once the bus accepted it, as on a real wire, and never its sender (spec §8.7). Frames read from
the bus go to every accepting link. Deliveries are published once per batch: one notification
per link, not one per frame. A bus error is bus-off for every link (spec §1 bus-off flow), and
frames still queued for the bus are not sent; a link's driver reporting its controller's error
state (extension, bit 22) reaches the status word of every link and an error frame to the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from ivshmem_virtio.spec import can as wire
from ivshmem_virtio.spec.can import CanFrame

from .can import BUS, DEFAULT_FEATURES, CanLinkModel, CanSwitch
from .can_service import CanLinkService

if TYPE_CHECKING:
    from ..resources.canbus import CanBusBridge, TxTicket

log = structlog.get_logger("ivshmem_virtio.backend.can")


class CanBackend:
    """One CAN controller shared by several virtio-can links: the switch plus the bus."""

    def __init__(self, bridge: CanBusBridge | None, *,
                 features: int = DEFAULT_FEATURES) -> None:
        self.bridge = bridge
        # The error-state extension (bit 22) rides with the bus-off report (bit 23): a switch that
        # hears a driver's controller bus-off hears its warning/passive/overflow too. (The daemon's
        # feature list, backend/can_daemon.py, names bit 23 only.)
        if features & wire.F_IVV_BUSOFF_REPORT:
            features |= wire.F_IVV_ERROR_STATE
        self.features = features
        self.switch = CanSwitch(has_bus=bridge is not None)
        self.links: dict[str, CanLinkService] = {}
        self.bus_off_count = 0
        #: The controller error state last reported by a link's driver (extension, bit 22):
        #: Linux's enum can_state, 0 active, 1 warning, 2 passive.
        self.error_state = wire.CAN_STATE_ERROR_ACTIVE
        #: Counted as Linux's can_stats / net stats count them for mcp251x.
        self.error_warning_count = 0
        self.error_passive_count = 0
        self.rx_overflow_count = 0
        self._touched: dict[str, CanLinkService] = {}  # links with deliveries not yet flushed

    def add_link(self, link_id: str) -> CanLinkService:
        model = CanLinkModel(self.features)
        self.switch.attach(link_id, model)
        service = CanLinkService(self, link_id, model)
        self.links[link_id] = service
        return service

    def detach(self, service: CanLinkService) -> None:
        if self.links.pop(service.link_id, None) is not None:
            self.switch.detach(service.link_id)

    def start(self) -> None:
        """Start the bus bridge; call from the daemon's event loop."""
        if self.bridge is not None:
            self.bridge.start(self.from_bus, self.bus_error, self._tx_done)

    def close(self) -> None:
        for service in list(self.links.values()):
            service.close()
        if self.bridge is not None:
            self.bridge.close()

    # -- routing --------------------------------------------------------------------------------
    def transmit(self, sender: CanLinkService, frame: CanFrame) -> TxTicket | bool:
        """Put a frame of ``sender`` on the wire; the other links get it once the bus has it.

        True: on the bus now, and delivered to the other links (call :meth:`flush_rx` after the
        batch). False: refused now; the bus error was reported, so every link is bus-off. A
        ticket: queued; :meth:`_tx_done` routes it and answers ``sender`` later.
        """
        if self.bridge is not None:
            outcome = self.bridge.send(frame, sender)
            if outcome is not True:
                return outcome
        if self.links.get(sender.link_id) is sender:
            self._route(sender, frame)
        return True

    def _tx_done(self, results: list[tuple[TxTicket, bool]]) -> None:
        """Outcomes of queued frames (in wire order): deliver, answer, then publish once each."""
        answered: dict[str, CanLinkService] = {}
        for ticket, ok in results:
            sender: CanLinkService = ticket.tag  # type: ignore[assignment]
            if ok and self.links.get(sender.link_id) is sender:
                self._route(sender, ticket.frame)
            if sender.tx_finished(ticket, ok):
                answered[sender.link_id] = sender
        self.flush_rx()
        for sender in answered.values():
            sender.publish_tx()

    def _route(self, sender: CanLinkService, frame: CanFrame) -> None:
        """Deliver a frame the bus accepted to every other accepting link (unpublished)."""
        touched = self._touched
        for dest, _ in self.switch.from_link(sender.link_id, frame):
            if dest is BUS:
                continue
            service = self.links[str(dest)]
            service.deliver(frame)
            touched[service.link_id] = service

    def flush_rx(self) -> None:
        """Publish the deliveries made since the last flush: one notification per link."""
        touched = self._touched
        while touched:
            _, service = touched.popitem()
            service.flush_rx()

    def from_bus(self, frames: list[CanFrame]) -> None:
        """A batch read from the bus: every accepting link, then one notification per link."""
        touched = self._touched
        for frame in frames:
            for link_id in self.switch.from_bus(frame):
                service = self.links[str(link_id)]
                service.deliver(frame)
                touched[service.link_id] = service
        self.flush_rx()

    def bus_error(self, reason: str) -> None:
        """The shared controller went bus-off: every link sees it (spec §1 bus-off flow)."""
        self.bus_off_count += 1
        if self.bridge is not None:
            self.bridge.cancel_all()
        log.warning("bus-off", reason=reason, links=len(self.links))
        for service in list(self.links.values()):
            service.bus_off()

    def controller_error(self, source: CanLinkService, report: wire.ErrorReport) -> None:
        """A link's driver reported its controller's error state or an RX overflow.

        virtio-can only knows bus-off, so this is the project's extension (bit 22): the state
        goes into the status word of every link that negotiated it, and every OTHER such link
        (no own echo, §8.7) gets the error frame Linux's mcp251x would have produced.
        """
        old = self.error_state
        if report.state != old:
            if old == wire.CAN_STATE_ERROR_ACTIVE and report.state >= wire.CAN_STATE_ERROR_WARNING:
                self.error_warning_count += 1
            if report.state == wire.CAN_STATE_ERROR_PASSIVE:
                self.error_passive_count += 1
            self.error_state = report.state
        self.rx_overflow_count += report.rx_overflows
        log.warning("controller error state", link=source.link_id, state=report.state,
                    crtl=report.crtl, txerr=report.txerr, rxerr=report.rxerr,
                    rx_overflows=report.rx_overflows)
        frame = wire.CanErrorFrame.from_report(report)
        touched = self._touched
        for service in list(self.links.values()):
            service.show_error_state(report.state)
            if service is not source and service.model.error_state_ext:
                service.deliver_error(frame)
                touched[service.link_id] = service
        self.flush_rx()
