/* Loads and stores on the shared section, for both sides' compiled code (vqblk.c, vqdrv.c).
 *
 * The peer writes the section at any time. Each value is copied into a local with memcpy and
 * a compiler barrier follows (COPIED), so the compiler can never fetch a field a second time
 * from shared memory after it was checked (a double fetch): what is validated is what is used.
 * Indices the other side polls are stored with one 16-bit store (never torn), as the Python
 * side's typed memoryviews do. Everything on the wire is little-endian (virtio 1.x).
 */
#ifndef IVSHMEM_VIRTIO_SHMIO_H
#define IVSHMEM_VIRTIO_SHMIO_H

#include <endian.h>
#include <stdint.h>
#include <string.h>

#define COPIED() __asm__ __volatile__("" ::: "memory")

/* virtq_desc flags, and the blk request types and statuses both sides look at */
#define F_NEXT 1u
#define F_WRITE 2u
#define F_INDIRECT 4u
#define T_IN 0u
#define T_OUT 1u
#define S_OK 0u
#define S_IOERR 1u

static inline uint16_t ld16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, sizeof v);
    return le16toh(v);
}

static inline uint32_t ld32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return le32toh(v);
}

static inline void st16(uint8_t *p, uint16_t v)
{
    __atomic_store_n((uint16_t *)(void *)p, htole16(v), __ATOMIC_RELAXED);
}

static inline void st32(uint8_t *p, uint32_t v)
{
    v = htole32(v);
    memcpy(p, &v, sizeof v);
}

#endif
