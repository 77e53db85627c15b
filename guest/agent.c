/*
 * memlab-agent: the program memlab runs inside its guests (docs/guest-agent-protocol.md).
 *
 * /init starts it on the virtio-serial port named org.memlab.agent; the host sends framed
 * requests (fill memory with a pattern, dirty it at a rate, pointer-chase it, free it, read
 * /proc/meminfo, checksum it) and gets one reply frame for each. Static, libc only, so it
 * runs in an initramfs that holds nothing but busybox. Every length and value from the host
 * is checked before use: a bad request gets an ERROR frame, never a crash.
 *
 * Built by memlab itself (Sources/Guests/AgentBinary.swift): cc -static -O2 -pthread.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#define PROTOCOL_VERSION 1
#define MAX_PAYLOAD (64 * 1024) /* both directions; MEMINFO is ~1.5 KiB */
#define MAX_REGIONS 8

enum {
    T_HELLO = 0x01, T_FILL = 0x02, T_DIRTY_START = 0x03, T_DIRTY_STOP = 0x04, T_CHASE = 0x05,
    T_FREE = 0x06, T_MEMINFO = 0x07, T_CHECKSUM = 0x08, T_ERROR = 0x7f, T_REPLY = 0x80,
};
enum { FILL_HUGEPAGE = 1, FILL_NOHUGEPAGE = 2 };

static int port = -1;
static long page_size;
static uint64_t mem_total;

struct region { uint8_t *base; uint64_t bytes; };
static struct region regions[MAX_REGIONS];

/* The one dirtier: a thread writing one word in a random page of the hot set, paced. */
static struct {
    pthread_t thread;
    int running;
    int stop; /* __atomic: the host thread sets it, the dirtier reads it */
    uint32_t region;
    uint64_t hot_pages, rate, seed;
    uint64_t pages, ns;
} dirtier;

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static void sleep_ns(uint64_t ns) {
    struct timespec t = { (time_t)(ns / 1000000000ull), (long)(ns % 1000000000ull) };
    while (nanosleep(&t, &t) < 0 && errno == EINTR) {}
}

static uint64_t splitmix64(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void put32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static void put64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static uint32_t get32(const uint8_t *p) { uint32_t v = 0; for (int i = 3; i >= 0; i--) v = (v << 8) | p[i]; return v; }
static uint64_t get64(const uint8_t *p) { uint64_t v = 0; for (int i = 7; i >= 0; i--) v = (v << 8) | p[i]; return v; }

/* Writes all of buf, or gives up on an error. (A host that has gone makes the write wait for
 * the next one to connect; memlab then starts a new conversation only on a new guest.) */
static void write_all(const uint8_t *buf, size_t n) {
    while (n > 0) {
        ssize_t w = write(port, buf, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return;
        buf += w;
        n -= (size_t)w;
    }
}

/* One frame: "ML", type, flags 0, u32 length, payload (the Transfer layer's frame). */
static void send_frame(uint8_t type, const uint8_t *payload, uint32_t length) {
    uint8_t h[8] = { 'M', 'L', type, 0 };
    put32(h + 4, length);
    write_all(h, sizeof h);
    if (length) write_all(payload, length);
}

static void send_error(const char *fmt, ...) {
    char text[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    if (n < 0) n = 0;
    if (n >= (int)sizeof text) n = sizeof text - 1;
    send_frame(T_ERROR, (const uint8_t *)text, (uint32_t)n);
}

static uint64_t checksum(const uint8_t *p, uint64_t bytes) {
    /* FNV-1a over 64-bit words: the host compares it with what it computes. */
    uint64_t h = 0xcbf29ce484222325ull;
    const uint64_t *w = (const uint64_t *)p;
    for (uint64_t i = 0; i < bytes / 8; i++) { h ^= w[i]; h *= 0x100000001b3ull; }
    return h;
}

static struct region *region_arg(const uint8_t *payload, int must_exist) {
    uint32_t r = get32(payload);
    if (r >= MAX_REGIONS) { send_error("region %u out of range (0..%d)", r, MAX_REGIONS - 1); return NULL; }
    if (must_exist && !regions[r].base) { send_error("region %u is not filled", r); return NULL; }
    return &regions[r];
}

static void free_region(struct region *g) {
    if (g->base) munmap(g->base, g->bytes);
    g->base = NULL;
    g->bytes = 0;
}

static void do_hello(const uint8_t *p, uint32_t n) {
    if (n < 4) { send_error("HELLO of %u bytes (at least 4)", n); return; }
    uint32_t v = get32(p);
    if (v != PROTOCOL_VERSION) { send_error("protocol version %u: this agent speaks %d", v, PROTOCOL_VERSION); return; }
    uint8_t out[32 + 65] = { 0 };
    struct utsname u;
    struct timespec b;
    clock_gettime(CLOCK_BOOTTIME, &b);
    put32(out, PROTOCOL_VERSION);
    put32(out + 4, (uint32_t)page_size);
    put32(out + 8, (uint32_t)sysconf(_SC_NPROCESSORS_ONLN));
    put64(out + 16, mem_total);
    put64(out + 24, (uint64_t)b.tv_sec * 1000000000ull + (uint64_t)b.tv_nsec);
    size_t len = 32;
    if (uname(&u) == 0) {
        size_t r = strnlen(u.release, 64);
        memcpy(out + 32, u.release, r);
        len += r;
    }
    send_frame(T_HELLO | T_REPLY, out, (uint32_t)len);
}

/* FILL: region u32, entropy percent u32, bytes u64, seed u64, rate bytes/s u64 (0: as fast as
 * it goes), flags u32. Each page: the first entropy% of its bytes from splitmix64(seed, page),
 * the rest zero. The same seed in two guests makes the same pages (KSM merges them across
 * guests); a different seed, unique ones. A region of the same size is refilled in place. */
static void do_fill(const uint8_t *p, uint32_t n) {
    if (n < 36) { send_error("FILL of %u bytes (36)", n); return; }
    struct region *g = region_arg(p, 0);
    if (!g) return;
    uint32_t entropy = get32(p + 4), flags = get32(p + 32);
    uint64_t bytes = get64(p + 8), seed = get64(p + 16), rate = get64(p + 24);
    if (entropy > 100) { send_error("entropy %u%% (0..100)", entropy); return; }
    if (bytes == 0 || bytes % (uint64_t)page_size || bytes > mem_total) {
        send_error("fill of %llu bytes: a positive multiple of %ld, at most MemTotal %llu", (unsigned long long)bytes, page_size, (unsigned long long)mem_total);
        return;
    }
    if (rate && bytes / rate > 3600) { send_error("fill of %llu bytes at %llu bytes/s would take over an hour", (unsigned long long)bytes, (unsigned long long)rate); return; }
    if (dirtier.running && (uint32_t)(g - regions) == dirtier.region) { send_error("region is being dirtied"); return; }
    /* A region of the same size is rewritten in place: the same guest pages take the new
     * contents (KSM across guests measures a refill of pages it has already seen). */
    if (g->bytes != bytes) {
        free_region(g);
        void *m = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) { send_error("mmap %llu bytes: %s", (unsigned long long)bytes, strerror(errno)); return; }
        if (flags & FILL_HUGEPAGE) madvise(m, bytes, MADV_HUGEPAGE);
        if (flags & FILL_NOHUGEPAGE) madvise(m, bytes, MADV_NOHUGEPAGE);
        g->base = m;
        g->bytes = bytes;
    }
    uint64_t pages = bytes / (uint64_t)page_size, random_words = (uint64_t)page_size / 8 * entropy / 100;
    uint64_t start = now_ns();
    for (uint64_t i = 0; i < pages; i++) {
        uint64_t *w = (uint64_t *)(g->base + i * (uint64_t)page_size);
        uint64_t s = seed ^ (i * 0xd1b54a32d192ed03ull);
        for (uint64_t k = 0; k < random_words; k++) w[k] = splitmix64(&s);
        memset(w + random_words, 0, (size_t)page_size - random_words * 8);
        if (rate && (i & 63) == 63) {
            /* Paced: sleep until the schedule says the next page is due. */
            uint64_t due = start + (uint64_t)((double)(i + 1) * (double)page_size / (double)rate * 1e9);
            uint64_t t = now_ns();
            if (due > t) sleep_ns(due - t);
        }
    }
    uint64_t ns = now_ns() - start;
    uint8_t out[24];
    put64(out, pages);
    put64(out + 8, ns);
    put64(out + 16, checksum(g->base, g->bytes));
    send_frame(T_FILL | T_REPLY, out, sizeof out);
}

static void *dirty_loop(void *arg) {
    (void)arg;
    struct region *g = &regions[dirtier.region];
    uint64_t s = dirtier.seed, done = 0, start = now_ns(), t = start;
    while (!__atomic_load_n(&dirtier.stop, __ATOMIC_RELAXED)) {
        /* Pages due by now; written, then sleep a millisecond (the rate is kept on average). */
        uint64_t due = (uint64_t)((double)(t - start) * 1e-9 * (double)dirtier.rate);
        while (done < due && !__atomic_load_n(&dirtier.stop, __ATOMIC_RELAXED)) {
            uint64_t page = splitmix64(&s) % dirtier.hot_pages;
            uint64_t *w = (uint64_t *)(g->base + page * (uint64_t)page_size);
            w[(done % ((uint64_t)page_size / 8 - 1)) + 1] = done + 1;
            done++;
        }
        /* Paced by spinning, as QEMU's own migration stress program does: the vCPU stays busy,
         * so a migrated guest is a busy guest (with 1 ms sleeps instead, every destination
         * guest oopsed in our TCG migrations; docs/labs/virtual-machines.md). */
        uint64_t next = t + 1000000;
        do { t = now_ns(); } while (t < next && !__atomic_load_n(&dirtier.stop, __ATOMIC_RELAXED));
    }
    dirtier.pages = done;
    dirtier.ns = now_ns() - start;
    return NULL;
}

/* DIRTY_START: region u32, hot fraction in parts per million u32, pages/s u64, seed u64. */
static void do_dirty_start(const uint8_t *p, uint32_t n) {
    if (n < 24) { send_error("DIRTY_START of %u bytes (24)", n); return; }
    struct region *g = region_arg(p, 1);
    if (!g) return;
    uint32_t ppm = get32(p + 4);
    uint64_t rate = get64(p + 8);
    if (dirtier.running) { send_error("a dirtier is running already"); return; }
    if (ppm == 0 || ppm > 1000000) { send_error("hot fraction %u ppm (1..1000000)", ppm); return; }
    if (rate == 0 || rate > 100000000ull) { send_error("dirty rate %llu pages/s (1..100000000)", (unsigned long long)rate); return; }
    uint64_t pages = g->bytes / (uint64_t)page_size;
    dirtier.region = (uint32_t)(g - regions);
    dirtier.hot_pages = pages * ppm / 1000000 ? pages * ppm / 1000000 : 1;
    dirtier.rate = rate;
    dirtier.seed = get64(p + 16);
    dirtier.stop = 0;
    int e = pthread_create(&dirtier.thread, NULL, dirty_loop, NULL);
    if (e) { send_error("pthread_create: %s", strerror(e)); return; }
    dirtier.running = 1;
    send_frame(T_DIRTY_START | T_REPLY, NULL, 0);
}

/* DIRTY_STOP: → pages dirtied u64, ns u64, hot pages u64. */
static void do_dirty_stop(void) {
    if (!dirtier.running) { send_error("no dirtier is running"); return; }
    __atomic_store_n(&dirtier.stop, 1, __ATOMIC_RELAXED);
    pthread_join(dirtier.thread, NULL);
    dirtier.running = 0;
    uint8_t out[24];
    put64(out, dirtier.pages);
    put64(out + 8, dirtier.ns);
    put64(out + 16, dirtier.hot_pages);
    send_frame(T_DIRTY_STOP | T_REPLY, out, sizeof out);
}

/* CHASE: region u32, 0 u32, working set bytes u64, accesses u64, seed u64 → ns u64, accesses
 * u64, sink u64. One pointer per page in a random cycle (Sattolo), so each access is a TLB
 * miss once the set outgrows the TLB: with a guest, the two-dimensional page walk. */
static void do_chase(const uint8_t *p, uint32_t n) {
    if (n < 32) { send_error("CHASE of %u bytes (32)", n); return; }
    struct region *g = region_arg(p, 1);
    if (!g) return;
    uint64_t set = get64(p + 8), accesses = get64(p + 16), s = get64(p + 24);
    if (dirtier.running && (uint32_t)(g - regions) == dirtier.region) { send_error("region is being dirtied"); return; }
    if (set < 2 * (uint64_t)page_size || set > g->bytes) {
        send_error("working set %llu bytes: 2 pages up to the region's %llu", (unsigned long long)set, (unsigned long long)g->bytes);
        return;
    }
    if (accesses == 0 || accesses > 10000000000ull) { send_error("accesses %llu (1..1e10)", (unsigned long long)accesses); return; }
    uint64_t pages = set / (uint64_t)page_size;
    uint64_t *order = malloc(pages * sizeof *order);
    if (!order) { send_error("malloc for %llu pages", (unsigned long long)pages); return; }
    for (uint64_t i = 0; i < pages; i++) order[i] = i;
    for (uint64_t i = pages - 1; i > 0; i--) {
        uint64_t j = splitmix64(&s) % i;
        uint64_t t = order[i]; order[i] = order[j]; order[j] = t;
    }
    /* Each page's pointer sits at a random cache line of it, as memlab's host chase does:
     * all at offset 0 would pile into the same cache sets. */
    uint64_t *slot = malloc(pages * sizeof *slot);
    if (!slot) { free(order); send_error("malloc for %llu pages", (unsigned long long)pages); return; }
    for (uint64_t i = 0; i < pages; i++) slot[i] = i * (uint64_t)page_size + splitmix64(&s) % ((uint64_t)page_size / 64) * 64;
    for (uint64_t i = 0; i < pages; i++)
        *(uint8_t **)(g->base + slot[order[i]]) = g->base + slot[order[(i + 1) % pages]];
    uint8_t *q = g->base + slot[order[0]];
    free(order);
    free(slot);
    for (uint64_t i = 0; i < pages; i++) q = *(uint8_t **)q; /* warm: every page resident */
    uint64_t start = now_ns();
    for (uint64_t i = 0; i < accesses; i++) q = *(uint8_t **)q;
    uint64_t ns = now_ns() - start;
    uint8_t out[24];
    put64(out, ns);
    put64(out + 8, accesses);
    put64(out + 16, (uint64_t)(uintptr_t)q);
    send_frame(T_CHASE | T_REPLY, out, sizeof out);
}

static void do_free(const uint8_t *p, uint32_t n) {
    if (n < 4) { send_error("FREE of %u bytes (4)", n); return; }
    struct region *g = region_arg(p, 1);
    if (!g) return;
    if (dirtier.running && (uint32_t)(g - regions) == dirtier.region) { send_error("region is being dirtied"); return; }
    free_region(g);
    send_frame(T_FREE | T_REPLY, NULL, 0);
}

static void do_meminfo(void) {
    static uint8_t text[MAX_PAYLOAD];
    int fd = open("/proc/meminfo", O_RDONLY);
    if (fd < 0) { send_error("open /proc/meminfo: %s", strerror(errno)); return; }
    ssize_t total = 0, r;
    while (total < (ssize_t)sizeof text && (r = read(fd, text + total, sizeof text - (size_t)total)) > 0) total += r;
    close(fd);
    send_frame(T_MEMINFO | T_REPLY, text, (uint32_t)total);
}

static void do_checksum(const uint8_t *p, uint32_t n) {
    if (n < 4) { send_error("CHECKSUM of %u bytes (4)", n); return; }
    struct region *g = region_arg(p, 1);
    if (!g) return;
    uint64_t start = now_ns(), h = checksum(g->base, g->bytes);
    uint8_t out[24];
    put64(out, h);
    put64(out + 8, g->bytes / (uint64_t)page_size);
    put64(out + 16, now_ns() - start);
    send_frame(T_CHECKSUM | T_REPLY, out, sizeof out);
}

static void handle(uint8_t type, const uint8_t *p, uint32_t n) {
    switch (type) {
    case T_HELLO: do_hello(p, n); break;
    case T_FILL: do_fill(p, n); break;
    case T_DIRTY_START: do_dirty_start(p, n); break;
    case T_DIRTY_STOP: do_dirty_stop(); break;
    case T_CHASE: do_chase(p, n); break;
    case T_FREE: do_free(p, n); break;
    case T_MEMINFO: do_meminfo(); break;
    case T_CHECKSUM: do_checksum(p, n); break;
    default: send_error("unknown request type %u", type);
    }
}

/* Reads exactly n bytes; 0 when the host went away (the frame is dropped). */
static int read_all(uint8_t *buf, size_t n) {
    while (n > 0) {
        struct pollfd f = { port, POLLIN, 0 };
        if (poll(&f, 1, -1) < 0 && errno != EINTR) return 0;
        if (f.revents & POLLHUP && !(f.revents & POLLIN)) return 0;
        ssize_t r = read(port, buf, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return 0;
        buf += r;
        n -= (size_t)r;
    }
    return 1;
}

static uint64_t read_mem_total(void) {
    FILE *f = fopen("/proc/meminfo", "r");
    unsigned long long kib = 0;
    if (f) {
        if (fscanf(f, "MemTotal: %llu kB", &kib) != 1) kib = 0;
        fclose(f);
    }
    return (uint64_t)kib * 1024;
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: memlab-agent /dev/vportNpM\n"); return 2; }
    port = open(argv[1], O_RDWR);
    if (port < 0) { fprintf(stderr, "memlab-agent: open %s: %s\n", argv[1], strerror(errno)); return 1; }
    page_size = sysconf(_SC_PAGESIZE);
    mem_total = read_mem_total();
    static uint8_t payload[MAX_PAYLOAD];
    for (;;) {
        uint8_t h[8];
        if (!read_all(h, sizeof h)) { sleep_ns(20000000); continue; } /* host not connected yet */
        uint32_t n = get32(h + 4);
        if (h[0] != 'M' || h[1] != 'L' || h[3] != 0) {
            /* Not a frame: say so and drop what is buffered, so the stream starts clean. */
            send_error("bad frame header %02x %02x %02x %02x", h[0], h[1], h[2], h[3]);
            uint8_t junk[4096];
            struct pollfd f = { port, POLLIN, 0 };
            while (poll(&f, 1, 50) > 0 && (f.revents & POLLIN) && read(port, junk, sizeof junk) > 0) {}
            continue;
        }
        if (n > MAX_PAYLOAD) {
            send_error("payload of %u bytes (at most %d)", n, MAX_PAYLOAD);
            uint8_t junk[4096];
            while (n > 0) { uint32_t k = n < sizeof junk ? n : sizeof junk; if (!read_all(junk, k)) break; n -= k; }
            continue;
        }
        if (n && !read_all(payload, n)) continue;
        handle(h[2], payload, n);
    }
}
