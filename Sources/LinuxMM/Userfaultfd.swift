#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM

/// A typed userfaultfd: open with the features asked for (UFFDIO_API), register ranges, and
/// resolve faults with COPY / ZEROPAGE / CONTINUE / MOVE / WAKE. Every call is one ioctl and
/// allocates nothing, so a fault handler can use them on its hot path; failures are
/// `SystemError`s carrying errno and the call (callers test `errno == EEXIST`, `EAGAIN`).
extension Userfaultfd {
    /// UFFD_FEATURE_* bits (include/uapi/linux/userfaultfd.h).
    public struct Features: OptionSet, Sendable, Hashable {
        public let rawValue: UInt64
        public init(rawValue: UInt64) { self.rawValue = rawValue }
        public static let pagefaultFlagWP = Features(rawValue: 1 << 0)
        public static let eventFork = Features(rawValue: 1 << 1)
        public static let eventRemap = Features(rawValue: 1 << 2)
        public static let eventRemove = Features(rawValue: 1 << 3)
        public static let missingHugetlbfs = Features(rawValue: 1 << 4)
        public static let missingShmem = Features(rawValue: 1 << 5)
        public static let eventUnmap = Features(rawValue: 1 << 6)
        public static let sigbus = Features(rawValue: 1 << 7)
        public static let threadID = Features(rawValue: 1 << 8)
        public static let minorHugetlbfs = Features(rawValue: 1 << 9)
        public static let minorShmem = Features(rawValue: 1 << 10)
        public static let exactAddress = Features(rawValue: 1 << 11)
        public static let wpHugetlbfsShmem = Features(rawValue: 1 << 12)
        public static let wpUnpopulated = Features(rawValue: 1 << 13)
        public static let poison = Features(rawValue: 1 << 14)
        public static let wpAsync = Features(rawValue: 1 << 15)
        public static let move = Features(rawValue: 1 << 16)
    }

    /// UFFDIO_REGISTER modes.
    public struct RegisterMode: OptionSet, Sendable {
        public let rawValue: UInt64
        public init(rawValue: UInt64) { self.rawValue = rawValue }
        public static let missing = RegisterMode(rawValue: memlab_UFFDIO_REGISTER_MODE_MISSING)
        public static let writeProtect = RegisterMode(rawValue: memlab_UFFDIO_REGISTER_MODE_WP)
        public static let minor = RegisterMode(rawValue: memlab_UFFDIO_REGISTER_MODE_MINOR)
    }

    /// One message read from the descriptor, unpacked by the C shim.
    public typealias Message = memlab_uffd_fault

    public enum Event: UInt32, Sendable {
        case pagefault = 0x12, fork = 0x13, remap = 0x14, remove = 0x15, unmap = 0x16
    }

    /// An open userfaultfd after the UFFDIO_API handshake. Closed on release.
    public final class Descriptor: Sendable {
        public let fd: Int32
        /// The features the kernel granted (those asked for).
        public let features: Features
        /// The ioctls UFFDIO_API reported (bit n = _UFFDIO_* number n).
        public let ioctls: UInt64

        /// userfaultfd(2) then UFFDIO_API with `features`. `nonBlocking` sets O_NONBLOCK
        /// (needed for poll and busy-poll waits; blocking reads want it off).
        public init(features: Features = [], nonBlocking: Bool = true, userModeOnly: Bool = false) throws(SystemError) {
            var flags = O_CLOEXEC
            if nonBlocking { flags |= O_NONBLOCK }
            if userModeOnly { flags |= memlab_UFFD_USER_MODE_ONLY }
            let fd = memlab_userfaultfd(flags)
            if fd < 0 { throw SystemError.current("userfaultfd") }
            var api = uffdio_api(api: memlab_UFFD_API, features: features.rawValue, ioctls: 0)
            if memlab_ioctl_ptr(fd, memlab_UFFDIO_API, &api) != 0 {
                let e = SystemError.current("ioctl(UFFDIO_API)")
                close(fd)
                throw e
            }
            self.fd = fd
            self.features = Features(rawValue: api.features)
            self.ioctls = api.ioctls
        }

        /// Adopts a userfaultfd the kernel created (a FORK event's descriptor for the child's
        /// registered ranges): already past UFFDIO_API, with the parent's features.
        public init(adopting fd: Int32, features: Features) {
            self.fd = fd
            self.features = features
            self.ioctls = 0
        }

        deinit { close(fd) }

        /// Registers [start, start+length); returns the ioctls allowed on the range (bit n =
        /// _UFFDIO_* number n: COPY 3, ZEROPAGE 4, MOVE 5, WRITEPROTECT 6, CONTINUE 7, POISON 8).
        @discardableResult
        public func register(_ start: UnsafeMutableRawPointer, length: Int, mode: RegisterMode) throws(SystemError) -> UInt64 {
            var r = uffdio_register(range: uffdio_range(start: UInt64(UInt(bitPattern: start)), len: UInt64(length)), mode: mode.rawValue, ioctls: 0)
            if memlab_ioctl_ptr(fd, memlab_UFFDIO_REGISTER, &r) != 0 { throw SystemError.current("ioctl(UFFDIO_REGISTER)") }
            return r.ioctls
        }

        /// Unregisters a range: threads waiting on it are woken and fault normally afterwards.
        public func unregister(_ start: UnsafeMutableRawPointer, length: Int) throws(SystemError) {
            var r = uffdio_range(start: UInt64(UInt(bitPattern: start)), len: UInt64(length))
            if memlab_ioctl_ptr(fd, memlab_UFFDIO_UNREGISTER, &r) != 0 { throw SystemError.current("ioctl(UFFDIO_UNREGISTER)") }
        }

        /// UFFDIO_COPY: allocates pages for [dst, dst+length) filled from `src`, maps them
        /// and (unless `dontWake`) wakes threads waiting on the range. Returns bytes copied;
        /// a partial copy throws EAGAIN with `copied` bytes done (see `copy(…, copied:)`).
        @inline(__always)
        @discardableResult
        public func copy(to dst: UnsafeMutableRawPointer, from src: UnsafeRawPointer, length: Int, dontWake: Bool = false) throws(SystemError) -> Int {
            var copied = 0
            try copy(to: dst, from: src, length: length, dontWake: dontWake, copied: &copied)
            return copied
        }

        @inline(__always)
        public func copy(to dst: UnsafeMutableRawPointer, from src: UnsafeRawPointer, length: Int, dontWake: Bool, copied: inout Int) throws(SystemError) {
            var c = uffdio_copy(dst: UInt64(UInt(bitPattern: dst)), src: UInt64(UInt(bitPattern: src)), len: UInt64(length),
                                mode: dontWake ? memlab_UFFDIO_COPY_MODE_DONTWAKE : 0, copy: 0)
            let rc = memlab_ioctl_ptr(fd, memlab_UFFDIO_COPY, &c)
            copied = c.copy > 0 ? Int(c.copy) : 0
            if rc != 0 { throw SystemError.current("ioctl(UFFDIO_COPY)") }
        }

        /// UFFDIO_ZEROPAGE: maps the shared zero page (anonymous memory) over the range.
        @inline(__always)
        public func zeropage(_ dst: UnsafeMutableRawPointer, length: Int, dontWake: Bool = false) throws(SystemError) {
            var z = uffdio_zeropage(range: uffdio_range(start: UInt64(UInt(bitPattern: dst)), len: UInt64(length)),
                                    mode: dontWake ? memlab_UFFDIO_ZEROPAGE_MODE_DONTWAKE : 0, zeropage: 0)
            if memlab_ioctl_ptr(fd, memlab_UFFDIO_ZEROPAGE, &z) != 0 { throw SystemError.current("ioctl(UFFDIO_ZEROPAGE)") }
        }

        /// UFFDIO_WAKE: wakes threads waiting on faults in the range (after DONTWAKE installs,
        /// or when a page turned out to be installed already — EEXIST).
        @inline(__always)
        public func wake(_ start: UnsafeMutableRawPointer, length: Int) throws(SystemError) {
            var r = uffdio_range(start: UInt64(UInt(bitPattern: start)), len: UInt64(length))
            if memlab_ioctl_ptr(fd, memlab_UFFDIO_WAKE, &r) != 0 { throw SystemError.current("ioctl(UFFDIO_WAKE)") }
        }

        /// UFFDIO_CONTINUE (MINOR mode, shmem/hugetlbfs): maps the page already in the page
        /// cache.
        @inline(__always)
        public func `continue`(_ start: UnsafeMutableRawPointer, length: Int, dontWake: Bool = false) throws(SystemError) {
            var c = uffdio_continue(range: uffdio_range(start: UInt64(UInt(bitPattern: start)), len: UInt64(length)),
                                    mode: dontWake ? memlab_UFFDIO_CONTINUE_MODE_DONTWAKE : 0, mapped: 0)
            if memlab_ioctl_ptr(fd, memlab_UFFDIO_CONTINUE, &c) != 0 { throw SystemError.current("ioctl(UFFDIO_CONTINUE)") }
        }

        /// UFFDIO_CONTINUE that reports how much was mapped before an error (EAGAIN can
        /// interrupt a range part-way: retry only the rest).
        @inline(__always)
        public func `continue`(_ start: UnsafeMutableRawPointer, length: Int, dontWake: Bool, mapped: inout Int) throws(SystemError) {
            var c = uffdio_continue(range: uffdio_range(start: UInt64(UInt(bitPattern: start)), len: UInt64(length)),
                                    mode: dontWake ? memlab_UFFDIO_CONTINUE_MODE_DONTWAKE : 0, mapped: 0)
            let rc = memlab_ioctl_ptr(fd, memlab_UFFDIO_CONTINUE, &c)
            mapped = c.mapped > 0 ? Int(c.mapped) : 0
            if rc != 0 { throw SystemError.current("ioctl(UFFDIO_CONTINUE)") }
        }

        /// UFFDIO_MOVE (6.8+, anonymous): moves the pages of [src, src+length) to dst without
        /// copying; the source range becomes empty. Returns bytes moved.
        @inline(__always)
        @discardableResult
        public func move(to dst: UnsafeMutableRawPointer, from src: UnsafeMutableRawPointer, length: Int, dontWake: Bool = false) throws(SystemError) -> Int {
            var m = uffdio_move(dst: UInt64(UInt(bitPattern: dst)), src: UInt64(UInt(bitPattern: src)), len: UInt64(length),
                                mode: dontWake ? memlab_UFFDIO_MOVE_MODE_DONTWAKE : 0, move: 0)
            if memlab_ioctl_ptr(fd, memlab_UFFDIO_MOVE, &m) != 0 { throw SystemError.current("ioctl(UFFDIO_MOVE)") }
            return Int(m.move)
        }

        /// UFFDIO_MOVE that reports how much was moved before an error (EAGAIN part-way:
        /// the moved part's source is empty now, so retry only the rest).
        @inline(__always)
        public func move(to dst: UnsafeMutableRawPointer, from src: UnsafeMutableRawPointer, length: Int, dontWake: Bool, moved: inout Int) throws(SystemError) {
            var m = uffdio_move(dst: UInt64(UInt(bitPattern: dst)), src: UInt64(UInt(bitPattern: src)), len: UInt64(length),
                                mode: dontWake ? memlab_UFFDIO_MOVE_MODE_DONTWAKE : 0, move: 0)
            let rc = memlab_ioctl_ptr(fd, memlab_UFFDIO_MOVE, &m)
            moved = m.move > 0 ? Int(m.move) : 0
            if rc != 0 { throw SystemError.current("ioctl(UFFDIO_MOVE)") }
        }

        /// Reads up to `max` (≤ 64) messages in one read(2). Returns the count; 0 when the
        /// descriptor is non-blocking and nothing is pending. EINTR is returned as 0 too.
        @inline(__always)
        public func read(into buffer: UnsafeMutablePointer<Message>, max: Int) throws(SystemError) -> Int {
            let n = memlab_uffd_read_faults(fd, buffer, Int32(max))
            if n >= 0 { return Int(n) }
            let e = Glibc.errno
            if e == EAGAIN || e == EINTR { return 0 }
            throw SystemError(errno: e, call: "read(userfaultfd)")
        }

        /// Waits until a message is pending or `timeoutNanoseconds` pass (nil: forever).
        /// Returns whether the descriptor is readable.
        @inline(__always)
        public func poll(timeoutNanoseconds: Int64? = nil) throws(SystemError) -> Bool {
            let rc = memlab_ppoll_in(fd, timeoutNanoseconds ?? -1)
            if rc >= 0 { return rc == 1 }
            if Glibc.errno == EINTR { return false }
            throw SystemError.current("ppoll(userfaultfd)")
        }

        /// UFFDIO_WRITEPROTECT: protect (or un-protect, which also wakes a thread waiting on a
        /// write fault there unless `dontWake`) a range registered in write-protect mode.
        @inline(__always)
        public func writeProtect(_ start: UInt64, length: UInt64, protect: Bool, dontWake: Bool = false) throws(SystemError) {
            var mode: UInt64 = protect ? memlab_UFFDIO_WRITEPROTECT_MODE_WP : 0
            if dontWake { mode |= 1 << 1 }   // UFFDIO_WRITEPROTECT_MODE_DONTWAKE
            var wp = uffdio_writeprotect(range: uffdio_range(start: start, len: length), mode: mode)
            if memlab_ioctl_ptr(fd, memlab_UFFDIO_WRITEPROTECT, &wp) != 0 {
                throw SystemError.current(protect ? "ioctl(UFFDIO_WRITEPROTECT)" : "ioctl(UFFDIO_WRITEPROTECT, un-protect)")
            }
        }

        /// Whether an ioctl (by _UFFDIO_* number) is among those UFFDIO_API reported.
        public func supports(ioctl number: Int) -> Bool { ioctls & (1 << UInt64(number)) != 0 }
    }
}
