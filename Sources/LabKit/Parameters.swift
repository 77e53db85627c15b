/// Bad input from the user: unknown scenario or parameter, ill-typed or out-of-range value,
/// malformed scenario file. The CLI prints `message` and exits 2 having changed nothing.
public struct UsageError: Error, CustomStringConvertible, Sendable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// One parameter value, as it appears in a result document's `params`.
public enum ParamValue: Sendable, Hashable, Codable, CustomStringConvertible {
    case int(Int)
    case double(Double)
    case bool(Bool)
    case string(String)

    public init(from decoder: Decoder) throws {
        let c = try decoder.singleValueContainer()
        if let b = try? c.decode(Bool.self) { self = .bool(b) }
        else if let i = try? c.decode(Int.self) { self = .int(i) }
        else if let d = try? c.decode(Double.self) { self = .double(d) }
        else { self = .string(try c.decode(String.self)) }
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.singleValueContainer()
        switch self {
        case .int(let v): try c.encode(v)
        case .double(let v): try c.encode(v)
        case .bool(let v): try c.encode(v)
        case .string(let v): try c.encode(v)
        }
    }

    /// The value as a JSONSerialization-ready object.
    public var jsonValue: Any {
        switch self {
        case .int(let v): return v
        case .double(let v): return v
        case .bool(let v): return v
        case .string(let v): return v
        }
    }

    public var description: String {
        switch self {
        case .int(let v): return String(v)
        case .double(let v): return formatNumber(v)
        case .bool(let v): return v ? "true" : "false"
        case .string(let v): return v
        }
    }
}

/// The unit of a parameter's value: shown in `--help-params` and `memlab list --json`, and
/// recorded per run in the result document (`runs[].param_units`), so the report labels an
/// axis without guessing from the name. `none`: a choice, a flag, text, or a plain number.
public enum ParameterUnit: String, Sendable, Codable, CaseIterable {
    case none, bytes, pages, count, ratio, percent, s, ms, ns
    case mbitPerSecond = "Mbit/s"
    case pagesPerSecond = "pages/s"
    /// Guest memory sizes, as QEMU's -m takes them.
    case mib = "MiB"
}

/// One parameter of a scenario, untyped: name, kind with its allowed range, default, unit and
/// help. Scenarios declare `Parameter<Value>`s (below), each of which makes one of these; the
/// command line, scenario files and sweeps work on these.
public struct ParameterSpec: Sendable {
    public enum Kind: Sendable {
        case int(ClosedRange<Int>)
        /// A byte count; accepts suffixes K, M, G, T (powers of 1024).
        case size(ClosedRange<Int>)
        case double(ClosedRange<Double>)
        case bool
        case choice([String])
        /// Free text (a file path, for instance); the scenario's validate() checks it.
        case text
    }

    public let name: String
    public let kind: Kind
    public let defaultValue: ParamValue
    public let unit: ParameterUnit
    public let help: String

    /// `unit` defaults to bytes for a size and to none otherwise.
    public init(_ name: String, _ kind: Kind, default defaultValue: ParamValue, unit: ParameterUnit? = nil, help: String) {
        self.name = name
        self.kind = kind
        self.defaultValue = defaultValue
        if let unit { self.unit = unit } else if case .size = kind { self.unit = .bytes } else { self.unit = .none }
        self.help = help
    }

    /// "int 1...100000", "choice madvise|prctl" — for help and error messages.
    public var typeDescription: String {
        switch kind {
        case .int(let r): return "integer \(r.lowerBound)...\(r.upperBound)"
        case .size(let r): return "size \(formatBytes(r.lowerBound))...\(formatBytes(r.upperBound)) (suffix K, M, G)"
        case .double(let r): return "number \(formatNumber(r.lowerBound))...\(formatNumber(r.upperBound))"
        case .bool: return "true|false"
        case .choice(let c): return c.joined(separator: "|")
        case .text: return "text"
        }
    }

    /// Parses a value given on the command line (`--set name=text`).
    public func parse(_ text: String) throws(UsageError) -> ParamValue {
        let t = text.trimmingCharacters(in: " ")
        switch kind {
        case .int:
            guard let v = Int(t) else { throw bad(text, "is not an integer") }
            return try accept(.int(v))
        case .size:
            guard let v = parseSize(t) else { throw bad(text, "is not a size (e.g. 4096, 64K, 256M, 2G)") }
            return try accept(.int(v))
        case .double:
            guard let v = Double(t), v.isFinite else { throw bad(text, "is not a number") }
            return try accept(.double(v))
        case .bool:
            switch t.lowercased() {
            case "true", "1", "yes", "on": return .bool(true)
            case "false", "0", "no", "off": return .bool(false)
            default: throw bad(text, "is not true or false")
            }
        case .choice, .text:
            return try accept(.string(t))
        }
    }

    /// Checks a typed value (from a scenario file or a parsed flag): type and range.
    public func accept(_ value: ParamValue) throws(UsageError) -> ParamValue {
        switch (kind, value) {
        case (.int(let r), .int(let v)), (.size(let r), .int(let v)):
            guard r.contains(v) else { throw bad(value.description, "is out of range") }
            return .int(v)
        case (.size, .string(let s)):
            return try parse(s)
        case (.double(let r), .double(let v)):
            guard r.contains(v) else { throw bad(value.description, "is out of range") }
            return .double(v)
        case (.double, .int(let v)):
            return try accept(.double(Double(v)))
        case (.bool, .bool):
            return value
        case (.text, .string):
            return value
        case (.choice(let choices), .string(let s)):
            guard choices.contains(s) else { throw bad(s, "is not one of the choices") }
            return value
        default:
            throw bad(value.description, "has the wrong type")
        }
    }

    private func bad(_ text: String, _ what: String) -> UsageError {
        UsageError("parameter '\(name)': '\(text)' \(what); expected \(typeDescription)")
    }
}

/// Parses "4096", "64K", "256M", "2G", "1T" (powers of 1024; optional trailing "B" or "iB").
public func parseSize(_ text: String) -> Int? {
    var t = text.uppercased()
    if t.hasSuffix("IB") { t.removeLast(2) } else if t.hasSuffix("B") { t.removeLast() }
    let multipliers: [Character: Int] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40]
    if let last = t.last, let m = multipliers[last] {
        guard let v = Int(t.dropLast()), v >= 0, v <= Int.max / m else { return nil }
        return v * m
    }
    guard let v = Int(t), v >= 0 else { return nil }
    return v
}

/// The resolved parameters of one run: every declared parameter has a value.
public struct Params: Sendable, Hashable, Codable {
    public var values: [String: ParamValue]

    public init(_ values: [String: ParamValue] = [:]) { self.values = values }

    public init(from decoder: Decoder) throws {
        values = try decoder.singleValueContainer().decode([String: ParamValue].self)
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.singleValueContainer()
        try c.encode(values)
    }

    public subscript(_ name: String) -> ParamValue? { values[name] }

    /// Defaults, overridden by `overrides` (already validated against the specs).
    public static func resolve(_ specs: [ParameterSpec], overrides: [String: ParamValue]) -> Params {
        var v: [String: ParamValue] = [:]
        for s in specs { v[s.name] = overrides[s.name] ?? s.defaultValue }
        return Params(v)
    }
}

extension String {
    func trimmingCharacters(in set: Character) -> String {
        var s = Substring(self)
        while s.first == set || s.first == "\t" || s.first == "\n" { s.removeFirst() }
        while s.last == set || s.last == "\t" || s.last == "\n" { s.removeLast() }
        return String(s)
    }
}
