import Foundation
import LinuxMM

public enum RunStatus: String, Sendable, Codable {
    case ok, skipped, failed
}

/// The result document (docs/results-format.md), schema memlab.result/1. Field names are the
/// contract with compare, report and users' scripts: keep them.
public struct ResultDocument: Sendable, Codable {
    public static let schemaName = "memlab.result/1"
    public var schema: String = ResultDocument.schemaName
    public var tool: Tool
    public var startedAt: String
    public var host: Host
    public var runs: [RunResult]

    public struct Tool: Sendable, Codable, Equatable {
        public var name: String
        public var version: String
        public init(name: String, version: String) {
            self.name = name
            self.version = version
        }
    }

    public struct Features: Sendable, Codable, Equatable {
        public var ksm: Bool
        public var thp: String
        public var hugetlbSizes: [Int]
        public var userfaultfd: Bool
        public var zswap: Bool
        public var swapBytes: UInt64

        /// What a guest that never reported is known to have: nothing.
        public static let unknown = Features(ksm: false, thp: "unknown", hugetlbSizes: [], userfaultfd: false, zswap: false, swapBytes: 0)

        enum CodingKeys: String, CodingKey {
            case ksm, thp, userfaultfd, zswap
            case hugetlbSizes = "hugetlb_sizes"
            case swapBytes = "swap_bytes"
        }
    }

    public struct Host: Sendable, Codable, Equatable {
        public var kernel: String
        public var arch: String
        public var cpus: Int
        public var memoryBytes: UInt64
        public var numaNodes: Int
        public var pageSize: Int
        public var virtualized: Bool
        public var cpuModel: String
        public var features: Features
        /// Set when the runs executed inside a guest: then every field above is the guest's
        /// (its kernel, CPUs, memory, nodes, features), and this says how it was made.
        public var guest: GuestRecord? = nil

        public init(kernel: String, arch: String, cpus: Int, memoryBytes: UInt64, numaNodes: Int, pageSize: Int, virtualized: Bool,
                    cpuModel: String, features: Features, guest: GuestRecord? = nil) {
            self.kernel = kernel
            self.arch = arch
            self.cpus = cpus
            self.memoryBytes = memoryBytes
            self.numaNodes = numaNodes
            self.pageSize = pageSize
            self.virtualized = virtualized
            self.cpuModel = cpuModel
            self.features = features
            self.guest = guest
        }

        enum CodingKeys: String, CodingKey {
            case kernel, arch, cpus, virtualized, features, guest
            case memoryBytes = "memory_bytes"
            case numaNodes = "numa_nodes"
            case pageSize = "page_size"
            case cpuModel = "cpu_model"
        }

        public static func current() -> Host {
            let f = HostFacts.current()
            return Host(kernel: f.kernel, arch: f.arch, cpus: f.cpus, memoryBytes: f.memoryBytes,
                        numaNodes: f.numaNodes, pageSize: f.pageSize, virtualized: f.virtualized,
                        cpuModel: f.cpuModel,
                        features: Features(
                            ksm: KSM.isAvailable,
                            thp: (try? THP.enabled.read()) ?? "unavailable",
                            hugetlbSizes: HugeTLB.pools().map(\.pageBytes),
                            userfaultfd: Userfaultfd.probe().usable,
                            zswap: Zswap.isAvailable,
                            swapBytes: Swap.areas().reduce(0) { $0 + $1.sizeBytes }))
        }
    }

    enum CodingKeys: String, CodingKey {
        case schema, tool, host, runs
        case startedAt = "started_at"
    }

    public init(tool: Tool, startedAt: String, host: Host, runs: [RunResult]) {
        self.tool = tool
        self.startedAt = startedAt
        self.host = host
        self.runs = runs
    }

    public func jsonData() throws -> Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        return try encoder.encode(self)
    }

    public static func decode(_ data: Data) throws -> ResultDocument {
        let doc = try JSONDecoder().decode(ResultDocument.self, from: data)
        guard doc.schema == schemaName else {
            throw UsageError("not a memlab result: schema is '\(doc.schema)', expected '\(schemaName)'")
        }
        try doc.validate()
        return doc
    }

    /// What `report` and `compare` rely on beyond the types: numbers that are numbers, arrays
    /// whose lengths agree, sweeps that name their parameters. A document memlab wrote always
    /// passes; anything else is refused with the place it fails, never half-drawn or trapped on.
    public func validate() throws(UsageError) {
        func fail(_ i: Int, _ what: String) -> UsageError { UsageError("runs[\(i)]: \(what)") }
        func finite(_ xs: [Double]) -> Bool { xs.allSatisfy(\.isFinite) }
        if host.cpus < 0 || host.numaNodes < 0 || host.pageSize < 0 { throw UsageError("host: negative cpus, numa_nodes or page_size") }
        if let g = host.guest, g.cpus < 0 || g.numaNodes < 0 || g.memoryMiB < 0 || !g.bootS.isFinite || (g.panickedBoots ?? 0) < 0 {
            throw UsageError("host.guest: negative cpus, numa_nodes, memory_mib or panicked_boots, or a boot_s that is not a number")
        }
        for (i, r) in runs.enumerated() {
            if r.repetitions < 0 || r.warmup < 0 { throw fail(i, "negative repetitions or warmup") }
            if !r.durationS.isFinite { throw fail(i, "duration_s is not a number") }
            for m in r.metrics {
                let sm = m.summary
                if m.samples.isEmpty { throw fail(i, "metric \(m.name) has no samples") }
                if !finite(m.samples) || !finite([sm.median, sm.mean, sm.stddev, sm.min, sm.max]) {
                    throw fail(i, "metric \(m.name) holds a value that is not a finite number")
                }
                if let ci = sm.ci95, ci.count != 2 || !finite(ci) { throw fail(i, "metric \(m.name): ci95 must be two finite numbers [low, high]") }
                if let p = m.percentile, !(p >= 0 && p <= 100) { throw fail(i, "metric \(m.name): percentile must be a number in 0...100") }
            }
            for t in r.timeseries where t.t.count != t.values.count || !finite(t.t) || !finite(t.values) || !t.intervalS.isFinite {
                throw fail(i, "time series \(t.name): t and values must be finite numbers of the same length")
            }
            for d in r.distributions where d.percentiles.count != d.values.count || d.count < 0 || !finite(d.percentiles) || !finite(d.values) {
                throw fail(i, "distribution \(d.name): percentiles and values must be finite numbers of the same length")
            }
            for c in r.checks where !c.expected.isFinite || !c.observed.isFinite {
                throw fail(i, "check \(c.name): expected and observed must be finite numbers")
            }
            if let sw = r.sweep {
                if sw.parameters.isEmpty { throw fail(i, "sweep.parameters is empty: a sweep names at least one parameter") }
                if sw.parameters.contains(where: { $0.values.isEmpty }) { throw fail(i, "sweep: a parameter with no values") }
                if sw.points < 1 || sw.point < 1 || sw.point > sw.points { throw fail(i, "sweep.point \(sw.point) is not within 1...points (\(sw.points))") }
            }
        }
    }
}

/// How the guest that ran a document's runs was made: what `--guest` asked for and what the
/// machine under it was. Timings measured under TCG come from an emulated CPU.
public struct GuestRecord: Sendable, Codable, Equatable {
    /// "kvm" or "tcg": every timing in the document ran under it.
    public var accelerator: String
    public var kernelPath: String
    public var kernelRelease: String
    public var memoryMiB: Int
    public var cpus: Int
    public var numaNodes: Int
    public var cgroup: String
    /// QEMU started → the guest's runner running (host clock), seconds.
    public var bootS: Double
    /// The machine QEMU ran on: its kernel and QEMU's version.
    public var hypervisorKernel: String
    public var qemu: String
    /// The kernel parameters `append` added after memlab's own; nil: none.
    public var append: String?
    /// Boots whose kernel panicked before the guest's runner started, the one booted again
    /// after a panic and a final one that panicked too alike (nil: none).
    public var panickedBoots: Int?

    public init(accelerator: String, kernelPath: String, kernelRelease: String, memoryMiB: Int, cpus: Int, numaNodes: Int,
                cgroup: String, bootS: Double, hypervisorKernel: String, qemu: String, append: String? = nil, panickedBoots: Int? = nil) {
        self.accelerator = accelerator
        self.kernelPath = kernelPath
        self.kernelRelease = kernelRelease
        self.memoryMiB = memoryMiB
        self.cpus = cpus
        self.numaNodes = numaNodes
        self.cgroup = cgroup
        self.bootS = bootS
        self.hypervisorKernel = hypervisorKernel
        self.qemu = qemu
        self.append = append
        self.panickedBoots = panickedBoots
    }

    enum CodingKeys: String, CodingKey {
        case accelerator, cpus, cgroup, qemu, append
        case panickedBoots = "panicked_boots"
        case kernelPath = "kernel_path"
        case kernelRelease = "kernel_release"
        case memoryMiB = "memory_mib"
        case numaNodes = "numa_nodes"
        case bootS = "boot_s"
        case hypervisorKernel = "hypervisor_kernel"
    }
}

public struct Placement: Sendable, Codable, Equatable {
    public var cpus: [Int]?
    public var node: Int?
    public init(cpus: [Int]? = nil, node: Int? = nil) {
        self.cpus = cpus
        self.node = node
    }
    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(cpus, forKey: .cpus)
        try c.encode(node, forKey: .node)
    }
    enum CodingKeys: String, CodingKey { case cpus, node }
}

public struct SettingChange: Sendable, Codable, Equatable {
    public var from: String
    public var to: String
}

public struct SettingsRecord: Sendable, Codable, Equatable {
    public var changed: [String: SettingChange]
    public var restored: Bool
    public init(changed: [String: SettingChange] = [:], restored: Bool = true) {
        self.changed = changed
        self.restored = restored
    }
}

public struct Metric: Sendable, Codable, Equatable {
    public var name: String
    public var unit: MetricUnit
    public var better: Better
    public var samples: [Double]
    public var summary: Summary
    /// For a percentile of a latency distribution (`fault_latency_p99`): the distribution's
    /// name and the percentile (100 = max). Absent on other metrics, and in documents written
    /// before memlab recorded them.
    public var distribution: String? = nil
    public var percentile: Double? = nil
}

/// One run: a scenario variant with its parameters, repeated.
public struct RunResult: Sendable, Codable {
    public var scenario: String
    public var variant: String
    public var params: Params
    public var placement: Placement
    public var status: RunStatus
    public var reason: String?
    public var settings: SettingsRecord
    public var repetitions: Int
    public var warmup: Int
    public var metrics: [Metric]
    public var timeseries: [TimeSeries]
    /// Latency distributions, one per measured repetition (absent from the JSON when none).
    public var distributions: [Distribution] = []
    public var checks: [CheckValue]
    public var notes: [String]
    public var durationS: Double
    /// Where this run sits in a sweep; nil (and absent from the JSON) when it is not swept.
    public var sweep: SweepInfo? = nil
    /// The unit of each parameter (`ParameterUnit` raw values: bytes, pages, s, ms, none, ...);
    /// empty (and absent from the JSON) in documents written before memlab recorded them.
    public var paramUnits: [String: String] = [:]

    public init(scenario: String, variant: String, params: Params, placement: Placement,
                status: RunStatus, reason: String?, settings: SettingsRecord, repetitions: Int,
                warmup: Int, metrics: [Metric] = [], timeseries: [TimeSeries] = [],
                checks: [CheckValue] = [], notes: [String] = [], durationS: Double = 0) {
        self.scenario = scenario
        self.variant = variant
        self.params = params
        self.placement = placement
        self.status = status
        self.reason = reason
        self.settings = settings
        self.repetitions = repetitions
        self.warmup = warmup
        self.metrics = metrics
        self.timeseries = timeseries
        self.checks = checks
        self.notes = notes
        self.durationS = durationS
    }

    enum CodingKeys: String, CodingKey {
        case scenario, variant, params, placement, status, reason, settings, repetitions, warmup
        case metrics, timeseries, distributions, checks, notes
        case durationS = "duration_s"
        case sweep
        case paramUnits = "param_units"
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        scenario = try c.decode(String.self, forKey: .scenario)
        variant = try c.decode(String.self, forKey: .variant)
        params = try c.decode(Params.self, forKey: .params)
        placement = try c.decodeIfPresent(Placement.self, forKey: .placement) ?? Placement()
        status = try c.decode(RunStatus.self, forKey: .status)
        reason = try c.decodeIfPresent(String.self, forKey: .reason)
        settings = try c.decodeIfPresent(SettingsRecord.self, forKey: .settings) ?? SettingsRecord()
        repetitions = try c.decode(Int.self, forKey: .repetitions)
        warmup = try c.decodeIfPresent(Int.self, forKey: .warmup) ?? 0
        metrics = try c.decodeIfPresent([Metric].self, forKey: .metrics) ?? []
        timeseries = try c.decodeIfPresent([TimeSeries].self, forKey: .timeseries) ?? []
        distributions = try c.decodeIfPresent([Distribution].self, forKey: .distributions) ?? []
        checks = try c.decodeIfPresent([CheckValue].self, forKey: .checks) ?? []
        notes = try c.decodeIfPresent([String].self, forKey: .notes) ?? []
        durationS = try c.decodeIfPresent(Double.self, forKey: .durationS) ?? 0
        sweep = try c.decodeIfPresent(SweepInfo.self, forKey: .sweep)
        paramUnits = try c.decodeIfPresent([String: String].self, forKey: .paramUnits) ?? [:]
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(scenario, forKey: .scenario)
        try c.encode(variant, forKey: .variant)
        try c.encode(params, forKey: .params)
        if !paramUnits.isEmpty { try c.encode(paramUnits, forKey: .paramUnits) }
        try c.encode(placement, forKey: .placement)
        try c.encode(status, forKey: .status)
        try c.encode(reason, forKey: .reason)   // explicit null when ok
        try c.encode(settings, forKey: .settings)
        try c.encode(repetitions, forKey: .repetitions)
        try c.encode(warmup, forKey: .warmup)
        try c.encode(metrics, forKey: .metrics)
        try c.encode(timeseries, forKey: .timeseries)
        if !distributions.isEmpty { try c.encode(distributions, forKey: .distributions) }
        try c.encode(checks, forKey: .checks)
        try c.encode(notes, forKey: .notes)
        try c.encode(durationS, forKey: .durationS)
        try c.encodeIfPresent(sweep, forKey: .sweep)
    }

    public func metric(_ name: String) -> Metric? { metrics.first { $0.name == name } }
}
