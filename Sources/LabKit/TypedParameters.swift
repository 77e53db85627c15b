import LinuxMM

/// Typed parameters: a scenario declares each parameter once, as a stored property of its
/// `ParameterSet`, and reads it as a typed value — `p.pages` is an `Int`, `p.mode` an enum —
/// so a misspelt name does not compile and no read can trap:
///
///     public struct Parameters: ParameterSet {
///         public init() {}
///         let pages = Parameter<Int>("pages", 16...4_194_304, default: 8192, unit: .pages, help: "size of the region")
///         let mode = Parameter<Mode>("mode", default: .madvise, help: "how the region opts in")
///     }
///     public enum Mode: String, CaseIterable, ParameterChoice { case madvise, prctl }
///
/// The command line, scenario files and sweeps keep working on the untyped `ParameterSpec`s
/// the declarations make; a run's `Params` are decoded into `ParameterValues` once, where a
/// scenario is called (see `TypedScenario`).

/// A type a parameter's value can have: Int (counts, and sizes in bytes), Double, Bool,
/// String (free text) and choices (`ParameterChoice`).
public protocol ParameterValue: Sendable {
    /// The value held by an accepted `ParamValue` (`ParameterSpec.accept`), or nil.
    init?(parameterValue: ParamValue)
    var parameterValue: ParamValue { get }
}

extension Int: ParameterValue {
    public init?(parameterValue v: ParamValue) {
        guard case .int(let i) = v else { return nil }
        self = i
    }
    public var parameterValue: ParamValue { .int(self) }
}

extension Double: ParameterValue {
    /// A whole number arrives as an int (a scenario file's `ratio = 1`; a result document).
    public init?(parameterValue v: ParamValue) {
        switch v {
        case .double(let d): self = d
        case .int(let i): self = Double(i)
        default: return nil
        }
    }
    public var parameterValue: ParamValue { .double(self) }
}

extension Bool: ParameterValue {
    public init?(parameterValue v: ParamValue) {
        guard case .bool(let b) = v else { return nil }
        self = b
    }
    public var parameterValue: ParamValue { .bool(self) }
}

extension String: ParameterValue {
    public init?(parameterValue v: ParamValue) {
        guard case .string(let s) = v else { return nil }
        self = s
    }
    public var parameterValue: ParamValue { .string(self) }
}

/// A parameter with a fixed list of values, written as text. A `String`-backed
/// `CaseIterable` enum gets everything from its cases; a type whose list depends on the
/// machine (the page kinds this kernel offers) gives `choices` and `init?(choice:)` itself.
public protocol ParameterChoice: ParameterValue {
    static var choices: [String] { get }
    init?(choice: String)
    var choice: String { get }
}

extension ParameterChoice {
    public init?(parameterValue v: ParamValue) {
        guard case .string(let s) = v else { return nil }
        self.init(choice: s)
    }
    public var parameterValue: ParamValue { .string(choice) }
}

extension ParameterChoice where Self: RawRepresentable, RawValue == String {
    public init?(choice: String) { self.init(rawValue: choice) }
    public var choice: String { rawValue }
}

extension ParameterChoice where Self: CaseIterable & RawRepresentable, RawValue == String {
    public static var choices: [String] { allCases.map(\.rawValue) }
}

/// A parameter of any value type: what a `ParameterSet` is made of.
public protocol AnyParameter: Sendable {
    var spec: ParameterSpec { get }
    /// Checks `value` against the declaration (type, range, choices) and returns it typed.
    func decodeAny(_ value: ParamValue) throws(UsageError) -> any Sendable
}

/// One declared parameter: its name, type, range or choices, default, unit and help. The
/// value type is part of the declaration, so a read gives that type.
public struct Parameter<Value: ParameterValue>: AnyParameter {
    public let spec: ParameterSpec
    public let defaultValue: Value
    public var name: String { spec.name }

    init(spec: ParameterSpec, defaultValue: Value) {
        self.spec = spec
        self.defaultValue = defaultValue
    }

    /// Checks a value (a scenario file's, a result document's, a parsed flag's) and returns it typed.
    public func decode(_ value: ParamValue) throws(UsageError) -> Value {
        let accepted = try spec.accept(value)
        guard let v = Value(parameterValue: accepted) else {
            throw UsageError("parameter '\(name)': '\(value)' has the wrong type; expected \(spec.typeDescription)")
        }
        return v
    }

    /// Parses command-line text (`4096`, `64M`, `madvise`) into a typed value.
    public func parse(_ text: String) throws(UsageError) -> Value { try decode(try spec.parse(text)) }

    public func decodeAny(_ value: ParamValue) throws(UsageError) -> any Sendable { try decode(value) }
}

extension Parameter where Value == Int {
    /// A whole number in `range`. With unit `.bytes` it is a size: written 4096, 64K, 256M, 2G.
    public init(_ name: String, _ range: ClosedRange<Int>, default value: Int, unit: ParameterUnit, help: String) {
        self.init(spec: ParameterSpec(name, unit == .bytes ? .size(range) : .int(range), default: .int(value), unit: unit, help: help),
                  defaultValue: value)
    }
}

extension Parameter where Value == Double {
    /// A number in `range`.
    public init(_ name: String, _ range: ClosedRange<Double>, default value: Double, unit: ParameterUnit, help: String) {
        self.init(spec: ParameterSpec(name, .double(range), default: .double(value), unit: unit, help: help), defaultValue: value)
    }
}

extension Parameter where Value == Bool {
    /// true or false (also 1/0, yes/no, on/off on the command line).
    public init(_ name: String, default value: Bool, help: String) {
        self.init(spec: ParameterSpec(name, .bool, default: .bool(value), unit: ParameterUnit.none, help: help), defaultValue: value)
    }
}

extension Parameter where Value == String {
    /// Free text (a path, an address); the scenario's validate checks what it means.
    public init(_ name: String, text value: String, help: String) {
        self.init(spec: ParameterSpec(name, .text, default: .string(value), unit: ParameterUnit.none, help: help), defaultValue: value)
    }
}

extension Parameter where Value: ParameterChoice {
    /// One of `Value.choices`.
    public init(_ name: String, default value: Value, help: String) {
        self.init(spec: ParameterSpec(name, .choice(Value.choices), default: .string(value.choice), unit: ParameterUnit.none, help: help),
                  defaultValue: value)
    }
}

/// A scenario's parameters: a struct whose stored properties are its `Parameter`s, in the
/// order `--help-params` lists them. Each is declared once, there; nothing else names it.
public protocol ParameterSet: Sendable {
    init()
}

/// Each ParameterSet made and read by reflection once per type: `parameters` is asked for on
/// every name a plan resolves (a sweep of 1000 points, the fuzzer's millions of inputs), and
/// making the set evaluates its help texts (some read sysfs: the mTHP sizes) — once per ask
/// made the planner some forty times slower.
private let declaredCache = Lock<[ObjectIdentifier: (set: any ParameterSet, declared: [any AnyParameter])]>([:])

extension ParameterSet {
    /// The set itself (its properties are the declarations), made once.
    static var shared: Self { cached.set as! Self }

    /// The declared parameters, in declaration order.
    public static var declared: [any AnyParameter] { cached.declared }

    private static var cached: (set: any ParameterSet, declared: [any AnyParameter]) {
        if let c = declaredCache.withLock({ $0[ObjectIdentifier(Self.self)] }) { return c }
        let set = Self()
        let c: (set: any ParameterSet, declared: [any AnyParameter]) = (set, Mirror(reflecting: set).children.compactMap { $0.value as? any AnyParameter })
        declaredCache.withLock { $0[ObjectIdentifier(Self.self)] = c }
        return c
    }

    public static var specs: [ParameterSpec] { declared.map(\.spec) }
}

/// A run's parameters, decoded once: every declared parameter as a value of its own type.
/// Read with the declaration's property name — `p.pages`, `p.mode` — which the compiler checks.
@dynamicMemberLookup
public struct ParameterValues<S: ParameterSet>: Sendable {
    /// The values as the result document holds them.
    public let params: Params
    private let keys: S
    private let values: [String: any Sendable]

    /// Decodes `params`: each declared parameter must be present and acceptable (a usage
    /// error names the first that is not); names not declared are ignored here (the
    /// scenario's `check` refuses them).
    public init(_ params: Params) throws(UsageError) {
        let keys = S.shared
        var values: [String: any Sendable] = [:]
        for p in S.declared {
            guard let v = params[p.spec.name] else { throw UsageError("parameter '\(p.spec.name)' has no value") }
            values[p.spec.name] = try p.decodeAny(v)
        }
        self.params = params
        self.keys = keys
        self.values = values
    }

    public subscript<V>(dynamicMember key: KeyPath<S, Parameter<V>>) -> V {
        let p = keys[keyPath: key]
        // Always present: init decoded every declared parameter.
        return values[p.name] as? V ?? p.defaultValue
    }
}
