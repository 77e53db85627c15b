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

    /// The declared parameter called `name`; any other name is a usage error that lists them.
    /// The one place that error is made.
    public func parameter(named name: String) throws(UsageError) -> ParameterSpec {
        guard let spec = parameters.first(where: { $0.name == name }) else {
            let known = parameters.map(\.name).joined(separator: ", ")
            throw UsageError("scenario '\(id)' has no parameter '\(name)'; its parameters are: \(known)")
        }
        return spec
    }

    /// Resolves `name=value` overrides against the declared parameters: unknown names and bad
    /// values are usage errors naming the parameter and what it accepts.
    public func resolve(variant: String, overrides: [String: ParamValue]) throws(UsageError) -> Params {
        var checked: [String: ParamValue] = [:]
        for (name, value) in overrides { checked[name] = try parameter(named: name).accept(value) }
        let params = Params.resolve(parameters, overrides: checked)
        try validate(variant: variant, params: params)
        return params
    }

    /// Parses one command-line value for a named parameter.
    public func parse(parameter name: String, _ text: String) throws(UsageError) -> ParamValue {
        try parameter(named: name).parse(text)
    }

    public func resolve(variant: String, text: [String: String]) throws(UsageError) -> Params {
        var typed: [String: ParamValue] = [:]
        for (name, value) in text { typed[name] = try parse(parameter: name, value) }
        return try resolve(variant: variant, overrides: typed)
    }

    /// What the runner checks before it starts anything: a variant of this scenario, and
    /// resolved parameters — every declared one present and acceptable, no other. (`resolve`
    /// makes such parameters; this refuses a request made any other way.)
    public func check(variant: String, params: Params) throws(UsageError) {
        guard self.variant(named: variant) != nil else {
            throw UsageError("scenario '\(id)' has no variant '\(variant)'; its variants are: \(variants.map(\.name).joined(separator: ", "))")
        }
        for name in params.values.keys.sorted() { _ = try parameter(named: name) }
        for spec in parameters {
            guard let v = params[spec.name] else { throw UsageError("parameter '\(spec.name)' has no value") }
            _ = try spec.accept(v)
        }
    }

    /// The unit of each declared parameter, as the result document records it (`param_units`).
    public var parameterUnits: [String: String] {
        Dictionary(parameters.map { ($0.name, $0.unit.rawValue) }, uniquingKeysWith: { a, _ in a })
    }
}

/// A scenario's variants as an enum: `enum Variant: String, ScenarioVariant { case merge, cow }`,
/// in the order `memlab list` shows them (the first is the default). Names with a dash are
/// written `case hugetlbReserve = "hugetlb-reserve"`.
public protocol ScenarioVariant: RawRepresentable, CaseIterable, Sendable where RawValue == String {
    /// One line for `memlab list`.
    var summary: String { get }
}

/// A scenario with typed variants and parameters: what every built-in scenario is, and what a
/// new one should be. It implements the typed hooks it needs (all but `run` have defaults);
/// the string-facing `Scenario` requirements — used by the runner, the CLI and scenario files
/// — come from the extension below, which decodes the variant and the parameters once per
/// call: a name that is not declared cannot reach the scenario's code.
///
///     public struct MyScenario: TypedScenario {
///         public init() {}
///         public let id = "mine", summary = "…"
///         public enum Variant: String, ScenarioVariant { case fill; public var summary: String { "…" } }
///         public struct Parameters: ParameterSet { public init() {}; let size = Parameter<Int>(…) }
///         public func run(_ ctx: RunContext, _ variant: Variant, _ p: Values) throws { … p.size … }
///     }
public protocol TypedScenario: Scenario {
    associatedtype Variant: ScenarioVariant
    associatedtype Parameters: ParameterSet

    func probe(_ variant: Variant) -> Availability
    func probe(_ variant: Variant, _ p: ParameterValues<Parameters>) -> Availability
    func validate(_ variant: Variant, _ p: ParameterValues<Parameters>) throws(UsageError)
    func settings(_ variant: Variant, _ p: ParameterValues<Parameters>) -> [KnobSetting]
    func deadline(_ variant: Variant, _ p: ParameterValues<Parameters>) -> Double
    func memoryLimit(_ variant: Variant, _ p: ParameterValues<Parameters>) -> Int?
    func memoryLimitAllowsSwap(_ variant: Variant, _ p: ParameterValues<Parameters>) -> Bool
    func prepare(_ variant: Variant, _ p: ParameterValues<Parameters>, settingsGuard: SettingsGuard) throws
    /// One repetition, in the child process.
    func run(_ ctx: RunContext, _ variant: Variant, _ p: ParameterValues<Parameters>) throws
}

extension TypedScenario {
    public typealias Values = ParameterValues<Parameters>

    public var variants: [LabKit.Variant] { Variant.allCases.map { LabKit.Variant($0.rawValue, $0.summary) } }
    public var parameters: [ParameterSpec] { Parameters.specs }

    // The typed hooks' defaults: those of `Scenario`.
    public func probe(_ variant: Variant) -> Availability { .usable }
    public func probe(_ variant: Variant, _ p: Values) -> Availability { probe(variant) }
    public func validate(_ variant: Variant, _ p: Values) throws(UsageError) {}
    public func settings(_ variant: Variant, _ p: Values) -> [KnobSetting] { [] }
    public func deadline(_ variant: Variant, _ p: Values) -> Double { 120 }
    public func memoryLimit(_ variant: Variant, _ p: Values) -> Int? { nil }
    public func memoryLimitAllowsSwap(_ variant: Variant, _ p: Values) -> Bool { false }
    public func prepare(_ variant: Variant, _ p: Values, settingsGuard: SettingsGuard) throws {}

    /// The variant and parameters of a run, typed: the one place names become values.
    public func decode(variant: String, params: Params) throws(UsageError) -> (Variant, Values) {
        guard let v = Variant(rawValue: variant) else {
            throw UsageError("scenario '\(id)' has no variant '\(variant)'; its variants are: \(Variant.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        return (v, try Values(params))
    }

    // The string-facing requirements. The runner calls `check` first (a request that does not
    // decode fails there, with the reason), so the fallbacks below the decodes are not reached.
    public func probe(variant: String) -> Availability {
        guard let v = Variant(rawValue: variant) else { return .unusable("scenario '\(id)' has no variant '\(variant)'") }
        return probe(v)
    }
    public func probe(variant: String, params: Params) -> Availability {
        do throws(UsageError) {
            let (v, p) = try decode(variant: variant, params: params)
            return probe(v, p)
        } catch {
            return .unusable(error.message)
        }
    }
    public func validate(variant: String, params: Params) throws(UsageError) {
        let (v, p) = try decode(variant: variant, params: params)
        try validate(v, p)
    }
    public func settings(variant: String, params: Params) -> [KnobSetting] {
        guard let d = try? decode(variant: variant, params: params) else { return [] }
        return settings(d.0, d.1)
    }
    public func deadline(variant: String, params: Params) -> Double {
        guard let d = try? decode(variant: variant, params: params) else { return 120 }
        return deadline(d.0, d.1)
    }
    public func memoryLimit(variant: String, params: Params) -> Int? {
        guard let d = try? decode(variant: variant, params: params) else { return nil }
        return memoryLimit(d.0, d.1)
    }
    public func memoryLimitAllowsSwap(variant: String, params: Params) -> Bool {
        guard let d = try? decode(variant: variant, params: params) else { return false }
        return memoryLimitAllowsSwap(d.0, d.1)
    }
    public func prepare(variant: String, params: Params, settingsGuard: SettingsGuard) throws {
        let (v, p) = try decode(variant: variant, params: params)
        try prepare(v, p, settingsGuard: settingsGuard)
    }
    /// Decodes the run's variant and parameters once, in the child, and runs it.
    public func run(_ context: RunContext) throws {
        let decoded: (Variant, Values)
        do throws(UsageError) { decoded = try decode(variant: context.variant, params: context.params) } catch {
            throw ScenarioError.failed("parameters: \(error.message)")
        }
        try run(context, decoded.0, decoded.1)
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
