#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import Synchronization

/// Finds the pages of a region written since the last look — what pre-copy migration re-sends.
/// `collect` returns the written pages (indices from the region's start, ascending) and re-arms
/// tracking for them, so a write after the call shows up in the next one.
public protocol DirtyTracker: AnyObject {
    /// What the tracker uses, for notes in a result ("uffd-wp-async + PAGEMAP_SCAN", …).
    var mechanism: String { get }
    /// Arms tracking over the whole region: from now on a write marks its page.
    func protectAll() throws(SystemError)
    /// Appends the pages written since the last `protectAll`/`collect` to `pages` and re-arms
    /// them; returns how many were appended.
    @discardableResult
    func collect(into pages: inout [Int]) throws(SystemError) -> Int
    /// Write faults taken by the workload (synchronous write-protect counts them; nil where the
    /// mechanism cannot see them).
    var writeFaults: Int? { get }
    /// Stops tracking (unregisters); called once, also implicitly by deinit.
    func close()
}

/// The categories and flags of the PAGEMAP_SCAN ioctl (include/uapi/linux/fs.h, 6.7+).
public enum PagemapScan {
    public static let wpMatching = memlab_PM_SCAN_WP_MATCHING
    public static let checkWPAsync = memlab_PM_SCAN_CHECK_WPASYNC
    public static let isWPAllowed = memlab_PAGE_IS_WPALLOWED
    public static let isWritten = memlab_PAGE_IS_WRITTEN
    public static let isPresent = memlab_PAGE_IS_PRESENT
    public static let isSoftDirty = memlab_PAGE_IS_SOFT_DIRTY

    /// One PAGEMAP_SCAN walk over [start, end): the regions whose categories match
    /// `categoryMask` (all of them set), reported with `returnMask`; with `flags` including
    /// `wpMatching` the matching pages are write-protected again in the same call. Walks again
    /// from `walk_end` when the vector fills up.
    public static func scan(pagemapFD: Int32, start: UInt, end: UInt, flags: UInt64, categoryMask: UInt64,
                            returnMask: UInt64, buffer: inout [page_region],
                            _ body: (page_region) -> Void) throws(SystemError) {
        var from = UInt64(start)
        let to = UInt64(end)
        while from < to {
            var filled = 0
            var walkEnd: UInt64 = 0
            let rc: Int32 = buffer.withUnsafeMutableBufferPointer { vec in
                var arg = pm_scan_arg()
                arg.size = UInt64(MemoryLayout<pm_scan_arg>.size)
                arg.flags = flags
                arg.start = from
                arg.end = to
                arg.vec = UInt64(UInt(bitPattern: vec.baseAddress))
                arg.vec_len = UInt64(vec.count)
                arg.category_mask = categoryMask
                arg.return_mask = returnMask
                let r = memlab_ioctl_ptr(pagemapFD, memlab_PAGEMAP_SCAN, &arg)
                walkEnd = arg.walk_end
                if r >= 0 { filled = Int(r) }
                return r
            }
            if rc < 0 { throw SystemError.current("ioctl(PAGEMAP_SCAN)", path: "/proc/self/pagemap") }
            for i in 0..<filled { body(buffer[i]) }
            if walkEnd <= from { break }  // no progress: nothing more to walk
            from = walkEnd
        }
    }
}

/// userfaultfd asynchronous write-protect (UFFD_FEATURE_WP_ASYNC, 6.7+) read and re-armed with
/// PAGEMAP_SCAN: the kernel resolves write faults itself (no message, no handler thread), clears
/// the page's uffd-wp bit, and PAGEMAP_SCAN with PM_SCAN_WP_MATCHING reports the written pages
/// and protects them again in one call. WP_UNPOPULATED (6.4+) lets never-touched pages be
/// protected as well, so a first write to them is seen too.
public final class AsyncWriteProtectTracker: DirtyTracker {
    public let base: UnsafeMutableRawPointer
    public let length: Int
    private let uffd: Userfaultfd.Descriptor
    private let pagemap: Int32
    private var buffer: [page_region]
    private var closed = false
    public let mechanism = "userfaultfd WP_ASYNC + PAGEMAP_SCAN"
    public var writeFaults: Int? { nil }

    public init(base: UnsafeMutableRawPointer, length: Int) throws(SystemError) {
        self.base = base
        self.length = length
        let d: Userfaultfd.Descriptor
        do throws(SystemError) {
            d = try Userfaultfd.Descriptor(features: [.wpAsync, .wpUnpopulated])
        } catch {
            throw SystemError(errno: error.errno, call: "ioctl(UFFDIO_API, WP_ASYNC|WP_UNPOPULATED): kernel lacks asynchronous write-protect (needs 6.7+)")
        }
        try d.register(base, length: length, mode: .writeProtect)
        let pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC)
        if pm < 0 { throw SystemError.current("open", path: "/proc/self/pagemap") }
        uffd = d
        pagemap = pm
        buffer = [page_region](repeating: page_region(), count: 4096)
    }

    deinit { close() }

    public func close() {
        if closed { return }
        closed = true
        try? uffd.unregister(base, length: length)
        Glibc.close(pagemap)
    }

    public func protectAll() throws(SystemError) {
        try uffd.writeProtect(UInt64(UInt(bitPattern: base)), length: UInt64(length), protect: true)
    }

    @discardableResult
    public func collect(into pages: inout [Int]) throws(SystemError) -> Int {
        try scan(reprotect: true, into: &pages)
    }

    /// The written pages without re-protecting them (a look that changes nothing).
    @discardableResult
    public func peek(into pages: inout [Int]) throws(SystemError) -> Int {
        try scan(reprotect: false, into: &pages)
    }

    private func scan(reprotect: Bool, into pages: inout [Int]) throws(SystemError) -> Int {
        let start = UInt(bitPattern: base)
        let page = UInt(System.pageSize)
        let before = pages.count
        var flags = PagemapScan.checkWPAsync
        if reprotect { flags |= PagemapScan.wpMatching }
        try PagemapScan.scan(pagemapFD: pagemap, start: start, end: start + UInt(length), flags: flags,
                             categoryMask: PagemapScan.isWritten, returnMask: PagemapScan.isWritten,
                             buffer: &buffer) { r in
            var a = UInt(r.start)
            while a < UInt(r.end) {
                pages.append(Int((a - start) / page))
                a += page
            }
        }
        // A walk resumed from `walk_end` after a full vector can report a page of the call
        // before again (seen under ThreadSanitizer's slowness, with many regions; a sender
        // must not send a page twice in one frame). Only then: sort and drop the repeats —
        // never a page reported once (clipping regions at the last end reported lost pages).
        var ascending = true
        var i = before + 1
        while i < pages.count { if pages[i] <= pages[i - 1] { ascending = false; break }; i += 1 }
        if !ascending {
            var tail = Array(pages[before...])
            tail.sort()
            var out = before
            for (k, p) in tail.enumerated() where k == 0 || p != tail[k - 1] { pages[out] = p; out += 1 }
            pages.removeLast(pages.count - out)
        }
        return pages.count - before
    }
}

/// Synchronous userfaultfd write-protect: every first write to a protected page stops the
/// writing thread and sends a message; a handler thread counts it, notes the page and removes
/// the protection (UFFDIO_WRITEPROTECT without MODE_WP, which wakes the thread). Slower than the
/// asynchronous mode, but it counts every write fault.
public final class SyncWriteProtectTracker: DirtyTracker, @unchecked Sendable {
    // @unchecked only for `base`, a constant address; the mutable state is locks and atomics.
    public let base: UnsafeMutableRawPointer
    public let length: Int
    private let uffd: Userfaultfd.Descriptor
    private let stopPipe: (Int32, Int32)
    private let lock = Lock<[Int]>([])
    private let faults = Atomic<Int>(0)
    private let handlerDone = Atomic<Bool>(false)
    private let handler = Lock<OSThread?>(nil)
    private let closed = Atomic<Bool>(false)
    public let mechanism = "userfaultfd synchronous WP (a handler thread un-protects each written page)"
    public var writeFaults: Int? { faults.load(ordering: .relaxed) }

    /// `unpopulated: false` for a kernel before 6.4 (no WP_UNPOPULATED): only pages already
    /// populated are protected, so the caller populates the whole region first.
    public init(base: UnsafeMutableRawPointer, length: Int, unpopulated: Bool = true) throws(SystemError) {
        self.base = base
        self.length = length
        let d = try Userfaultfd.Descriptor(features: unpopulated ? [.wpUnpopulated] : [])
        try d.register(base, length: length, mode: .writeProtect)
        var p: [Int32] = [0, 0]
        if memlab_pipe2(&p, O_CLOEXEC) != 0 { throw SystemError.current("pipe2") }
        uffd = d
        stopPipe = (p[0], p[1])
        do throws(SystemError) {
            let t = try OSThread { [self] in serve() }
            handler.withLock { $0 = t }
        } catch {
            Glibc.close(p[0]); Glibc.close(p[1])
            throw SystemError(errno: error.errno, call: "pthread_create(write-protect handler)")
        }
    }

    deinit { close() }

    /// The handler loop: poll the uffd and the stop pipe; allocates nothing per fault.
    private func serve() {
        let msgs = UnsafeMutablePointer<Userfaultfd.Message>.allocate(capacity: 64)
        defer { msgs.deallocate() }
        let start = UInt64(UInt(bitPattern: base))
        let pageMask = ~UInt64(System.pageSize - 1)
        var fds = [pollfd(fd: uffd.fd, events: Int16(POLLIN), revents: 0), pollfd(fd: stopPipe.0, events: Int16(POLLIN), revents: 0)]
        var local = [Int]()
        local.reserveCapacity(64)
        while true {
            let n = poll(&fds, 2, -1)
            if n < 0 { if errno == EINTR { continue } else { break } }
            if fds[1].revents != 0 { break }
            guard let count = try? uffd.read(into: msgs, max: 64), count > 0 else { continue }
            local.removeAll(keepingCapacity: true)
            for i in 0..<count where msgs[i].event == UInt32(memlab_UFFD_EVENT_PAGEFAULT) {
                guard msgs[i].flags & memlab_UFFD_PAGEFAULT_FLAG_WP != 0 else { continue }
                local.append(Int(((msgs[i].address & pageMask) - start) / UInt64(System.pageSize)))
            }
            // Record the pages before waking their writers: a collect() that runs as soon as a
            // write returns must already see that write.
            if !local.isEmpty { lock.withLock { $0.append(contentsOf: local) } }
            faults.add(local.count, ordering: .relaxed)
            for index in local {
                // Un-protecting wakes the writer.
                try? uffd.writeProtect(start + UInt64(index * System.pageSize), length: UInt64(System.pageSize), protect: false)
            }
        }
        handlerDone.store(true, ordering: .releasing)
    }

    public func close() {
        if closed.exchange(true, ordering: .acquiringAndReleasing) { return }
        // Unregistering wakes any thread still blocked on a write fault.
        try? uffd.unregister(base, length: length)
        var b: UInt8 = 1
        _ = write(stopPipe.1, &b, 1)
        handler.withLock { $0 }?.join()
        Glibc.close(stopPipe.0)
        Glibc.close(stopPipe.1)
    }

    public func protectAll() throws(SystemError) {
        try uffd.writeProtect(UInt64(UInt(bitPattern: base)), length: UInt64(length), protect: true)
    }

    @discardableResult
    public func collect(into pages: inout [Int]) throws(SystemError) -> Int {
        var taken = lock.withLock { (list: inout [Int]) -> [Int] in
            let t = list
            list.removeAll(keepingCapacity: true)
            return t
        }
        taken.sort()
        // Re-protect before the caller reads the pages: a write after this faults again and
        // lands in the next collection.
        let page = UInt64(System.pageSize)
        let start = UInt64(UInt(bitPattern: base))
        var i = 0
        let before = pages.count
        while i < taken.count {
            var j = i
            while j + 1 < taken.count && taken[j + 1] <= taken[j] + 1 { j += 1 }
            try uffd.writeProtect(start + UInt64(taken[i]) * page, length: UInt64(taken[j] - taken[i] + 1) * page, protect: true)
            // Two threads faulting on one page send two messages: count the page once.
            for k in i...j where k == i || taken[k] != taken[k - 1] { pages.append(taken[k]) }
            i = j + 1
        }
        return pages.count - before
    }
}

/// Soft-dirty (clear_refs 4 + pagemap bit 55): works only on kernels with
/// CONFIG_MEM_SOFT_DIRTY (see `SoftDirty.probe`). Reading then clearing leaves a window in
/// which a write is lost; the tracker documents it rather than hiding it.
public final class SoftDirtyTracker: DirtyTracker {
    public let base: UnsafeMutableRawPointer
    public let length: Int
    private let pagemap: Int32
    public let mechanism = "soft-dirty (clear_refs 4 + pagemap bit 55; a write between read and clear is missed)"
    public var writeFaults: Int? { nil }

    public init(base: UnsafeMutableRawPointer, length: Int) throws(SystemError) {
        let probe = SoftDirty.probe()
        if !probe.usable { throw SystemError(errno: EOPNOTSUPP, call: "soft-dirty: \(probe.reason ?? "unusable")") }
        self.base = base
        self.length = length
        pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC)
        if pagemap < 0 { throw SystemError.current("open", path: "/proc/self/pagemap") }
    }

    deinit { close() }
    public func close() { if pagemap >= 0 { Glibc.close(pagemap) } }

    public func protectAll() throws(SystemError) {
        do { try ProcFile.write("/proc/self/clear_refs", "4") } catch { throw SystemError(errno: EIO, call: "write 4 to /proc/self/clear_refs") }
    }

    @discardableResult
    public func collect(into pages: inout [Int]) throws(SystemError) -> Int {
        let page = System.pageSize
        let n = length / page
        var entries = [UInt64](repeating: 0, count: n)
        let first = UInt(bitPattern: base) / UInt(page)
        let got = entries.withUnsafeMutableBytes { pread(pagemap, $0.baseAddress, n * 8, off_t(first * 8)) }
        if got != n * 8 { throw SystemError.current("pread", path: "/proc/self/pagemap") }
        try protectAll()
        let before = pages.count
        for (i, e) in entries.enumerated() where e & (1 << 55) != 0 { pages.append(i) }
        return pages.count - before
    }
}

/// Whether asynchronous write-protect dirty tracking works here, found by trying it on one
/// page: protect, write, scan — the written page must come back, and only it.
public enum WriteProtectTracking {
    public static func probe() -> (usable: Bool, reason: String?) {
        let page = System.pageSize
        let mapping: AnonymousMapping
        do { mapping = try AnonymousMapping(length: 4 * page) } catch { return (false, "mmap: \(error)") }
        mapping.touch()
        do {
            let t = try AsyncWriteProtectTracker(base: mapping.base, length: mapping.length)
            defer { t.close() }
            try t.protectAll()
            var first: [Int] = []
            try t.collect(into: &first)
            (mapping.base + 2 * page).storeBytes(of: 9, as: UInt8.self)
            var pages: [Int] = []
            try t.collect(into: &pages)
            if first.isEmpty && pages == [2] { return (true, nil) }
            return (false, "PAGEMAP_SCAN reported pages \(first) then \(pages) after writing page 2 (expected [] then [2])")
        } catch {
            return (false, error.description)
        }
    }
}
