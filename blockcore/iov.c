/*
 * Scatter/gather arithmetic.  Most vectors in the request path have one
 * element (a FUSE buffer) or a few (a padded request), so the first
 * IOV_LOCAL elements are stored inside the IOVector itself.
 */
#include "iov.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <glib.h>

void iov_init(IOVector *v)
{
    v->iov = v->local;
    v->niov = 0;
    v->nalloc = IOV_LOCAL;
    v->size = 0;
}

void iov_init_buf(IOVector *v, void *buf, size_t len)
{
    iov_init(v);
    iov_add(v, buf, len);
}

void iov_add(IOVector *v, void *base, size_t len)
{
    if (len == 0) {
        return;
    }
    /* Merge with the previous element when contiguous. */
    if (v->niov > 0 &&
        (char *)v->iov[v->niov - 1].iov_base + v->iov[v->niov - 1].iov_len ==
            (char *)base) {
        v->iov[v->niov - 1].iov_len += len;
        v->size += len;
        return;
    }
    if (v->niov == v->nalloc) {
        int n = v->nalloc * 2;

        if (v->iov == v->local) {
            v->iov = g_new(struct iovec, n);
            memcpy(v->iov, v->local, sizeof(v->local));
        } else {
            v->iov = g_renew(struct iovec, v->iov, n);
        }
        v->nalloc = n;
    }
    v->iov[v->niov].iov_base = base;
    v->iov[v->niov].iov_len = len;
    v->niov++;
    v->size += len;
}

void iov_concat(IOVector *dst, const IOVector *src, size_t off, size_t len)
{
    int i;

    for (i = 0; i < src->niov && len > 0; i++) {
        size_t elen = src->iov[i].iov_len;
        size_t n;

        if (off >= elen) {
            off -= elen;
            continue;
        }
        n = elen - off < len ? elen - off : len;
        iov_add(dst, (char *)src->iov[i].iov_base + off, n);
        len -= n;
        off = 0;
    }
}

void iov_reset(IOVector *v)
{
    v->niov = 0;
    v->size = 0;
}

void iov_destroy(IOVector *v)
{
    if (v->iov != v->local) {
        g_free(v->iov);
    }
    iov_init(v);
}

/* Walk the range [@off, @off + @len) calling @fn on each piece. */
#define IOV_FOR_RANGE(v, off, len, base, n, body)                              \
    do {                                                                       \
        size_t off_ = (off), len_ = (len);                                     \
        int i_;                                                                \
        for (i_ = 0; i_ < (v)->niov && len_ > 0; i_++) {                       \
            size_t elen_ = (v)->iov[i_].iov_len;                               \
            if (off_ >= elen_) {                                               \
                off_ -= elen_;                                                 \
                continue;                                                      \
            }                                                                  \
            n = elen_ - off_ < len_ ? elen_ - off_ : len_;                     \
            base = (char *)(v)->iov[i_].iov_base + off_;                       \
            body;                                                              \
            len_ -= n;                                                         \
            off_ = 0;                                                          \
        }                                                                      \
    } while (0)

size_t iov_to_buf(const IOVector *v, size_t off, void *buf, size_t len)
{
    size_t done = 0, n;
    char *base;

    IOV_FOR_RANGE(v, off, len, base, n, {
        memcpy((char *)buf + done, base, n);
        done += n;
    });
    return done;
}

size_t iov_from_buf(IOVector *v, size_t off, const void *buf, size_t len)
{
    size_t done = 0, n;
    char *base;

    IOV_FOR_RANGE(v, off, len, base, n, {
        memcpy(base, (const char *)buf + done, n);
        done += n;
    });
    return done;
}

size_t iov_memset(IOVector *v, size_t off, int c, size_t len)
{
    size_t done = 0, n;
    char *base;

    IOV_FOR_RANGE(v, off, len, base, n, {
        memset(base, c, n);
        done += n;
    });
    return done;
}

size_t iov_copy(IOVector *dst, size_t dst_off, const IOVector *src,
                size_t src_off, size_t len)
{
    size_t done = 0, n;
    char *base;

    IOV_FOR_RANGE(src, src_off, len, base, n, {
        iov_from_buf(dst, dst_off + done, base, n);
        done += n;
    });
    return done;
}

bool iov_is_zero(const IOVector *v, size_t off, size_t len)
{
    size_t n;
    char *base;

    IOV_FOR_RANGE(v, off, len, base, n, {
        if (!buffer_is_zero(base, n)) {
            return false;
        }
    });
    return true;
}

bool iov_is_aligned(const IOVector *v, size_t off, size_t len, size_t align)
{
    size_t n;
    char *base;

    if (align <= 1) {
        return true;
    }
    IOV_FOR_RANGE(v, off, len, base, n, {
        if ((uintptr_t)base % align || n % align) {
            return false;
        }
    });
    return true;
}

bool buffer_is_zero(const void *buf, size_t len)
{
    const unsigned char *p = buf;
    size_t i;

    /* Check a short head byte by byte, then compare the buffer with
     * itself shifted by 16 bytes: all zero iff the first 16 are zero and
     * every byte equals the one 16 before it. */
    if (len <= 64) {
        for (i = 0; i < len; i++) {
            if (p[i]) {
                return false;
            }
        }
        return true;
    }
    for (i = 0; i < 16; i++) {
        if (p[i]) {
            return false;
        }
    }
    return memcmp(p, p + 16, len - 16) == 0;
}
