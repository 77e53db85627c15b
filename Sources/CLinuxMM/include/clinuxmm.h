// Thin, non-variadic wrappers around calls Swift cannot make directly (syscall, ioctl and
// prctl are variadic in C) and UAPI constants that the installed headers may predate.
// Each wrapper is named after the call it wraps and holds no logic (style of swift-nio's
// CNIOLinux). Constants missing from /usr/include/linux are defined from the kernel's UAPI
// values, guarded by #ifndef so newer headers win.
#ifndef MEMLAB_CLINUXMM_H
#define MEMLAB_CLINUXMM_H

#include <stdint.h>
#include <stddef.h>
#include <sys/types.h>
#include <sys/mman.h>
#include <sys/ioctl.h>   // before linux/userfaultfd.h, which uses _IOWR
#include <linux/userfaultfd.h>
#include <linux/fs.h>
#include <sys/prctl.h>
#include <signal.h>
#include <spawn.h>

// ---- mmap / madvise (include/uapi/asm-generic/mman-common.h, mman.h) ----
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
#ifndef MAP_HUGE_SHIFT
#define MAP_HUGE_SHIFT 26
#endif
#ifndef MFD_HUGETLB
#define MFD_HUGETLB 0x0004U
#endif

static const int memlab_MADV_MERGEABLE = MADV_MERGEABLE;
static const int memlab_MADV_UNMERGEABLE = MADV_UNMERGEABLE;
static const int memlab_MADV_HUGEPAGE = MADV_HUGEPAGE;
static const int memlab_MADV_NOHUGEPAGE = MADV_NOHUGEPAGE;
static const int memlab_MADV_DONTNEED = MADV_DONTNEED;
static const int memlab_MADV_PAGEOUT = 21;
static const int memlab_MADV_POPULATE_READ = MADV_POPULATE_READ;
static const int memlab_MADV_POPULATE_WRITE = MADV_POPULATE_WRITE;
static const int memlab_MADV_COLLAPSE = MADV_COLLAPSE;
static const int memlab_MAP_HUGETLB = MAP_HUGETLB;
static const int memlab_MAP_NORESERVE = MAP_NORESERVE;
static const int memlab_MAP_POPULATE = MAP_POPULATE;
static const int memlab_MAP_HUGE_2MB = (21 << MAP_HUGE_SHIFT);
static const int memlab_MAP_HUGE_1GB = (30 << MAP_HUGE_SHIFT);
static const int memlab_MAP_HUGE_SHIFT = MAP_HUGE_SHIFT;

// ---- prctl (include/uapi/linux/prctl.h) ----
#ifndef PR_SET_MEMORY_MERGE
#define PR_SET_MEMORY_MERGE 67
#define PR_GET_MEMORY_MERGE 68
#endif
static const int memlab_PR_SET_MEMORY_MERGE = PR_SET_MEMORY_MERGE;
static const int memlab_PR_GET_MEMORY_MERGE = PR_GET_MEMORY_MERGE;
static const int memlab_PR_SET_PDEATHSIG = PR_SET_PDEATHSIG;
static const int memlab_PR_SET_CHILD_SUBREAPER = PR_SET_CHILD_SUBREAPER;

// ---- userfaultfd (include/uapi/linux/userfaultfd.h) ----
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1 << 14)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1 << 16)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef _UFFDIO_MOVE
#define _UFFDIO_MOVE (0x05)
struct uffdio_move {
    uint64_t dst;
    uint64_t src;
    uint64_t len;
    uint64_t mode;
    int64_t move;
};
#define UFFDIO_MOVE _IOWR(UFFDIO, _UFFDIO_MOVE, struct uffdio_move)
#endif

static const uint64_t memlab_UFFD_API = UFFD_API;
static const unsigned long memlab_UFFDIO_API = UFFDIO_API;
static const unsigned long memlab_UFFDIO_REGISTER = UFFDIO_REGISTER;
static const unsigned long memlab_UFFDIO_UNREGISTER = UFFDIO_UNREGISTER;
static const unsigned long memlab_UFFDIO_WAKE = UFFDIO_WAKE;
static const unsigned long memlab_UFFDIO_COPY = UFFDIO_COPY;
static const unsigned long memlab_UFFDIO_ZEROPAGE = UFFDIO_ZEROPAGE;
static const unsigned long memlab_UFFDIO_MOVE = UFFDIO_MOVE;
static const int memlab_UFFD_USER_MODE_ONLY = UFFD_USER_MODE_ONLY;
#ifndef _UFFDIO_CONTINUE
#define _UFFDIO_CONTINUE (0x07)
struct uffdio_continue {
    struct uffdio_range range;
    uint64_t mode;
    int64_t mapped;
};
#define UFFDIO_CONTINUE _IOWR(UFFDIO, _UFFDIO_CONTINUE, struct uffdio_continue)
#endif
#ifndef _UFFDIO_POISON
#define _UFFDIO_POISON (0x08)
struct uffdio_poison {
    struct uffdio_range range;
    uint64_t mode;
    int64_t updated;
};
#define UFFDIO_POISON _IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)
#endif
#ifndef UFFDIO_REGISTER_MODE_MINOR
#define UFFDIO_REGISTER_MODE_MINOR ((uint64_t)1 << 2)
#endif
static const unsigned long memlab_UFFDIO_CONTINUE = UFFDIO_CONTINUE;
static const unsigned long memlab_UFFDIO_POISON = UFFDIO_POISON;
static const uint64_t memlab_UFFDIO_REGISTER_MODE_MISSING = UFFDIO_REGISTER_MODE_MISSING;
static const uint64_t memlab_UFFDIO_REGISTER_MODE_WP = UFFDIO_REGISTER_MODE_WP;
static const uint64_t memlab_UFFDIO_REGISTER_MODE_MINOR = UFFDIO_REGISTER_MODE_MINOR;
static const uint64_t memlab_UFFDIO_COPY_MODE_DONTWAKE = UFFDIO_COPY_MODE_DONTWAKE;
static const uint64_t memlab_UFFDIO_ZEROPAGE_MODE_DONTWAKE = UFFDIO_ZEROPAGE_MODE_DONTWAKE;
static const uint64_t memlab_UFFDIO_CONTINUE_MODE_DONTWAKE = ((uint64_t)1 << 0);
static const uint64_t memlab_UFFDIO_MOVE_MODE_DONTWAKE = ((uint64_t)1 << 0);
static const uint64_t memlab_UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES = ((uint64_t)1 << 1);
static const uint8_t memlab_UFFD_EVENT_PAGEFAULT = UFFD_EVENT_PAGEFAULT;
static const uint8_t memlab_UFFD_EVENT_FORK = UFFD_EVENT_FORK;
static const uint8_t memlab_UFFD_EVENT_REMAP = UFFD_EVENT_REMAP;
static const uint8_t memlab_UFFD_EVENT_REMOVE = UFFD_EVENT_REMOVE;
static const uint8_t memlab_UFFD_EVENT_UNMAP = UFFD_EVENT_UNMAP;
static const uint64_t memlab_UFFD_PAGEFAULT_FLAG_WRITE = UFFD_PAGEFAULT_FLAG_WRITE;
static const uint64_t memlab_UFFD_PAGEFAULT_FLAG_WP = UFFD_PAGEFAULT_FLAG_WP;
static const uint64_t memlab_UFFD_PAGEFAULT_FLAG_MINOR = ((uint64_t)1 << 2);

/// One userfaultfd message, unpacked (struct uffd_msg is a __packed union): `event` is
/// UFFD_EVENT_*; for PAGEFAULT `flags`, `address` and `ptid` (with UFFD_FEATURE_THREAD_ID);
/// for REMOVE/UNMAP `address`..`end`; for REMAP `address` (from), `end` (to), `len`;
/// for FORK `ufd` (the child's new userfaultfd).
struct memlab_uffd_fault {
    uint32_t event;
    uint32_t ptid;
    uint64_t flags;
    uint64_t address;
    uint64_t end;
    uint64_t len;
    int32_t ufd;
    int32_t reserved;
};

// ---- PAGEMAP_SCAN (include/uapi/linux/fs.h, 6.7+) ----
#ifndef PAGEMAP_SCAN
struct page_region {
    uint64_t start;
    uint64_t end;
    uint64_t categories;
};
struct pm_scan_arg {
    uint64_t size;
    uint64_t flags;
    uint64_t start;
    uint64_t end;
    uint64_t walk_end;
    uint64_t vec;
    uint64_t vec_len;
    uint64_t max_pages;
    uint64_t category_inverted;
    uint64_t category_mask;
    uint64_t category_anyof_mask;
    uint64_t return_mask;
};
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#endif
static const unsigned long memlab_PAGEMAP_SCAN = PAGEMAP_SCAN;
#ifndef PM_SCAN_WP_MATCHING
#define PM_SCAN_WP_MATCHING (1 << 0)
#define PM_SCAN_CHECK_WPASYNC (1 << 1)
#define PAGE_IS_WPALLOWED (1 << 0)
#define PAGE_IS_WRITTEN (1 << 1)
#define PAGE_IS_FILE (1 << 2)
#define PAGE_IS_PRESENT (1 << 3)
#define PAGE_IS_SWAPPED (1 << 4)
#define PAGE_IS_PFNZERO (1 << 5)
#define PAGE_IS_HUGE (1 << 6)
#define PAGE_IS_SOFT_DIRTY (1 << 7)
#endif
static const uint64_t memlab_PM_SCAN_WP_MATCHING = PM_SCAN_WP_MATCHING;
static const uint64_t memlab_PM_SCAN_CHECK_WPASYNC = PM_SCAN_CHECK_WPASYNC;
static const uint64_t memlab_PAGE_IS_WPALLOWED = PAGE_IS_WPALLOWED;
static const uint64_t memlab_PAGE_IS_WRITTEN = PAGE_IS_WRITTEN;
static const uint64_t memlab_PAGE_IS_PRESENT = PAGE_IS_PRESENT;
static const uint64_t memlab_PAGE_IS_SOFT_DIRTY = PAGE_IS_SOFT_DIRTY;

// ---- userfaultfd write-protect (include/uapi/linux/userfaultfd.h; the register modes and
// event constants are above, with the rest of userfaultfd) ----
static const unsigned long memlab_UFFDIO_WRITEPROTECT = UFFDIO_WRITEPROTECT;
static const uint64_t memlab_UFFDIO_WRITEPROTECT_MODE_WP = UFFDIO_WRITEPROTECT_MODE_WP;
static const uint64_t memlab_UFFD_FEATURE_WP_ASYNC = UFFD_FEATURE_WP_ASYNC;
static const uint64_t memlab_UFFD_FEATURE_WP_UNPOPULATED = UFFD_FEATURE_WP_UNPOPULATED;
static const uint64_t memlab_UFFD_FEATURE_THREAD_ID = UFFD_FEATURE_THREAD_ID;

// ---- wrappers ----
long memlab_syscall6(long number, long a1, long a2, long a3, long a4, long a5, long a6);
int memlab_userfaultfd(int flags);
int memlab_ioctl_ptr(int fd, unsigned long request, void *arg);
/// read(2)s up to `max` (at most 64) uffd_msg from `fd` in one call and unpacks them into
/// `out`. Returns the number of messages, or -1 with errno (EAGAIN when non-blocking and
/// empty).
int memlab_uffd_read_faults(int fd, struct memlab_uffd_fault *out, int max);
/// ppoll on one fd for POLLIN with a nanosecond timeout (< 0: none). 1 readable, 0 timeout,
/// -1 errno. revents of POLLERR/POLLHUP count as readable (the read reports it).
int memlab_ppoll_in(int fd, int64_t timeout_ns);
/// An epoll instance watching `fd` for EPOLLIN (a handler thread's own; close it). -1 on error.
int memlab_epoll_in(int fd);
/// epoll_wait(2) on an instance from memlab_epoll_in for up to `timeout_ns` (-1: forever;
/// epoll_pwait2's nanosecond timeout where the kernel has it). 1 when readable, 0 on
/// timeout, -1 with errno. (struct epoll_event is packed on x86_64: kept on the C side.)
int memlab_epoll_wait_in(int epfd, int64_t timeout_ns);
/// Sets this thread's timer slack (prctl PR_SET_TIMERSLACK), in ns.
int memlab_set_timerslack(unsigned long ns);
/// The calling thread's CPU time in ns (CLOCK_THREAD_CPUTIME_ID).
uint64_t memlab_thread_cpu_ns(void);
/// eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK).
int memlab_eventfd(void);
/// gettid(2).
int memlab_gettid(void);
int memlab_prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5);
/* unshare(CLONE_NEWNET): the calling thread (and what it starts later) gets a new network namespace. */
int memlab_unshare_net(void);
int memlab_memfd_create(const char *name, unsigned int flags);
int memlab_pipe2(int fds[2], int flags);
/// sched_setaffinity over an explicit CPU list (CPU_SET is a macro).
int memlab_set_affinity(const int *cpus, int count);
/// The same for another thread (a QEMU vCPU thread), by its tid.
int memlab_set_thread_affinity(pid_t tid, const int *cpus, int count);
/// Fills `cpus` with the CPUs of the current affinity mask; returns how many (or -1).
int memlab_get_affinity(int *cpus, int capacity);
/// posix_spawnattr setup for a clean child: every signal default, nothing blocked.
int memlab_spawnattr_clean(posix_spawnattr_t *attr);
/// posix_spawn_file_actions_addclosefrom_np (glibc 2.34+): the child closes every fd >= low,
/// so it inherits nothing it was not given (a harness's pipes, the settings lock).
int memlab_spawn_closefrom(posix_spawn_file_actions_t *actions, int low);
// Wait-status macros are macros, not functions.
int memlab_wifexited(int status);
/// Whether child `pid` has ended, without reaping it (waitid WNOWAIT): 1 ended, 0 running,
/// -1 error (errno). `block`: wait until it ends.
int memlab_child_ended(pid_t pid, int block);
/* A child running `path` that dies with this process (PDEATHSIG between fork and exec), its
 * oom_score_adj back at 0 whatever this process set for itself. */
pid_t memlab_spawn_dying_with_parent(const char *path, char *const argv[], const char *out);
int memlab_wexitstatus(int status);
int memlab_wifsignaled(int status);
int memlab_wtermsig(int status);
int memlab_pidfd_open(pid_t pid);
/// Installs a handler for each of `signals` that writes the signal number (one byte) to
/// `fd` — the self-pipe pattern: write(2) is async-signal-safe, the real work happens on a
/// thread that reads the pipe.
int memlab_install_signal_pipe(int fd, const int *signals, int count);

// ---- reference kernels (C) for `memlab bench`: the same loops the Swift scenarios run, so a
// benchmark can show the Swift code does not distort what it measures ----
/// Writes one byte every `stride` bytes over [base, base+len).
void memlab_ref_touch(void *base, size_t len, size_t stride);

/* Moves [old, old+len) to a fresh address (mremap MREMAP_MAYMOVE|MREMAP_FIXED over a range
 * reserved first) and leaves a PROT_NONE placeholder where it was, so nothing else lands there
 * while its owner still means to unmap it. Returns the new base, or NULL with errno set. */
void *memlab_remap_away(void *old, size_t len);

/* Forks a child that compares every `stride`-th page of [base, base + pages*4096) with the
 * same page of `expected` and exits with the number of mismatches (at most 250). Returns that
 * number, or -1 (errno) if fork or waitpid failed, or -2 if the child died of a signal.
 * The child only reads memory and calls _exit: safe after fork in a threaded process. */
int memlab_fork_compare_pages(const void *base, const void *expected, size_t pages, size_t stride);

/// Reference fault handler (one message per read, one UFFDIO_COPY per fault) for the bench.
/// `mode`: 0 blocking read, 1 poll, 2 busy (non-blocking read in a loop), 3 epoll.
long memlab_ref_fault_handler(int uffd, const void *src, void *region, size_t len, int mode);
/// Reference XBZRLE encoder (QEMU's delta format: runs of unchanged bytes and of changed
/// bytes, lengths in ULEB128, changed bytes copied; a trailing unchanged run is not written).
/// Returns the encoded length, 0 when `new_buf` equals `old_buf`, -1 when the encoding would
/// exceed `dlen` (QEMU's overflow: the page goes raw).
long memlab_ref_xbzrle_encode(const uint8_t *old_buf, const uint8_t *new_buf, long slen, uint8_t *dst, long dlen);
/// Follows `steps` links of a pointer chase; each element holds the index of the next.
uint64_t memlab_ref_chase(const uint64_t *base, uint64_t start, uint64_t steps);

/// One volatile byte load: a read the optimiser can neither drop nor move, for workloads whose
/// point is the fault a read takes (swap-in, shared pages of a guest).
uint8_t memlab_read_byte(const volatile uint8_t *p);

/// Reads one 64-bit word and writes the same value back through a volatile pointer: a write
/// access the optimiser cannot drop (it takes a write fault, marks the page written) that
/// leaves the contents unchanged, so a copy stays comparable with its source.
void memlab_rewrite_u64(volatile uint64_t *p);

/// Touches [base, base+len) every `stride` bytes with SIGBUS caught (sigsetjmp): returns 1 and
/// the offset that faulted when a SIGBUS arrived (hugetlb MAP_NORESERVE past the pool), 0 when
/// every byte was written. The handler is removed before returning.
int memlab_touch_catching_sigbus(void *base, size_t len, size_t stride, size_t *faulted_offset);

// ---- swap areas (include/linux/swap.h; glibc's sys/swap.h) ----
static const int memlab_SWAP_FLAG_PREFER = 0x8000;
static const int memlab_SWAP_FLAG_PRIO_MASK = 0x7fff;
int memlab_swapon(const char *path, int flags);
int memlab_swapoff(const char *path);

// ---- descriptors over a Unix socket (SCM_RIGHTS; CMSG_* are macros Swift cannot call) ----
/// Sends `len` bytes of `data` with `nfds` (1…8) descriptors attached, in one sendmsg
/// (MSG_NOSIGNAL). Returns bytes sent or -1 (errno).
ssize_t memlab_send_fds(int sock, const int *fds, int nfds, const void *data, size_t len);
/// Receives up to `len` bytes and at most `maxfds` (1…8) descriptors (MSG_CMSG_CLOEXEC).
/// `*nfds` is how many arrived. Descriptors beyond `maxfds`, or a truncated control message,
/// close whatever arrived and fail with EMSGSIZE: a peer cannot leak descriptors into us.
/// Returns bytes received (0: end of stream) or -1 (errno).
ssize_t memlab_recv_fds(int sock, int *fds, int maxfds, int *nfds, void *data, size_t len);
/// The pid of the process on the other end of a Unix socket (SO_PEERCRED), or -1.
pid_t memlab_peer_pid(int sock);

#endif
