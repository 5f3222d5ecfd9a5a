/*
 * IOVector: a growable scatter/gather list with its total size, the data
 * carrier of every read and write in the block layer.  Requests carry an
 * IOVector plus a byte offset into it, so a driver can hand a part of a
 * request to its child without copying or re-building the list.
 */
#ifndef BLOCKCORE_IOV_H
#define BLOCKCORE_IOV_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/uio.h>

#define IOV_LOCAL 4

typedef struct IOVector {
    struct iovec *iov;
    int niov;
    int nalloc;
    size_t size;
    struct iovec local[IOV_LOCAL]; /* small lists live here, no malloc */
} IOVector;

void iov_init(IOVector *v);
/* A one-element vector over @buf; iov_destroy() is optional. */
void iov_init_buf(IOVector *v, void *buf, size_t len);
void iov_add(IOVector *v, void *base, size_t len);
/* Append the bytes [@off, @off + @len) of @src to @dst. */
void iov_concat(IOVector *dst, const IOVector *src, size_t off, size_t len);
void iov_reset(IOVector *v);
void iov_destroy(IOVector *v);

/* Copy between a vector and a flat buffer; return bytes copied. */
size_t iov_to_buf(const IOVector *v, size_t off, void *buf, size_t len);
size_t iov_from_buf(IOVector *v, size_t off, const void *buf, size_t len);
size_t iov_memset(IOVector *v, size_t off, int c, size_t len);
/* Copy @len bytes from @src at @src_off to @dst at @dst_off. */
size_t iov_copy(IOVector *dst, size_t dst_off, const IOVector *src,
                size_t src_off, size_t len);

bool iov_is_zero(const IOVector *v, size_t off, size_t len);
/* Are base and length of every element of the range multiples of @align? */
bool iov_is_aligned(const IOVector *v, size_t off, size_t len, size_t align);

bool buffer_is_zero(const void *buf, size_t len);

#endif /* BLOCKCORE_IOV_H */
