/* SPDX-License-Identifier: MIT */
/*
 * virtio_can.h - the inmate's virtio-can DRIVER (frontend) on an ivshmem
 * link; the Python backend is the device and bridges to the root cell's
 * python-can bus.  Glue between the link and the CAN bridge (bridge.h):
 *
 *   bridge relay hook  (a frame no fast-reply rule answered)
 *        -> relay FIFO -> txq: a TX request (header + payload, u8 result)
 *   rxq (24-byte classic buffers, always posted)
 *        -> validated frame -> bridge_send(tag) -> MCP2515 -> the wire
 *   bridge state hook  BUS_OFF -> control request VCAN_CTRL_IVV_BUSOFF
 *   error-warning/passive, RX overflow -> IVV_CAN_IVV_ERROR_REPORT (bit 22)
 *        (project extension, see README-virtio.md) so the backend turns the
 *        physical bus-off into virtio-can BUSOFF on the Linux side; the
 *        MCP2515 restarts after restart_ms and a START clears it again
 *   controlq           START on every attach (and after a bus-off)
 *
 * Link life cycle, all driven from vcan_poll() (no blocking beyond the
 * bounded bring-up, during which the bridge keeps being polled):
 *   DOWN  --backend READY-->  bring-up (probe, features, queues, DRIVER_OK,
 *   START)  -->  LIVE  --backend leaves READY-->  leave (STATE 0), DOWN
 *   LIVE  --NEEDS_RESET or a ring the device broke-->  reset + bring-up
 * Failed attempts back off exponentially (retry_min_ms .. retry_max_ms), so
 * a hostile backend costs bounded time while fast replies go on.
 */
#ifndef RTOS_INMATE_VIRTIO_CAN_H
#define RTOS_INMATE_VIRTIO_CAN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "bridge.h"
#include "can_msg.h"
#include "ivshmem_link.h"
#include "virtio_ivshmem.h"

/*
 * Project extension (README-virtio.md): a device-specific feature bit the
 * ivshmem-virtio backend offers, and the control request it enables.  The
 * driver reports that the controller BEHIND it (the MCP2515 on the physical
 * bus) went bus-off; the device answers OK and shows virtio-can BUSOFF on its
 * links.  Never sent unless the feature was negotiated.
 */
#define VCAN_F_IVV_BUSOFF_REPORT 23u
#define VCAN_CTRL_IVV_BUSOFF 0x02F0u

#define VCAN_RELAY_FIFO 128u /* frames waiting for a TX slot (power of two) */

struct vcan_config {
	uint16_t txq_size;     /* wanted ring sizes, 0 = default (128 / 64 / 8) */
	uint16_t rxq_size;
	uint16_t ctlq_size;
	uint32_t restart_ms;   /* MCP2515 restart after bus-off; 0 = never */
	uint64_t timeout_ns;   /* per transaction wait, 0 = default */
	uint32_t retry_min_ms; /* back-off after a failed attach, 0 = 20 */
	uint32_t retry_max_ms; /* 0 = 2000 */
	/* optional: events for the platform's log (hosted: stdout lines) */
	void (*on_event)(void *ctx, const char *event, const char *detail);
	void *event_ctx;
};

enum vcan_state {
	VCAN_DOWN = 0, /* not attached; waiting for the backend (or the back-off) */
	VCAN_LEAVING,  /* left READY, waiting for the backend to notice */
	VCAN_LIVE,     /* queues running */
};

struct vcan_stats {
	uint32_t relay_count;   /* frames relayed to Linux and answered OK */
	uint32_t relay_fails;   /* ... answered NOT_OK */
	uint32_t relay_dropped; /* link down or FIFO full */
	uint32_t rx_count;      /* frames from Linux handed to the bridge */
	uint32_t rx_invalid;    /* RX buffers with an impossible frame or length */
	uint32_t rx_empty;      /* RX buffers handed back unused */
	uint32_t rx_sent;       /* ... that left the MCP2515 (tx_done ok) */
	uint32_t rx_send_fails; /* refused by the bridge or cancelled */
	uint32_t ctl_count;
	uint32_t ctl_fails;
	uint32_t busoff_reports;
	uint32_t err_reports;      /* error-state reports answered OK (bit 22) */
	uint32_t err_report_fails; /* ... refused or not answered OK */
	uint32_t rx_errframes;     /* error frames from the device, ignored (bit 22) */
	uint32_t can_restarts;
	uint32_t attaches;
	uint32_t detaches;      /* backend lost or attach failed */
	uint32_t resets;        /* in-place recoveries (NEEDS_RESET, broken ring) */
	uint32_t ring_faults;
};

struct vcan_slots {
	uint32_t base;   /* offset of the pool in the R/W section */
	uint16_t stride;
	uint16_t count;
	uint16_t nfree;
	uint16_t free[VQ_MAX_SIZE];
	uint8_t busy[VQ_MAX_SIZE];
	uint16_t msg[VQ_MAX_SIZE]; /* control: the msg_type in flight per slot */
};

struct vcan {
	struct bridge *br;
	struct vcan_config cfg;
	struct vio_dev vio;
	enum vcan_state state;
	bool in_bringup;
	struct vio_queue *txq, *rxq, *ctlq;
	struct vcan_slots tx, rx, ctl;
	bool rtr;          /* RTR_FRAMES negotiated */
	bool busoff_ext;   /* VCAN_F_IVV_BUSOFF_REPORT negotiated */
	bool err_ext;      /* IVV_CAN_F_IVV_ERROR_STATE negotiated */
	/* error report: the state the device last accepted to hear, overflows reported */
	uint8_t err_state_sent;   /* IVV_CAN_STATE_ERROR_* */
	uint32_t ovr_sent;        /* mcp2515 rx_overflows covered by reports sent */
	uint16_t dev_status; /* virtio-can config status last read */
	/* bridge -> Linux */
	struct can_msg relay[VCAN_RELAY_FIFO];
	uint32_t relay_head, relay_count;
	/* Linux -> bridge: one frame waiting for room in the MCP2515 TX FIFO */
	struct can_msg held;
	bool held_valid;
	uint32_t tag;
	/* controller */
	enum mcp2515_state can_state;
	bool report_busoff;   /* a bus-off report is due */
	bool start_due;       /* a START is due at start_at_ns */
	uint64_t start_at_ns;
	uint64_t restart_at_ns; /* MCP2515 restart after bus-off */
	/* retry */
	uint64_t retry_at_ns;
	uint32_t retry_ms;
	uint64_t live_since_ns;
	uint64_t left_at_ns;
	struct vcan_stats stats;
};

/*
 * Bind to a link and a bridge (whose hooks this installs).  Returns
 * VIO_OK or a vio_rc for an unusable link.
 */
int vcan_init(struct vcan *vc, struct bridge *br, const struct ivshmem_link *link,
	      const struct vcan_config *cfg);

/*
 * One pass of the link: attach when possible, collect completions, feed the
 * rings, report bus-off, recover.  Returns the number of things done (>= 0)
 * so an idle loop knows when it may sleep.
 */
int vcan_poll(struct vcan *vc);

/* Leave the link (STATE 0); for a clean exit. */
void vcan_shutdown(struct vcan *vc);

const char *vcan_state_name(enum vcan_state s);

#endif /* RTOS_INMATE_VIRTIO_CAN_H */
