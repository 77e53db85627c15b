#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import LabKit
import LinuxMM
import Workloads

/// Worker processes a scenario's child starts beside itself (inside its memory cgroup): a
/// memory hog for the OOM experiment, a "guest" with a memory image for the density
/// experiment. Each is memlab re-executed as `memlab _guest --name=value …`, so it starts clean
/// (no fork of a threaded Swift process), dies with its parent (PDEATHSIG), and reports
/// through a shared status file: one slot of 8 UInt64 per worker.
public enum Guest {
    /// Slot fields.
    public enum Field: Int {
        case state = 0        // 0 starting, 1 filling, 2 running, 3 done
        case pages = 1        // pages written so far
        case passes = 2       // passes over the image completed
        case startNS = 3      // CLOCK_MONOTONIC when the first page was written
        case readyNS = 4      // when the image was complete
        case passNS = 5       // total ns spent in passes
        case lastPassNS = 6   // when the last pass ended
        case swapinMaxNS = 7  // longest timed swap-in (time_swapins=1)
    }
    /// 8 fields, then the swap-in histogram's buckets (see `SwapinHistogram`).
    public static let slotWords = 8 + SwapinHistogram.buckets

    /// The first-touch time of each page that was swapped out when a pass began, as a
    /// log-linear histogram a worker keeps in its board slot (it is SIGKILLed at the end, so
    /// it cannot hand over anything else): exact below 16 ns, then 8 buckets per power of
    /// two, so a percentile read back is the bucket's middle, within ±6.25% of the true value.
    public enum SwapinHistogram {
        public static let buckets = 320

        public static func bucket(_ ns: UInt64) -> Int {
            if ns < 16 { return Int(ns) }
            let msb = 63 - ns.leadingZeroBitCount
            let frac = Int((ns >> UInt64(msb - 3)) & 7)
            return min(buckets - 1, 16 + (msb - 4) * 8 + frac)
        }

        /// The middle of a bucket, in ns.
        public static func value(ofBucket b: Int) -> Double {
            if b < 16 { return Double(b) }
            let msb = (b - 16) / 8 + 4, frac = (b - 16) % 8
            let width = Double(UInt64(1) << UInt64(msb - 3))
            return Double(8 + frac) * width + width / 2
        }

        /// The value at percentile `q` (0...100) of bucket counts.
        public static func percentile(_ counts: [UInt64], _ q: Double) -> Double? {
            let total = counts.reduce(0, +)
            guard total > 0 else { return nil }
            let rank = max(1, UInt64((Double(total) * q / 100).rounded(.up)))
            var seen: UInt64 = 0
            for (b, c) in counts.enumerated() {
                seen += c
                if seen >= rank { return value(ofBucket: b) }
            }
            return value(ofBucket: counts.count - 1)
        }
    }

    /// The status file: created and mapped by the monitor, mapped by each worker.
    public final class Board: Sendable {
        public let path: String
        let mapping: FileMapping
        public let slots: Int

        public init(path: String, slots: Int) throws(SystemError) {
            self.path = path
            self.slots = slots
            let fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            if fd < 0 { throw SystemError.current("open", path: path) }
            let length = max(System.pageSize, slots * Guest.slotWords * 8)
            if ftruncate(fd, off_t(length)) != 0 { close(fd); throw SystemError.current("ftruncate", path: path) }
            mapping = try FileMapping(fd: fd, length: length, ownsDescriptor: true)
        }

        init(attach path: String, slots: Int) throws(SystemError) {
            self.path = path
            self.slots = slots
            let fd = open(path, O_RDWR | O_CLOEXEC)
            if fd < 0 { throw SystemError.current("open", path: path) }
            mapping = try FileMapping(fd: fd, length: max(System.pageSize, slots * Guest.slotWords * 8), ownsDescriptor: true)
        }

        deinit { unlink(path) }

        func pointer(_ slot: Int, _ f: Field) -> UnsafeMutablePointer<UInt64> {
            mapping.base.assumingMemoryBound(to: UInt64.self) + slot * Guest.slotWords + f.rawValue
        }

        public func read(_ slot: Int, _ f: Field) -> UInt64 {
            // A volatile-style load: the worker writes it from another process.
            UnsafeMutableRawPointer(pointer(slot, f)).loadUnaligned(as: UInt64.self)
        }

        func write(_ slot: Int, _ f: Field, _ v: UInt64) {
            UnsafeMutableRawPointer(pointer(slot, f)).storeBytes(of: v, as: UInt64.self)
        }

        func recordSwapin(_ slot: Int, ns: UInt64) {
            let w = mapping.base.assumingMemoryBound(to: UInt64.self) + slot * Guest.slotWords + 8 + SwapinHistogram.bucket(ns)
            w.pointee &+= 1
            if ns > read(slot, .swapinMaxNS) { write(slot, .swapinMaxNS, ns) }
        }

        /// One worker's swap-in histogram (bucket counts).
        public func swapinCounts(_ slot: Int) -> [UInt64] {
            let w = mapping.base.assumingMemoryBound(to: UInt64.self) + slot * Guest.slotWords + 8
            return (0..<SwapinHistogram.buckets).map { UnsafeMutableRawPointer(w + $0).loadUnaligned(as: UInt64.self) }
        }
    }

    /// What a worker is started with: `memlab _guest` and one `--name=value` per field (the
    /// memlab target's hidden `_guest` command parses them back, range-checking every value,
    /// and calls `run`).
    public struct Options: Sendable, Equatable {
        public enum Role: String, Sendable, CaseIterable {
            /// Write `bytes` page by page, once (the OOM experiment's memory hog).
            case hog
            /// An image of `bytes`, then passes over it (a guest of the density experiment).
            case vm
        }
        /// The largest image a worker maps: far below where a length would overflow.
        public static let maxBytes = 1 << 46
        /// The most slots a board holds (slots × slot size stays small).
        public static let maxSlots = 4096
        /// The longest sleep between passes: an hour.
        public static let maxPassSleepMS = 3_600_000

        /// The status file and its number of slots; this worker's slot.
        public var board = ""
        public var slots = 1
        public var slot = 0
        /// The process that started it: a worker whose parent is already someone else exits 125.
        public var parent: Int32?
        public var role = Role.vm
        public var bytes = 0
        /// Written to /proc/self/oom_score_adj (-1000…1000) before anything is mapped.
        public var oomScoreAdj: Int?
        /// vm: the fraction of pages identical in every guest (text, seed `baseSeed`).
        public var sharedRatio = 0.0
        public var baseSeed: UInt64 = 1
        /// vm: the private pages' pattern and seed.
        public var seed: UInt64 = 2
        public var privatePattern = FillPattern.text
        /// vm: MADV_MERGEABLE on the image.
        public var mergeable = false
        public var passSleepMS = 50
        /// vm: passes before it ends (nil: until killed).
        public var passes: Int?
        /// vm: time the first touch of each page that was swapped out when a pass began.
        public var timeSwapins = false

        public init(role: Role, bytes: Int) {
            self.role = role
            self.bytes = bytes
        }

        /// The command line after the executable: `_guest`, then the options. The `=` form
        /// throughout, so no value is ever taken for an option.
        public var arguments: [String] {
            var a = ["_guest", "--board=\(board)", "--slots=\(slots)", "--slot=\(slot)", "--role=\(role.rawValue)", "--bytes=\(bytes)"]
            if let parent { a.append("--parent=\(parent)") }
            if let oomScoreAdj { a.append("--oom-score-adj=\(oomScoreAdj)") }
            a += ["--shared-ratio=\(sharedRatio)", "--base-seed=\(baseSeed)", "--seed=\(seed)",
                  "--private-pattern=\(privatePattern.rawValue)", "--pass-sleep-ms=\(passSleepMS)"]
            if let passes { a.append("--passes=\(passes)") }
            if mergeable { a.append("--mergeable") }
            if timeSwapins { a.append("--time-swapins") }
            return a
        }
    }

    /// Starts a worker in `slot` of `board`, a child of this process.
    public static func spawn(board: Board, slot: Int, options: Options, log: String) throws(SystemError) -> pid_t {
        var o = options
        o.board = board.path
        o.slots = board.slots
        o.slot = slot
        o.parent = getpid()
        return try ChildProcess.spawn(ChildProcess.selfExecutable, o.arguments, outputPath: log)
    }

    /// `memlab _guest …`: the worker's main, with options already checked. Roles:
    ///   hog   write `bytes` page by page (oom_score_adj 1000: the cgroup's first victim)
    ///   vm    an image of `bytes`: the first `sharedRatio` identical in every guest
    ///         (text, seed `baseSeed`), the rest private (pattern `privatePattern`, seed
    ///         `seed`); optionally MADV_MERGEABLE; then passes: read every page, write every
    ///         private page, sleep `passSleepMS`, until killed or `passes` done.
    public static func run(_ o: Options) -> Int32 {
        _ = LinuxMMBridge.setParentDeathSignal(SIGKILL)
        // Its parent may have died before PDEATHSIG was set: then it has another parent.
        if let parent = o.parent, getppid() != parent { return 125 }
        let board: Board
        do { board = try Board(attach: o.board, slots: o.slots) } catch {
            writeStderr("memlab _guest: \(error)\n")
            return 1
        }
        let slot = o.slot
        if let adj = o.oomScoreAdj { try? ProcFile.write("/proc/self/oom_score_adj", String(adj)) }
        let page = System.pageSize
        let region: AnonymousMapping
        do { region = try AnonymousMapping(length: o.bytes, kind: .base) } catch {
            writeStderr("memlab _guest: \(error)\n")
            return 1
        }
        let pages = region.pageCount
        let p = region.base.assumingMemoryBound(to: UInt8.self)
        board.write(slot, .state, 1)
        board.write(slot, .startNS, Clock.nanoseconds())

        if o.role == .hog {
            for i in 0..<pages {
                p[i * page] = 1
                board.write(slot, .pages, UInt64(i + 1))
            }
            board.write(slot, .readyNS, Clock.nanoseconds())
            board.write(slot, .state, 3)
            return 0
        }

        let sharedPages = Int((Double(pages) * o.sharedRatio).rounded())
        let baseSeed = o.baseSeed, seed = o.seed, privatePattern = o.privatePattern
        for i in 0..<pages {
            if i < sharedPages {
                FillPattern.text.fill(p + i * page, pageSize: page, index: i, seed: baseSeed)
            } else {
                privatePattern.fill(p + i * page, pageSize: page, index: i, seed: seed)
            }
            board.write(slot, .pages, UInt64(i + 1))
        }
        if o.mergeable { try? KSM.setMergeable(region.base, length: region.length, true) }
        board.write(slot, .readyNS, Clock.nanoseconds())
        board.write(slot, .state, 2)

        let sleepNS = UInt64(o.passSleepMS) * 1_000_000
        let maxPasses = o.passes ?? Int.max
        var passes = 0
        var sink: UInt8 = 0
        // timeSwapins: before each pass, pagemap says which pages are swapped out; the
        // first touch of each of those is timed (its swap-in, from zswap or the device, or a
        // swap cache hit) into the slot's histogram. Other touches are not timed.
        let timeSwapins = o.timeSwapins
        while passes < maxPasses {
            let swapped: [Bool]? = timeSwapins ? (try? PageFlags.swappedMap(region.base, length: region.length)) : nil
            let t0 = Clock.nanoseconds()
            for i in 0..<pages {
                let s = swapped?[i] == true ? Clock.nanoseconds() : 0
                if i < sharedPages { sink &+= memlab_read_byte(p + i * page + 64) } else { p[i * page + 64] &+= 1 }
                if s != 0 { board.recordSwapin(slot, ns: Clock.nanoseconds() &- s) }
            }
            let t1 = Clock.nanoseconds()
            passes += 1
            board.write(slot, .passNS, board.read(slot, .passNS) + (t1 - t0))
            board.write(slot, .passes, UInt64(passes))
            board.write(slot, .lastPassNS, t1)
            Clock.sleep(nanoseconds: sleepNS)
        }
        board.write(slot, .state, 3)
        blackHole(sink)
        return 0
    }
}
