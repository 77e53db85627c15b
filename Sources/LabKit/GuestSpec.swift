import LinuxMM

/// Where a run's repetitions execute: on this machine (`kernel=host`), or inside a QEMU guest
/// booted with another kernel and topology (`--guest kernel=PATH,mem=1G,cpus=2,numa=2,cgroup=v2`).
/// Parsed and range-checked here, before anything runs; the kernel file itself is checked by
/// the guest backend (a bzImage header) before anything changes.
public struct GuestSpec: Sendable, Codable, Equatable {
    public enum Cgroup: String, Sendable, Codable, CaseIterable { case v1, v2 }
    public enum Accel: String, Sendable, Codable, CaseIterable { case auto, kvm, tcg }

    /// A bzImage path, or "host": run on the running kernel, not in a guest.
    public var kernel: String
    public var memoryMiB: Int = 1024
    public var cpus: Int = 2
    public var numaNodes: Int = 1
    /// Which cgroup hierarchy the guest mounts its memory controller on.
    public var cgroup: Cgroup = .v2
    public var accel: Accel = .auto
    /// Kernel parameters added after memlab's own (`console=ttyS0 panic=-1 quiet`), e.g.
    /// `transparent_hugepage=never zswap.enabled=1`; empty: none.
    public var append: String = ""

    public static let hostKernel = "host"
    /// `kernel=distro`: the newest /boot/vmlinuz-* (Debian's linux-image-amd64), so a scenario
    /// file need not name a version that the next kernel update changes.
    public static let distroKernel = "distro"

    static func distributionKernel(_ what: String) throws(UsageError) -> String {
        guard let k = ProcFile.list("/boot").filter({ $0.hasPrefix("vmlinuz-") }).sorted().last else {
            throw UsageError("\(what): kernel=distro, but /boot holds no vmlinuz-*: apt-get install --no-install-recommends linux-image-amd64")
        }
        return "/boot/\(k)"
    }
    public var isHost: Bool { kernel == Self.hostKernel }

    /// A kernel path as the guest needs it: absolute. The guest sees this machine's tree from
    /// its root, not from our working directory, and the modules of an unpacked kernel are
    /// found beside it (DIR/lib/modules): a relative path would name nothing there. Relative
    /// to `base` (a scenario file's directory), else to the current directory.
    static func absolute(_ path: String, base: String?) -> String {
        if path.hasPrefix("/") { return path }
        return SettingsGuard.absolute((base.flatMap { $0.isEmpty ? nil : $0 } ?? ".") + "/" + path)
    }

    /// Bounds no topology here goes past: QEMU's q35 takes more, but a lab guest is small.
    public static let memoryRangeMiB = 128...(256 << 10)
    public static let cpuRange = 1...64
    public static let nodeRange = 1...8
    /// Each NUMA node gets at least this much memory.
    public static let minNodeMiB = 64

    public init(kernel: String) { self.kernel = kernel }

    public static let keys = ["kernel", "mem", "cpus", "numa", "cgroup", "accel", "append"]
    /// The kernel command line holds at most 2048 bytes on x86; memlab's own part and a margin
    /// take the rest.
    public static let maxAppendBytes = 1024
    /// Parameters memlab's guest needs as it sets them: its console is how the host follows the
    /// guest, and panic=-1 ends a guest that panics instead of leaving it to the deadline
    /// (sysctl.kernel.panic, 5.8+, would set the same).
    static let reservedParameters = ["console", "panic", "sysctl.kernel.panic"]

    /// `kernel=PATH|distro|host[,mem=SIZE][,cpus=N][,numa=N][,cgroup=v1|v2][,accel=auto|kvm|tcg][,append=PARAMS]`.
    /// `append` comes last and takes the rest of the text, commas included (`isolcpus=1,2`).
    /// A relative kernel path is taken from `base` (a scenario file's directory; nil: the
    /// current directory).
    public static func parse(_ text: String, what: String = "--guest", base: String? = nil) throws(UsageError) -> GuestSpec {
        var fields: [String: String] = [:]
        var parts = text.split(separator: ",", omittingEmptySubsequences: false)
        if let i = parts.firstIndex(where: { $0.hasPrefix("append=") }) {
            fields["append"] = parts[i...].joined(separator: ",").dropFirst("append=".count).description
            parts.removeSubrange(i...)
        }
        for part in parts {
            guard let eq = part.firstIndex(of: "="), eq != part.startIndex else {
                throw UsageError("\(what) '\(text)': '\(part)' is not KEY=VALUE; expected kernel=PATH[,mem=SIZE][,cpus=N][,numa=N][,cgroup=v1|v2][,accel=auto|kvm|tcg][,append=PARAMS]")
            }
            let key = String(part[..<eq]), value = String(part[part.index(after: eq)...])
            guard keys.contains(key) else { throw UsageError("\(what): unknown key '\(key)'; allowed: \(keys.joined(separator: ", "))") }
            guard fields[key] == nil else { throw UsageError("\(what): '\(key)' is given twice") }
            fields[key] = value
        }
        guard let kernel = fields["kernel"], !kernel.isEmpty else {
            throw UsageError("\(what) '\(text)': kernel=PATH is required (a bzImage, e.g. /boot/vmlinuz-6.1.0-57-amd64, or kernel=host), before append (which takes the rest)")
        }
        var s = GuestSpec(kernel: kernel == distroKernel ? try distributionKernel(what)
                          : kernel == hostKernel ? kernel : absolute(kernel, base: base))
        if let m = fields["mem"] {
            guard let bytes = parseSize(m) else { throw UsageError("\(what): mem '\(m)' is not a size (e.g. 1G, 768M)") }
            guard bytes % (1 << 20) == 0, memoryRangeMiB.contains(bytes >> 20) else {
                throw UsageError("\(what): mem '\(m)' must be whole MiB within \(memoryRangeMiB.lowerBound)M...\(memoryRangeMiB.upperBound >> 10)G")
            }
            s.memoryMiB = bytes >> 20
        }
        if let c = fields["cpus"] { s.cpus = try int(c, "cpus", cpuRange, what) }
        if let n = fields["numa"] { s.numaNodes = try int(n, "numa", nodeRange, what) }
        if let c = fields["cgroup"] {
            guard let v = Cgroup(rawValue: c) else { throw UsageError("\(what): cgroup '\(c)' must be v1 or v2") }
            s.cgroup = v
        }
        if let a = fields["accel"] {
            guard let v = Accel(rawValue: a) else { throw UsageError("\(what): accel '\(a)' must be auto, kvm or tcg") }
            s.accel = v
        }
        if let a = fields["append"] { s.append = try kernelParameters(a, what) }
        if s.isHost && fields.count > 1 {
            throw UsageError("\(what): kernel=host runs on this machine as it is; mem, cpus, numa, cgroup, accel and append describe a guest")
        }
        try s.check(what: what)
        return s
    }

    /// The topology's own consistency (each node gets a share of memory worth having).
    public func check(what: String) throws(UsageError) {
        if isHost { return }
        if memoryMiB / numaNodes < Self.minNodeMiB {
            throw UsageError("\(what): \(numaNodes) NUMA nodes need at least \(numaNodes * Self.minNodeMiB)M of memory (\(Self.minNodeMiB)M a node); mem is \(memoryMiB)M")
        }
    }

    /// Node `i`'s memory in MiB: an equal share, the remainder on the last node.
    public func nodeMiB(_ i: Int) -> Int {
        let share = memoryMiB / numaNodes
        return i == numaNodes - 1 ? memoryMiB - share * (numaNodes - 1) : share
    }

    /// Node `i`'s CPUs: CPU c sits on node c mod N (a node may have none: a memory-only node).
    public func nodeCPUs(_ i: Int) -> [Int] { (0..<cpus).filter { $0 % numaNodes == i } }

    /// How the topology reads in a label: "2 CPUs, 1024 MiB, 2 nodes, cgroup v2".
    public var topologyDescription: String {
        isHost ? "this machine" : "\(cpus) CPU\(cpus == 1 ? "" : "s"), \(memoryMiB) MiB, \(numaNodes) node\(numaNodes == 1 ? "" : "s"), cgroup \(cgroup.rawValue)"
    }

    /// Kernel parameters for the guest's command line: printable ASCII, bounded, none of the
    /// ones memlab sets itself.
    static func kernelParameters(_ text: String, _ what: String) throws(UsageError) -> String {
        let t = text.trimmingCharacters(in: " ")
        guard t.utf8.count <= maxAppendBytes else {
            throw UsageError("\(what): append is \(t.utf8.count) bytes; at most \(maxAppendBytes) (the kernel's command line is 2048 on x86)")
        }
        // No quotes: the kernel strips one before a parameter's name, which would let a
        // reserved one through.
        guard t.utf8.allSatisfy({ $0 >= 0x20 && $0 < 0x7f && $0 != UInt8(ascii: "\"") }) else {
            throw UsageError("\(what): append must be printable ASCII kernel parameters separated by spaces, without quotes")
        }
        // append takes the rest of the text: a key of ours after it was meant for us.
        for key in keys where t.contains(",\(key)=") {
            throw UsageError("\(what): append must come last: it takes the rest of the text, and ',\(key)=' follows it")
        }
        for word in t.split(separator: " ") {
            let name = word.split(separator: "=", maxSplits: 1).first.map(String.init) ?? ""
            if reservedParameters.contains(name) {
                throw UsageError("\(what): append sets '\(name)', which memlab sets itself (console=ttyS0: the host follows the guest on it; panic=-1: a panicked guest ends)")
            }
        }
        return t
    }

    private static func int(_ text: String, _ key: String, _ range: ClosedRange<Int>, _ what: String) throws(UsageError) -> Int {
        guard let v = Int(text), range.contains(v) else {
            throw UsageError("\(what): \(key) '\(text)' must be an integer \(range.lowerBound)...\(range.upperBound)")
        }
        return v
    }
}

/// Whether runs are being planned for another machine (a guest): then a scenario's checks of
/// this machine — its NUMA nodes, its memory — are left to the guest's own runner, which
/// checks every run again before it starts (Runner). Set by RunPlan while it plans for guests.
public enum Planning {
    private static let elsewhere = Lock(false)
    public static var forAnotherMachine: Bool { elsewhere.withLock { $0 } }
    static func with<T>(anotherMachine: Bool, _ body: () throws(UsageError) -> T) throws(UsageError) -> T {
        let before = elsewhere.withLock { v in let b = v; v = anotherMachine; return b }
        defer { elsewhere.withLock { $0 = before } }
        return try body()
    }
}
