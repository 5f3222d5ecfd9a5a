/*
 * The static table of drivers built into imgfs, and format probing.
 * Adding a driver means adding one line here (and its source file to
 * meson.build): no constructors, no registration at run time.
 */
#include <string.h>

#include "driver.h"

extern const BlockDriver bdrv_file;
extern const BlockDriver bdrv_raw;
extern const BlockDriver bdrv_qcow2;
extern const BlockDriver bdrv_vmdk;
#ifdef CONFIG_RBD
extern const BlockDriver bdrv_rbd;
#endif

/* One driver per line; clang-format would pack them around the #ifdef. */
/* clang-format off */
static const BlockDriver *const bdrv_drivers[] = {
    &bdrv_raw,
    &bdrv_qcow2,
    &bdrv_vmdk,
    &bdrv_file,
#ifdef CONFIG_RBD
    &bdrv_rbd,
#endif
    NULL,
};
/* clang-format on */

const BlockDriver *const *bdrv_driver_list(void)
{
    return bdrv_drivers;
}

const BlockDriver *bdrv_find_driver(const char *name)
{
    int i;

    for (i = 0; bdrv_drivers[i]; i++) {
        if (!strcmp(bdrv_drivers[i]->name, name)) {
            return bdrv_drivers[i];
        }
    }
    return NULL;
}

const BlockDriver *bdrv_find_protocol_for(const char *filename)
{
    const char *colon = filename ? strchr(filename, ':') : NULL;
    int i;

    if (colon && filename[0] != '/' &&
        !memchr(filename, '/', colon - filename)) {
        for (i = 0; bdrv_drivers[i]; i++) {
            const char *p = bdrv_drivers[i]->protocol_prefix;

            if (p && strlen(p) == (size_t)(colon - filename) &&
                !strncmp(p, filename, colon - filename)) {
                return bdrv_drivers[i];
            }
        }
    }
    return bdrv_find_driver("file");
}

const BlockDriver *bdrv_probe_format(const uint8_t *buf, size_t len,
                                     const char *filename, int *score)
{
    const BlockDriver *best = NULL;
    int best_score = 0;
    int i;

    for (i = 0; bdrv_drivers[i]; i++) {
        int s;

        if (!bdrv_drivers[i]->is_format || !bdrv_drivers[i]->probe) {
            continue;
        }
        s = bdrv_drivers[i]->probe(buf, len, filename);
        if (s > best_score) {
            best_score = s;
            best = bdrv_drivers[i];
        }
    }
    if (score) {
        *score = best_score;
    }
    return best;
}
