#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import LabKit
import LinuxMM

/// The runner's own check: repetitions that succeed, crash, take SIGBUS, get OOM-killed in
/// a memory cgroup, or hang — so a user (and the test suite) can see that each becomes a
/// result with a reason while the runner carries on.
public struct SelfTestScenario: Scenario {
    public init() {}
    public let id = "selftest"
    public let summary = "The runner's isolation: a child that succeeds, crashes, gets SIGBUS, is OOM-killed or hangs"
    public let variants = [
        Variant("ok", "fill a buffer and report its throughput (a run that succeeds)"),
        Variant("crash", "the child traps (a Swift runtime failure)"),
        Variant("sigbus", "the child touches a mapping past the end of its file: SIGBUS"),
        Variant("oom", "the child touches more than its memory cgroup allows: killed by the OOM killer"),
        Variant("hang", "the child never finishes: killed at the deadline"),
    ]
    public let parameters: [ParameterSpec] = [
        ParameterSpec("size", .size(4096...(64 << 30)), default: .int(16 << 20), help: "bytes the ok variant fills"),
        ParameterSpec("oom_touch", .size((4 << 20)...(64 << 30)), default: .int(256 << 20), help: "bytes the oom variant touches (must exceed memory_limit)"),
        ParameterSpec("memory_limit", .size((4 << 20)...(64 << 30)), default: .int(64 << 20), help: "memory cgroup limit for the oom variant"),
        ParameterSpec("deadline_s", .double(0.2...3600), default: .double(30), help: "seconds before the runner kills a repetition"),
    ]
    public let requiresRoot = false

    public func probe(variant: String) -> Availability {
        if variant == "oom" {
            if !System.isRoot { return .unusable("needs root: the oom variant creates a memory cgroup") }
            if MemoryCgroupMount.detect().isEmpty { return .unusable("no memory cgroup controller is mounted") }
        }
        return .usable
    }

    public func validate(variant: String, params: Params) throws(UsageError) {
        if variant == "oom" && params.int("oom_touch") <= params.int("memory_limit") {
            throw UsageError("the oom variant needs oom_touch > memory_limit (oom_touch=\(params.int("oom_touch")), memory_limit=\(params.int("memory_limit")))")
        }
    }

    public func deadline(variant: String, params: Params) -> Double { params.double("deadline_s") }

    public func memoryLimit(variant: String, params: Params) -> Int? {
        variant == "oom" ? params.int("memory_limit") : nil
    }

    public func run(_ ctx: RunContext) throws {
        switch ctx.variant {
        case "ok":
            let size = ctx.params.int("size")
            let m = try AnonymousMapping(length: size)
            m.touch()   // fault in first: time the fill, not the faults
            let t0 = Clock.nanoseconds()
            memset(m.base, 0x5A, size)
            let s = Clock.seconds(since: t0)
            ctx.record("fill_throughput", Double(size) / s, .bytesPerSecond, better: .higher)
            ctx.record("fill_time", s, .s, better: .lower)
        case "crash":
            fatalError("selftest: a deliberate runtime trap")
        case "sigbus":
            let fd = memlab_memfd_create("memlab-sigbus", 0)
            guard fd >= 0 else { throw SystemError.current("memfd_create") }
            // A one-page shared mapping of an empty file: the page lies past EOF.
            guard let p = mmap(nil, System.pageSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), p != MAP_FAILED else {
                throw SystemError.current("mmap(memfd)")
            }
            p.storeBytes(of: 1, as: UInt8.self)
        case "oom":
            let m = try AnonymousMapping(length: ctx.params.int("oom_touch"))
            m.touch()
            ctx.note("touched \(m.length) bytes without being killed")
        case "hang":
            while true { Clock.sleep(nanoseconds: 1_000_000_000) }
        default:
            throw ScenarioError.failed("unknown variant \(ctx.variant)")
        }
    }
}
