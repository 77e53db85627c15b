#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import LabKit
import LinuxMM

/// The runner's own check: repetitions that succeed, crash, take SIGBUS, get OOM-killed in
/// a memory cgroup, or hang — so a user (and the test suite) can see that each becomes a
/// result with a reason while the runner carries on.
public struct SelfTestScenario: TypedScenario {
    public init() {}
    public let id = "selftest"
    public let summary = "The runner's isolation: a child that succeeds, crashes, gets SIGBUS, is OOM-killed or hangs"

    public enum Variant: String, ScenarioVariant {
        case ok, crash, sigbus, oom, hang
        public var summary: String {
            switch self {
            case .ok: return "fill a buffer and report its throughput (a run that succeeds)"
            case .crash: return "the child traps (a Swift runtime failure)"
            case .sigbus: return "the child touches a mapping past the end of its file: SIGBUS"
            case .oom: return "the child touches more than its memory cgroup allows: killed by the OOM killer"
            case .hang: return "the child never finishes: killed at the deadline"
            }
        }
    }

    public struct Parameters: ParameterSet {
        public init() {}
        let size = Parameter<Int>("size", 4096...(64 << 30), default: 16 << 20, unit: .bytes, help: "bytes the ok variant fills")
        let oomTouch = Parameter<Int>("oom_touch", (4 << 20)...(64 << 30), default: 256 << 20, unit: .bytes, help: "bytes the oom variant touches (must exceed memory_limit)")
        let memoryLimit = Parameter<Int>("memory_limit", (4 << 20)...(64 << 30), default: 64 << 20, unit: .bytes, help: "memory cgroup limit for the oom variant")
        let deadlineS = Parameter<Double>("deadline_s", 0.2...3600, default: 30, unit: .s, help: "seconds before the runner kills a repetition")
    }
    public let requiresRoot = false

    public func probe(_ variant: Variant) -> Availability {
        if variant == .oom {
            if !System.isRoot { return .unusable("needs root: the oom variant creates a memory cgroup") }
            if MemoryCgroupMount.detect().isEmpty { return .unusable("no memory cgroup controller is mounted") }
        }
        return .usable
    }

    public func validate(_ variant: Variant, _ p: Values) throws(UsageError) {
        if variant == .oom && p.oomTouch <= p.memoryLimit {
            throw UsageError("the oom variant needs oom_touch > memory_limit (oom_touch=\(p.oomTouch), memory_limit=\(p.memoryLimit))")
        }
    }

    public func deadline(_ variant: Variant, _ p: Values) -> Double { p.deadlineS }

    public func memoryLimit(_ variant: Variant, _ p: Values) -> Int? {
        variant == .oom ? p.memoryLimit : nil
    }

    public func run(_ ctx: RunContext, _ variant: Variant, _ p: Values) throws {
        switch variant {
        case .ok:
            let size = p.size
            let m = try AnonymousMapping(length: size)
            m.touch()   // fault in first: time the fill, not the faults
            let t0 = Clock.nanoseconds()
            memset(m.base, 0x5A, size)
            let s = Clock.seconds(since: t0)
            ctx.record("fill_throughput", Double(size) / s, .bytesPerSecond, better: .higher)
            ctx.record("fill_time", s, .s, better: .lower)
        case .crash:
            fatalError("selftest: a deliberate runtime trap")
        case .sigbus:
            let fd = memlab_memfd_create("memlab-sigbus", 0)
            guard fd >= 0 else { throw SystemError.current("memfd_create") }
            // A one-page shared mapping of an empty file: the page lies past EOF.
            guard let p = mmap(nil, System.pageSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), p != MAP_FAILED else {
                throw SystemError.current("mmap(memfd)")
            }
            p.storeBytes(of: 1, as: UInt8.self)
        case .oom:
            let m = try AnonymousMapping(length: p.oomTouch)
            m.touch()
            ctx.note("touched \(m.length) bytes without being killed")
        case .hang:
            while true { Clock.sleep(nanoseconds: 1_000_000_000) }
        }
    }
}
