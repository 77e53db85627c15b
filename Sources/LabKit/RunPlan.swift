import LinuxMM

/// Turns a command line (targets, `--set`, `--repeat`, `--warmup`, `--cpus`, `--node`) into the
/// runs to execute. Every target, parameter, sweep point and placement is checked here, before
/// anything runs: bad input changes nothing. Sizes are checked before anything is expanded, so
/// no input can make memlab build more than `Sweep.maxPoints` runs.
public enum RunPlan {
    public struct Options: Sendable {
        public var targets: [String]
        public var sets: [String] = []
        public var repeats: Int?
        public var warmup: Int?
        public var cpus: String?
        public var node: Int?
        /// `--guest` values: run everything inside each (one result document per guest).
        public var guests: [String] = []
        public init(targets: [String], sets: [String] = [], repeats: Int? = nil, warmup: Int? = nil, cpus: String? = nil, node: Int? = nil,
                    guests: [String] = []) {
            self.targets = targets
            self.sets = sets
            self.repeats = repeats
            self.warmup = warmup
            self.cpus = cpus
            self.node = node
            self.guests = guests
        }
    }

    /// The runs, and where they execute: each guest in turn (empty: this machine).
    public struct Plan: Sendable {
        public var requests: [RunRequest]
        public var guests: [GuestSpec]
    }

    /// What a placement is checked against: this machine, or a guest's CPUs and nodes.
    struct Topology {
        var cpus: Set<Int>
        var nodes: Int
        var name: String
        static var host: Topology { Topology(cpus: System.onlineCPUSet, nodes: NUMA.nodeCount, name: "this machine") }
        init(cpus: Set<Int>, nodes: Int, name: String) { self.cpus = cpus; self.nodes = nodes; self.name = name }
        init(_ g: GuestSpec) {
            self = g.isHost ? .host : Topology(cpus: Set(0..<g.cpus), nodes: g.numaNodes, name: "the guest (\(g.topologyDescription))")
        }
    }

    public static func make(_ o: Options, registry: Registry,
                            loadFile: (String) throws(UsageError) -> ScenarioFile = { (p) throws(UsageError) in try ScenarioFile.load(path: p) })
        throws(UsageError) -> [RunRequest] {
        try makePlan(o, registry: registry, loadFile: loadFile).requests
    }

    public static func makePlan(_ o: Options, registry: Registry,
                                loadFile: (String) throws(UsageError) -> ScenarioFile = { (p) throws(UsageError) in try ScenarioFile.load(path: p) })
        throws(UsageError) -> Plan {
        var guests: [GuestSpec] = []
        for g in o.guests { guests.append(try GuestSpec.parse(g)) }
        return try plan(o, guests: guests, registry: registry, loadFile: loadFile)
    }

    static func plan(_ o: Options, guests given: [GuestSpec], registry: Registry,
                     loadFile: (String) throws(UsageError) -> ScenarioFile) throws(UsageError) -> Plan {
        var guests = given
        if let r = o.repeats, !(1...1000).contains(r) { throw UsageError("--repeat must be 1...1000 (got \(r))") }
        if let w = o.warmup, !(0...100).contains(w) { throw UsageError("--warmup must be 0...100 (got \(w))") }
        if o.targets.isEmpty { throw UsageError("no target: name a scenario (see `memlab list`) or a scenario file") }
        if o.guests.count > maxGuests { throw UsageError("--guest is given \(o.guests.count) times; at most \(maxGuests)") }
        // The files' guests, when the command line names none (every file must name the same).
        var fileGuests: [GuestSpec]?
        var files: [String: ScenarioFile] = [:]
        for target in o.targets where target.hasSuffix(".toml") && files[target] == nil {
            let f = try loadFile(target)
            files[target] = f
            guard !f.guests.isEmpty else { continue }
            if let earlier = fileGuests, earlier != f.guests {
                throw UsageError("\(target): its [guest] differs from another file's; run them separately or give --guest")
            }
            fileGuests = f.guests
        }
        if guests.isEmpty { guests = fileGuests ?? [] }
        let topologies = guests.isEmpty ? [Topology.host] : guests.map(Topology.init)
        let cpuList = try o.cpus.map { (t) throws(UsageError) in try cpus(t, what: "--cpus", on: topologies) }
        if let n = o.node { try checkNode(n, what: "--node", on: topologies) }
        let settings = try parseSets(o.sets)
        return try Planning.with(anotherMachine: guests.contains { !$0.isHost }) { () throws(UsageError) -> Plan in
            try expand(o, files: files, guests: guests, cpuList: cpuList, settings: settings, topologies: topologies, registry: registry)
        }
    }

    static func expand(_ o: Options, files: [String: ScenarioFile], guests: [GuestSpec], cpuList: [Int]?, settings: [(String, String)],
                       topologies: [Topology], registry: Registry) throws(UsageError) -> Plan {
        var requests: [RunRequest] = []
        var group = 0
        func add(_ scenario: any Scenario, _ variant: String, _ split: (fixed: [String: ParamValue], axes: [SweepAxis]),
                 repetitions: Int, warmup: Int, placement: Placement) throws(UsageError) {
            // Sized before it is expanded: the product of the axes and what is planned already.
            let points = try Sweep.pointCount(split.axes)
            if points > Sweep.maxPoints - requests.count {
                throw UsageError("\(requests.count + points > Sweep.maxPoints ? "more than \(Sweep.maxPoints)" : "\(requests.count + points)") runs planned; at most \(Sweep.maxPoints)")
            }
            if !split.axes.isEmpty { group += 1 }
            for (params, sweep) in try Sweep.expand(scenario, variant: variant, fixed: split.fixed, axes: split.axes, group: group) {
                var r = RunRequest(scenario: scenario, variant: variant, params: params, repetitions: repetitions,
                                   warmup: warmup, placement: placement)
                r.sweep = sweep
                requests.append(r)
            }
        }
        for target in o.targets {
            if target.hasSuffix(".toml") {
                let file = files[target]!
                for e in file.entries {
                    let (scenario, variant) = try registry.lookup(e.variant.map { "\(e.scenario):\($0)" } ?? e.scenario)
                    let split = Sweep.merge(try Sweep.split(e, for: scenario), over: try Sweep.split(settings, for: scenario))
                    if let n = e.node { try checkNode(n, what: "\(target): node", on: topologies) }
                    if let c = e.cpus { try checkOnline(c, what: "\(target): cpus", on: topologies) }
                    try add(scenario, variant, split, repetitions: o.repeats ?? e.repeats ?? 3, warmup: o.warmup ?? e.warmup ?? 0,
                            placement: Placement(cpus: cpuList ?? e.cpus, node: o.node ?? e.node))
                }
            } else {
                let (scenario, variant) = try registry.lookup(target)
                try add(scenario, variant, try Sweep.split(settings, for: scenario), repetitions: o.repeats ?? 3,
                        warmup: o.warmup ?? 0, placement: Placement(cpus: cpuList, node: o.node))
            }
        }
        return Plan(requests: requests, guests: guests)
    }

    /// A kernel comparison is a handful of kernels, not a sweep.
    public static let maxGuests = 8

    /// `NAME=VALUE` pairs in order; a parameter given twice is an error (the second would
    /// silently win otherwise).
    public static func parseSets(_ sets: [String]) throws(UsageError) -> [(String, String)] {
        var out: [(String, String)] = []
        for s in sets {
            guard let eq = s.firstIndex(of: "="), eq != s.startIndex else {
                throw UsageError("--set '\(s)': expected NAME=VALUE (a sweep: NAME=A,B,C or NAME=LO..HI xFACTOR)")
            }
            let name = String(s[..<eq]), value = String(s[s.index(after: eq)...])
            if let earlier = out.first(where: { $0.0 == name }) {
                throw UsageError("--set \(name) is given twice ('\(earlier.1)' and '\(value)'); give it once (a sweep: \(name)=A,B)")
            }
            out.append((name, value))
        }
        return out
    }

    /// "0,2-3" -> [0, 2, 3], each an online CPU.
    public static func cpus(_ text: String, what: String) throws(UsageError) -> [Int] {
        try cpus(text, what: what, on: [.host])
    }

    static func cpus(_ text: String, what: String, on topologies: [Topology]) throws(UsageError) -> [Int] {
        let list: [Int]
        do { list = try CPUList.parse(text) } catch {
            throw UsageError("\(what) '\(text)': \(error); expected a list like 0 or 0,1 or 0-1")
        }
        try checkOnline(list, what: what, on: topologies)
        return list
    }

    static func checkOnline(_ cpus: [Int], what: String, on topologies: [Topology] = [.host]) throws(UsageError) {
        if cpus.isEmpty { throw UsageError("\(what): an empty list") }
        for t in topologies {
            if let bad = cpus.first(where: { !t.cpus.contains($0) }) {
                throw UsageError("\(what): CPU \(bad) is not online on \(t.name); online CPUs: \(describe(t.cpus))")
            }
        }
    }

    static func checkNode(_ n: Int, what: String, on topologies: [Topology] = [.host]) throws(UsageError) {
        for t in topologies where n < 0 || n >= t.nodes {
            throw UsageError("\(what) \(n) does not exist; \(t.name) has NUMA node(s) 0-\(t.nodes - 1)")
        }
    }

    /// {0, 1, 2, 5} -> "0-2,5".
    static func describe(_ cpus: Set<Int>) -> String {
        var parts: [String] = []
        var run: (Int, Int)?
        for c in cpus.sorted() {
            if let r = run, c == r.1 + 1 { run = (r.0, c); continue }
            if let r = run { parts.append(r.0 == r.1 ? "\(r.0)" : "\(r.0)-\(r.1)") }
            run = (c, c)
        }
        if let r = run { parts.append(r.0 == r.1 ? "\(r.0)" : "\(r.0)-\(r.1)") }
        return parts.joined(separator: ",")
    }
}
