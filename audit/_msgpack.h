/* msgpack writers for the compiled steps that make records (agent/protocols/_pgscan.c,
 * audit/_link.c), with the big-endian numbers they are made of, in the forms msgpack's Packer picks (the smallest that holds the
 * value), so that what they write is byte for byte what Packer would make of the same
 * values. Each returns the position after what it wrote; the caller makes room first
 * (HEAD_MAX bytes for a header or an unsigned int, plus the text). */
#ifndef RINGFENCE_MSGPACK_H
#define RINGFENCE_MSGPACK_H

#include <stdint.h>
#include <string.h>

/* The most a str or bin header, or an unsigned int, takes. */
#define HEAD_MAX 9

static inline unsigned char *
put_be(unsigned char *q, uint64_t v, int width)
{
    for (int i = width - 1; i >= 0; i--) {
        q[i] = (unsigned char)(v & 0xff);
        v >>= 8;
    }
    return q + width;
}

/* The unsigned big-endian number of ``width`` bytes at q (the reverse of put_be). */
static inline uint64_t
get_be(const unsigned char *q, int width)
{
    uint64_t v = 0;
    for (int i = 0; i < width; i++)
        v = (v << 8) | q[i];
    return v;
}

static inline unsigned char *
put_uint(unsigned char *q, uint64_t v)
{
    if (v < 0x80) {
        *q++ = (unsigned char)v;
        return q;
    }
    if (v <= 0xff) {
        *q++ = 0xCC;
        return put_be(q, v, 1);
    }
    if (v <= 0xffff) {
        *q++ = 0xCD;
        return put_be(q, v, 2);
    }
    if (v <= 0xffffffffu) {
        *q++ = 0xCE;
        return put_be(q, v, 4);
    }
    *q++ = 0xCF;
    return put_be(q, v, 8);
}

/* A str (UTF-8 text) or, with bin set, a bin of n bytes. */
static inline unsigned char *
put_raw(unsigned char *q, const void *bytes, size_t n, int bin)
{
    if (!bin && n < 32) {
        *q++ = (unsigned char)(0xA0 | n);
    } else if (n <= 0xff) {
        *q++ = bin ? 0xC4 : 0xD9;
        q = put_be(q, n, 1);
    } else if (n <= 0xffff) {
        *q++ = bin ? 0xC5 : 0xDA;
        q = put_be(q, n, 2);
    } else {
        *q++ = bin ? 0xC6 : 0xDB;
        q = put_be(q, n, 4);
    }
    memcpy(q, bytes, n);
    return q + n;
}

#define put_str(q, text, n) put_raw((q), (text), (n), 0)
#define PUT_KEY(q, key) put_str((q), (key), sizeof(key) - 1)

#endif
