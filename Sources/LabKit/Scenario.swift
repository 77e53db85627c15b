import LinuxMM

/// A variant of a scenario: one experiment with its own metrics.
public struct Variant: Sendable {
    public let name: String
    public let summary: String
    public init(_ name: String, _ summary: String) {
        self.name = name
        self.summary = summary
    }
}

/// Whether a scenario can run here, and if not, why and what would enable it.
public enum Availability: Sendable, Equatable {
    case usable
    case unusable(String)
}

/// A machine-wide setting a run borrows: the runner writes it through the settings guard
/// before the first repetition and restores it after the last.
public struct KnobSetting: Sendable, Equatable {
    public let knob: Knob
    public let value: String
    /// A capacity the kernel may not be able to provide (a hugetlb pool on fragmented memory):
    /// when it reads back short, the run is `skipped` with the reason, not `failed`.
    public let isCapacity: Bool
    public init(_ knob: Knob, _ value: String, isCapacity: Bool = false) {
        self.knob = knob
        self.value = value
        self.isCapacity = isCapacity
    }
}

/// Thrown from `run` (in the child) to end a repetition as skipped or failed with a reason.
public enum ScenarioError: Error, CustomStringConvertible {
    case skipped(String)
    case failed(String)
    public var description: String {
        switch self {
        case .skipped(let r): return "skipped: \(r)"
        case .failed(let r): return r
        }
    }
}

/// One experiment module. Everything but `run` is called in the runner (parent); `run` is
/// called in a child process, once per repetition, and records what it measured into the
/// context. A scenario never prints and never writes a machine-wide knob itself.
public protocol Scenario: Sendable {
    var id: String { get }
    var summary: String { get }
    var variants: [Variant] { get }
    var parameters: [ParameterSpec] { get }
    /// Root is needed to borrow knobs; without it the run is `skipped`.
    var requiresRoot: Bool { get }

    /// Usable on this host, or why not (feature missing from the kernel, …).
    func probe(variant: String) -> Availability
    /// The same with the run's parameters (e.g. a page size the kernel may lack); by default
    /// the variant's answer.
    func probe(variant: String, params: Params) -> Availability
    /// Cross-parameter checks beyond each parameter's own range (exit 2 when violated).
    func validate(variant: String, params: Params) throws(UsageError)
    /// Machine-wide settings to borrow for this run.
    func settings(variant: String, params: Params) -> [KnobSetting]
    /// Seconds a repetition may take before the runner kills it.
    func deadline(variant: String, params: Params) -> Double
    /// When non-nil, each repetition runs in a fresh memory cgroup with this limit (bytes).
    func memoryLimit(variant: String, params: Params) -> Int?
    /// Whether that cgroup may swap (zswap, density: paging out is the point). By default
    /// not: swap is capped with the limit (v1 memsw or swappiness 0, v2 swap.max 0), so
    /// touching past the limit ends in the OOM killer even where swap is on.
    func memoryLimitAllowsSwap(variant: String, params: Params) -> Bool
    /// Machine-wide resources beyond knobs that the run needs (a swap file, a zram device),
    /// made by the runner (parent) after `settings` are borrowed and before the first
    /// repetition — only through the guard's journaled calls, so they are removed after the
    /// run, on signals, and by the next memlab start. Throw `ScenarioError.skipped` when the
    /// machine cannot provide them.
    func prepare(variant: String, params: Params, settingsGuard: SettingsGuard) throws
    /// One repetition, in the child process.
    func run(_ context: RunContext) throws
}

extension Scenario {
    public var requiresRoot: Bool { true }
    public func probe(variant: String) -> Availability { .usable }
    public func probe(variant: String, params: Params) -> Availability { probe(variant: variant) }
    public func validate(variant: String, params: Params) throws(UsageError) {}
    public func settings(variant: String, params: Params) -> [KnobSetting] { [] }
    public func deadline(variant: String, params: Params) -> Double { 120 }
    public func memoryLimit(variant: String, params: Params) -> Int? { nil }
    public func memoryLimitAllowsSwap(variant: String, params: Params) -> Bool { false }
    public func prepare(variant: String, params: Params, settingsGuard: SettingsGuard) throws {}

    public func variant(named name: String) -> Variant? { variants.first { $0.name == name } }

    /// Resolves `name=value` overrides against the declared parameters: unknown names and bad
    /// values are usage errors naming the parameter and what it accepts.
    public func resolve(variant: String, overrides: [String: ParamValue]) throws(UsageError) -> Params {
        var checked: [String: ParamValue] = [:]
        for (name, value) in overrides {
            guard let spec = parameters.first(where: { $0.name == name }) else {
                let known = parameters.map(\.name).joined(separator: ", ")
                throw UsageError("scenario '\(id)' has no parameter '\(name)'; its parameters are: \(known)")
            }
            checked[name] = try spec.accept(value)
        }
        let params = Params.resolve(parameters, overrides: checked)
        try validate(variant: variant, params: params)
        return params
    }

    /// Parses one command-line value for a named parameter.
    public func parse(parameter name: String, _ text: String) throws(UsageError) -> ParamValue {
        guard let spec = parameters.first(where: { $0.name == name }) else {
            let known = parameters.map(\.name).joined(separator: ", ")
            throw UsageError("scenario '\(id)' has no parameter '\(name)'; its parameters are: \(known)")
        }
        return try spec.parse(text)
    }

    public func resolve(variant: String, text: [String: String]) throws(UsageError) -> Params {
        var typed: [String: ParamValue] = [:]
        for (name, value) in text {
            guard let spec = parameters.first(where: { $0.name == name }) else {
                let known = parameters.map(\.name).joined(separator: ", ")
                throw UsageError("scenario '\(id)' has no parameter '\(name)'; its parameters are: \(known)")
            }
            typed[name] = try spec.parse(value)
        }
        return try resolve(variant: variant, overrides: typed)
    }
}

/// The scenarios memlab knows, by id.
public struct Registry: Sendable {
    public let scenarios: [any Scenario]
    public init(_ scenarios: [any Scenario]) { self.scenarios = scenarios }

    public func scenario(_ id: String) -> (any Scenario)? { scenarios.first { $0.id == id } }

    /// "ksm" or "ksm:merge" -> (scenario, variant); the variant defaults to the first one.
    public func lookup(_ name: String) throws(UsageError) -> (any Scenario, String) {
        let parts = name.split(separator: ":", maxSplits: 1).map(String.init)
        guard let id = parts.first, let s = scenario(id) else {
            throw UsageError("unknown scenario '\(name)'; known scenarios: \(scenarios.map(\.id).joined(separator: ", ")) (see `memlab list`)")
        }
        let variant = parts.count > 1 ? parts[1] : s.variants[0].name
        guard s.variant(named: variant) != nil else {
            throw UsageError("scenario '\(id)' has no variant '\(variant)'; its variants are: \(s.variants.map(\.name).joined(separator: ", "))")
        }
        return (s, variant)
    }
}
