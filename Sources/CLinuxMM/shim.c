#define _GNU_SOURCE
#include <sys/epoll.h>
#include "clinuxmm.h"
#include <sched.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <fcntl.h>
#include <errno.h>
#include <string.h>
#include <pthread.h>
#include <setjmp.h>
#include <sys/swap.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <time.h>

long memlab_syscall6(long number, long a1, long a2, long a3, long a4, long a5, long a6) {
    return syscall(number, a1, a2, a3, a4, a5, a6);
}

int memlab_userfaultfd(int flags) { return (int)syscall(SYS_userfaultfd, flags); }

int memlab_ioctl_ptr(int fd, unsigned long request, void *arg) { return ioctl(fd, request, arg); }

int memlab_uffd_read_faults(int fd, struct memlab_uffd_fault *out, int max) {
    struct uffd_msg msgs[64];
    if (max > 64) max = 64;
    if (max < 1) { errno = EINVAL; return -1; }
    ssize_t n = read(fd, msgs, sizeof(struct uffd_msg) * (size_t)max);
    if (n < 0) return -1;
    int count = (int)(n / (ssize_t)sizeof(struct uffd_msg));
    for (int i = 0; i < count; i++) {
        const struct uffd_msg *m = &msgs[i];
        struct memlab_uffd_fault *o = &out[i];
        memset(o, 0, sizeof(*o));
        o->event = m->event;
        switch (m->event) {
        case UFFD_EVENT_PAGEFAULT:
            o->flags = m->arg.pagefault.flags;
            o->address = m->arg.pagefault.address;
            o->ptid = m->arg.pagefault.feat.ptid;
            break;
        case UFFD_EVENT_REMOVE:
        case UFFD_EVENT_UNMAP:
            o->address = m->arg.remove.start;
            o->end = m->arg.remove.end;
            break;
        case UFFD_EVENT_REMAP:
            o->address = m->arg.remap.from;
            o->end = m->arg.remap.to;
            o->len = m->arg.remap.len;
            break;
        case UFFD_EVENT_FORK:
            o->ufd = (int32_t)m->arg.fork.ufd;
            break;
        }
    }
    return count;
}

int memlab_ppoll_in(int fd, int64_t timeout_ns) {
    struct pollfd p = { .fd = fd, .events = POLLIN, .revents = 0 };
    struct timespec ts, *tp = NULL;
    if (timeout_ns >= 0) {
        ts.tv_sec = timeout_ns / 1000000000;
        ts.tv_nsec = timeout_ns % 1000000000;
        tp = &ts;
    }
    int rc = ppoll(&p, 1, tp, NULL);
    if (rc > 0) return 1;
    return rc;
}

int memlab_epoll_in(int fd) {
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) return -1;
    struct epoll_event ev = { .events = EPOLLIN, .data = { .fd = fd } };
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) != 0) { int e = errno; close(ep); errno = e; return -1; }
    return ep;
}

int memlab_epoll_wait_in(int epfd, int64_t timeout_ns) {
    struct epoll_event ev;
    int rc;
#ifdef SYS_epoll_pwait2
    static int no_pwait2 = 0;
    if (!no_pwait2) {
        struct timespec ts, *tp = NULL;
        if (timeout_ns >= 0) { ts.tv_sec = timeout_ns / 1000000000; ts.tv_nsec = timeout_ns % 1000000000; tp = &ts; }
        rc = (int)syscall(SYS_epoll_pwait2, epfd, &ev, 1, tp, NULL, 0);
        if (rc >= 0) return rc > 0 ? 1 : 0;
        if (errno != ENOSYS) return -1;
        no_pwait2 = 1;
    }
#endif
    int ms = timeout_ns < 0 ? -1 : (int)((timeout_ns + 999999) / 1000000);
    rc = epoll_wait(epfd, &ev, 1, ms);
    if (rc < 0) return -1;
    return rc > 0 ? 1 : 0;
}

int memlab_set_timerslack(unsigned long ns) { return prctl(PR_SET_TIMERSLACK, ns, 0, 0, 0); }

uint64_t memlab_thread_cpu_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int memlab_eventfd(void) { return eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK); }

int memlab_gettid(void) { return (int)syscall(SYS_gettid); }

int memlab_prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5) {
    return prctl(option, a2, a3, a4, a5);
}

int memlab_memfd_create(const char *name, unsigned int flags) {
    return (int)syscall(SYS_memfd_create, name, flags);
}

int memlab_pipe2(int fds[2], int flags) { return pipe2(fds, flags); }

int memlab_set_thread_affinity(pid_t tid, const int *cpus, int count) {
    cpu_set_t set;
    CPU_ZERO(&set);
    for (int i = 0; i < count; i++) {
        if (cpus[i] < 0 || cpus[i] >= CPU_SETSIZE) { errno = EINVAL; return -1; }
        CPU_SET(cpus[i], &set);
    }
    return sched_setaffinity(tid, sizeof(set), &set);
}

int memlab_set_affinity(const int *cpus, int count) { return memlab_set_thread_affinity(0, cpus, count); }

int memlab_get_affinity(int *cpus, int capacity) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) != 0) return -1;
    int n = 0;
    for (int c = 0; c < CPU_SETSIZE && n < capacity; c++)
        if (CPU_ISSET(c, &set)) cpus[n++] = c;
    return n;
}

int memlab_spawnattr_clean(posix_spawnattr_t *attr) {
    sigset_t all, none;
    sigfillset(&all);
    sigemptyset(&none);
    int rc = posix_spawnattr_setsigdefault(attr, &all);
    if (rc == 0) rc = posix_spawnattr_setsigmask(attr, &none);
    if (rc == 0) rc = posix_spawnattr_setflags(attr, POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK);
    return rc;
}

int memlab_spawn_closefrom(posix_spawn_file_actions_t *actions, int low) {
    return posix_spawn_file_actions_addclosefrom_np(actions, low);
}

int memlab_wifexited(int status) { return WIFEXITED(status); }
int memlab_child_ended(pid_t pid, int block) {
    siginfo_t info;
    memset(&info, 0, sizeof info);
    if (waitid(P_PID, (id_t)pid, &info, WEXITED | WNOWAIT | (block ? 0 : WNOHANG)) != 0) return -1;
    return info.si_pid == pid ? 1 : 0;
}
int memlab_wexitstatus(int status) { return WEXITSTATUS(status); }
int memlab_wifsignaled(int status) { return WIFSIGNALED(status); }
int memlab_wtermsig(int status) { return WTERMSIG(status); }
int memlab_pidfd_open(pid_t pid) { return (int)syscall(SYS_pidfd_open, pid, 0); }

static int memlab_signal_pipe_fd = -1;

static void memlab_signal_to_pipe(int sig) {
    unsigned char b = (unsigned char)sig;
    int saved = errno;
    if (memlab_signal_pipe_fd >= 0) (void)!write(memlab_signal_pipe_fd, &b, 1);
    errno = saved;
}

int memlab_install_signal_pipe(int fd, const int *signals, int count) {
    memlab_signal_pipe_fd = fd;
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = memlab_signal_to_pipe;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigset_t unblock;
    sigemptyset(&unblock);
    for (int i = 0; i < count; i++) {
        if (sigaction(signals[i], &sa, NULL) != 0) return -1;
        sigaddset(&unblock, signals[i]);
    }
    // A parent may have started us with these blocked (test harnesses do): unblock them in
    // this thread, from which later threads inherit the mask.
    return pthread_sigmask(SIG_UNBLOCK, &unblock, NULL);
}

uint8_t memlab_read_byte(const volatile uint8_t *p) { return *p; }

void memlab_rewrite_u64(volatile uint64_t *p) { uint64_t v = *p; *p = v; }

void memlab_ref_touch(void *base, size_t len, size_t stride) {
    volatile unsigned char *p = base;
    for (size_t off = 0; off < len; off += stride) p[off] = 1;
}

uint64_t memlab_ref_chase(const uint64_t *base, uint64_t start, uint64_t steps) {
    uint64_t i = start;
    while (steps--) i = base[i];
    return i;
}

static sigjmp_buf memlab_sigbus_jump;

static void memlab_sigbus_handler(int sig) {
    (void)sig;
    siglongjmp(memlab_sigbus_jump, 1);
}

int memlab_touch_catching_sigbus(void *base, size_t len, size_t stride, size_t *faulted_offset) {
    struct sigaction sa, old;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = memlab_sigbus_handler;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &old) != 0) return -1;
    volatile size_t off = 0;
    int hit = 0;
    if (sigsetjmp(memlab_sigbus_jump, 1) == 0) {
        volatile unsigned char *p = base;
        for (; off < len; off += stride) p[off] = 1;
    } else {
        hit = 1;
        *faulted_offset = off;
    }
    sigaction(SIGBUS, &old, NULL);
    return hit;
}

int memlab_swapon(const char *path, int flags) { return swapon(path, flags); }

int memlab_swapoff(const char *path) { return swapoff(path); }

/// The reference fault handler for `memlab bench`: reads one uffd_msg at a time and resolves
/// a fault in [region, region+len) with one UFFDIO_COPY of that page from `src` (same offset).
/// mode 0: blocking read; 1: poll then read; 2: busy polling (uffd opened O_NONBLOCK). A fault
/// outside the region is the doorbell: UFFDIO_ZEROPAGE it and return the pages served
/// (negative errno on failure).
long memlab_ref_fault_handler(int uffd, const void *src, void *region, size_t len, int mode) {
    long served = 0;
    uintptr_t base = (uintptr_t)region;
    struct uffd_msg msg;
    int ep = -1;
    if (mode == 3) { ep = memlab_epoll_in(uffd); if (ep < 0) return -errno; }
    for (;;) {
        if (mode == 1) {
            struct pollfd p = { .fd = uffd, .events = POLLIN, .revents = 0 };
            if (poll(&p, 1, -1) < 0) { if (errno == EINTR) continue; return -errno; }
        } else if (mode == 3) {
            struct epoll_event ev;
            if (epoll_wait(ep, &ev, 1, -1) < 0) { if (errno == EINTR) continue; int e = errno; close(ep); return -e; }
        }
        ssize_t n = read(uffd, &msg, sizeof msg);
        if (n < 0) { if (errno == EAGAIN || errno == EINTR) continue; return -errno; }
        if (n != sizeof msg || msg.event != UFFD_EVENT_PAGEFAULT) continue;
        uintptr_t a = (uintptr_t)msg.arg.pagefault.address & ~(uintptr_t)4095;
        if (a >= base && a < base + len) {
            struct uffdio_copy c = { .dst = a, .src = (uintptr_t)src + (a - base), .len = 4096, .mode = 0, .copy = 0 };
            if (ioctl(uffd, UFFDIO_COPY, &c) < 0 && errno != EEXIST) { int e = errno; if (ep >= 0) close(ep); return -e; }
            served++;
        } else {
            struct uffdio_zeropage z = { .range = { .start = a, .len = 4096 }, .mode = 0, .zeropage = 0 };
            ioctl(uffd, UFFDIO_ZEROPAGE, &z);
            if (ep >= 0) close(ep);
            return served;
        }
    }
}

void *memlab_remap_away(void *old, size_t len) {
    void *dst = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (dst == MAP_FAILED) return NULL;
    void *moved = mremap(old, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, dst);
    if (moved == MAP_FAILED) { int e = errno; munmap(dst, len); errno = e; return NULL; }
    /* A placeholder where the region was; its owner's munmap will take it. */
    void *hole = mmap(old, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE, -1, 0);
    (void)hole;
    return moved;
}

int memlab_fork_compare_pages(const void *base, const void *expected, size_t pages, size_t stride) {
    if (stride == 0) stride = 1;
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        int bad = 0;
        for (size_t p = 0; p < pages; p += stride) {
            if (memcmp((const char *)base + p * 4096, (const char *)expected + p * 4096, 4096) != 0 && bad < 250) bad++;
        }
        _exit(bad);
    }
    int status = 0;
    while (waitpid(pid, &status, 0) < 0) { if (errno != EINTR) return -1; }
    if (WIFSIGNALED(status)) return -2;
    return WEXITSTATUS(status);
}

/* Starts `path` (argv NULL-terminated) as a child that dies with this process: between fork
   and exec it sets PR_SET_PDEATHSIG(SIGKILL), which posix_spawn cannot, resets signals, takes
   stdin from /dev/null and writes stdout+stderr to `out`, and closes every other descriptor.
   Only async-signal-safe calls run in the child. (prctl(2) says the signal follows the
   starting *thread*; on 6.18 a child survived its starting thread's exit and died with the
   process, which the tests check.) Returns the pid, or -1 with errno. */
pid_t memlab_spawn_dying_with_parent(const char *path, char *const argv[], const char *out) {
    pid_t parent = getpid();
    int fd = open(out, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return -1;
    int null = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (null < 0) { int e = errno; close(fd); errno = e; return -1; }
    pid_t pid = fork();
    if (pid == 0) {
        if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0 || getppid() != parent) _exit(127);
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        for (int s = 1; s < NSIG; s++) sigaction(s, &dfl, NULL);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        if (dup2(null, 0) < 0 || dup2(fd, 1) < 0 || dup2(fd, 2) < 0) _exit(127);
        /* A parent that shields itself from the OOM killer (-1000, a density run's child) must
         * not pass that on: the program started here is a candidate like any other. */
        int adj = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
        if (adj >= 0) { if (write(adj, "0", 1) < 0) {} close(adj); }
        syscall(SYS_close_range, 3, ~0U, 0);
        execv(path, argv);
        _exit(127);
    }
    int e = errno;
    close(fd);
    close(null);
    if (pid < 0) errno = e;
    return pid;
}

static long ref_uleb(uint8_t *dst, uint64_t v) {
    long n = 0;
    do {
        uint8_t b = v & 0x7f;
        v >>= 7;
        dst[n++] = b | (v ? 0x80 : 0);
    } while (v);
    return n;
}

long memlab_ref_xbzrle_encode(const uint8_t *old_buf, const uint8_t *new_buf, long slen, uint8_t *dst, long dlen) {
    long i = 0, d = 0;
    while (i < slen) {
        long start = i;
        /* unchanged run: bytes up to word alignment of the rest, then words, then bytes */
        while (i < slen && ((slen - i) & 7) && old_buf[i] == new_buf[i]) i++;
        if (((slen - i) & 7) == 0) {
            while (i < slen) {
                uint64_t a, b;
                memcpy(&a, old_buf + i, 8); memcpy(&b, new_buf + i, 8);
                if (a != b) break;
                i += 8;
            }
            while (i < slen && old_buf[i] == new_buf[i]) i++;
        }
        if (i - start == slen) return 0;
        if (i == slen) return d;
        if (d + 8 > dlen) return -1;
        d += ref_uleb(dst + d, (uint64_t)(i - start));
        /* changed run: until the first unchanged byte */
        long nz = i;
        while (i < slen && ((slen - i) & 7) && old_buf[i] != new_buf[i]) i++;
        if (((slen - i) & 7) == 0) {
            const uint64_t lo = 0x0101010101010101ULL, hi = 0x8080808080808080ULL;
            while (i < slen) {
                uint64_t a, b, x;
                memcpy(&a, old_buf + i, 8); memcpy(&b, new_buf + i, 8);
                x = a ^ b;
                if ((x - lo) & ~x & hi) { while (old_buf[i] != new_buf[i]) i++; break; }
                i += 8;
            }
        }
        long len = i - nz;
        if (d + 8 + len > dlen) return -1;
        d += ref_uleb(dst + d, (uint64_t)len);
        memcpy(dst + d, new_buf + nz, (size_t)len);
        d += len;
    }
    return d;
}

#include <sys/socket.h>

ssize_t memlab_send_fds(int sock, const int *fds, int nfds, const void *data, size_t len) {
    if (nfds < 1 || nfds > 8 || len == 0) { errno = EINVAL; return -1; }
    union { struct cmsghdr h; char buf[CMSG_SPACE(8 * sizeof(int))]; } u;
    memset(&u, 0, sizeof u);
    struct iovec iov = { .iov_base = (void *)data, .iov_len = len };
    struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = CMSG_SPACE(nfds * sizeof(int)) };
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(nfds * sizeof(int));
    memcpy(CMSG_DATA(c), fds, nfds * sizeof(int));
    ssize_t r;
    do { r = sendmsg(sock, &m, MSG_NOSIGNAL); } while (r < 0 && errno == EINTR);
    return r;
}

ssize_t memlab_recv_fds(int sock, int *fds, int maxfds, int *nfds, void *data, size_t len) {
    *nfds = 0;
    if (maxfds < 1 || maxfds > 8 || len == 0) { errno = EINVAL; return -1; }
    union { struct cmsghdr h; char buf[CMSG_SPACE(8 * sizeof(int))]; } u;
    memset(&u, 0, sizeof u);
    struct iovec iov = { .iov_base = data, .iov_len = len };
    struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = sizeof u.buf };
    ssize_t r;
    do { r = recvmsg(sock, &m, MSG_CMSG_CLOEXEC | MSG_WAITALL); } while (r < 0 && errno == EINTR);
    if (r < 0) return -1;
    int got = 0, excess = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS || c->cmsg_len < CMSG_LEN(0)) continue;
        size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < n; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
            if (got < maxfds) fds[got++] = fd; else { close(fd); excess = 1; }
        }
    }
    if (excess || (m.msg_flags & MSG_CTRUNC)) {
        for (int i = 0; i < got; i++) close(fds[i]);
        errno = EMSGSIZE;
        return -1;
    }
    *nfds = got;
    return r;
}

pid_t memlab_peer_pid(int sock) {
    struct ucred cr;
    socklen_t l = sizeof cr;
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cr, &l) != 0) return -1;
    return cr.pid;
}

int memlab_unshare_net(void) { return unshare(CLONE_NEWNET); }
