#if canImport(Glibc)
import Glibc
#endif
import Foundation
import TOMLKit

/// A scenario file (scenarios/*.toml): one run at the top level, or several as [[runs]].
/// The format is documented in scenarios/README.md. Any key memlab does not know is an
/// error, so a typo never silently runs with a default.
public struct ScenarioFile: Sendable {
    public struct Entry: Sendable, Equatable {
        public var scenario: String
        public var variant: String?
        public var params: [String: ParamValue] = [:]
        /// Parameters given as a TOML array (`pages = [1024, 4096]`): a sweep, values unchecked.
        public var sweeps: [SweepAxis] = []
        public var repeats: Int?
        public var warmup: Int?
        public var cpus: [Int]?
        public var node: Int?
    }

    public var entries: [Entry]
    /// `[guest]`: where every run of the file executes (one document per kernel when
    /// `kernel` is a list); empty: this machine.
    public var guests: [GuestSpec] = []

    /// A scenario file is a page or two of TOML; anything much larger is not one.
    public static let maxBytes = 1 << 20

    public static func load(path: String) throws(UsageError) -> ScenarioFile {
        var st = stat()
        if stat(path, &st) == 0 && (st.st_mode & S_IFMT) != S_IFREG {
            throw UsageError("scenario file '\(path)' is not a regular file")
        }
        if st.st_size > maxBytes { throw UsageError("\(path): \(st.st_size) bytes; a scenario file is at most \(maxBytes)") }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw UsageError("cannot read scenario file '\(path)'")
        }
        // A relative kernel path in [guest] is the file's neighbour, wherever memlab runs.
        return try parse(bytes: [UInt8](data), name: path, directory: (path as NSString).deletingLastPathComponent)
    }

    /// Checks what the TOML parser cannot be trusted with — it reads a C string, so a NUL
    /// would silently end the file there — then parses.
    public static func parse(bytes: [UInt8], name: String = "scenario file", directory: String? = nil) throws(UsageError) -> ScenarioFile {
        if bytes.count > maxBytes { throw UsageError("\(name): \(bytes.count) bytes; a scenario file is at most \(maxBytes)") }
        guard let text = String(validating: bytes, as: UTF8.self) else {
            throw UsageError("\(name): not UTF-8 text")
        }
        return try parse(text, name: name, directory: directory)
    }

    public static func parse(_ text: String, name: String = "scenario file", directory: String? = nil) throws(UsageError) -> ScenarioFile {
        if let nul = text.utf8.firstIndex(of: 0) {
            let line = text.utf8[..<nul].filter { $0 == 0x0A }.count + 1
            throw UsageError("\(name): line \(line): a NUL byte (at byte \(text.utf8.distance(from: text.utf8.startIndex, to: nul))); a scenario file is text")
        }
        if text.utf8.count > maxBytes { throw UsageError("\(name): \(text.utf8.count) bytes; a scenario file is at most \(maxBytes)") }
        do throws(TOMLPrecheck.Problem) { try TOMLPrecheck.check(text) } catch {
            throw UsageError("\(name): line \(error.line), column \(error.column): \(error.what)")
        }
        let table: TOMLTable
        do {
            table = try TOMLTable(string: text)
        } catch let e as TOMLParseError {
            throw UsageError("\(name): line \(e.source.begin.line), column \(e.source.begin.column): \(e.description)")
        } catch {
            throw UsageError("\(name): \(error)")
        }
        if let runs = table["runs"] {
            guard let array = runs.array else { throw UsageError("\(name): 'runs' must be an array of tables ([[runs]])") }
            let extra = table.keys.filter { $0 != "runs" && $0 != "description" && $0 != "guest" }
            if !extra.isEmpty { throw UsageError("\(name): with [[runs]], the only other top-level keys allowed are 'description' and 'guest'; found: \(extra.joined(separator: ", "))") }
            var entries: [Entry] = []
            for (i, item) in array.enumerated() {
                guard let t = item.table else { throw UsageError("\(name): runs[\(i)] is not a table") }
                entries.append(try entry(t, where: "\(name) runs[\(i)]"))
            }
            if entries.isEmpty { throw UsageError("\(name): [[runs]] is empty") }
            return ScenarioFile(entries: entries, guests: try guests(table, where: name, directory: directory))
        }
        return ScenarioFile(entries: [try entry(table, where: name, topLevel: true)], guests: try guests(table, where: name, directory: directory))
    }

    static let guestKeys: Set<String> = ["kernel", "mem", "cpus", "numa", "cgroup", "accel", "append"]

    /// `[guest]` with kernel = "PATH" or a list of kernels (one document each), and the
    /// topology keys of `--guest` (mem = "1G", cpus = 2, numa = 2, cgroup = "v2"), and
    /// append = "kernel parameters" (commas allowed there: it goes last).
    static func guests(_ t: TOMLTable, where name: String, directory: String? = nil) throws(UsageError) -> [GuestSpec] {
        guard let g = t["guest"] else { return [] }
        guard let table = g.table else { throw UsageError("\(name): 'guest' must be a table ([guest])") }
        for key in table.keys where !guestKeys.contains(key) {
            throw UsageError("\(name): [guest]: unknown key '\(key)'; allowed: \(guestKeys.sorted().joined(separator: ", "))")
        }
        var kernels: [String] = []
        if let k = table["kernel"]?.string { kernels = [k] } else if let a = table["kernel"]?.array {
            for x in a {
                guard let k = x.string else { throw UsageError("\(name): [guest] kernel must be a string or a list of strings") }
                kernels.append(k)
            }
        }
        if kernels.isEmpty { throw UsageError("\(name): [guest] needs kernel = \"PATH\" (or a list of kernels, or \"host\")") }
        if kernels.count > RunPlan.maxGuests { throw UsageError("\(name): [guest] names \(kernels.count) kernels; at most \(RunPlan.maxGuests)") }
        var rest: [String] = []
        for key in ["mem", "cpus", "numa", "cgroup", "accel"] {
            guard let v = table[key] else { continue }
            if let x = v.string { rest.append("\(key)=\(x)") } else if let x = v.int { rest.append("\(key)=\(x)") } else {
                throw UsageError("\(name): [guest] \(key) must be a string or an integer")
            }
        }
        var append: [String] = []
        if let v = table["append"] {
            guard let x = v.string else { throw UsageError("\(name): [guest] append must be a string of kernel parameters") }
            append = ["append=\(x)"]
        }
        var out: [GuestSpec] = []
        for k in kernels {
            if k.contains(",") || rest.contains(where: { $0.contains(",") }) { throw UsageError("\(name): [guest] values cannot contain ',' (but append can)") }
            // kernel = "host" in a list is this machine, as it is (the other keys describe the guests).
            let text = k == GuestSpec.hostKernel ? "kernel=host" : (["kernel=\(k)"] + rest + append).joined(separator: ",")
            out.append(try GuestSpec.parse(text, what: "\(name): [guest]", base: directory))
        }
        return out
    }

    static let knownKeys: Set<String> = ["scenario", "variant", "params", "repeat", "warmup", "cpus", "node", "description"]

    /// `topLevel`: the single-run form, where `guest` (the file's, read by `guests`) may sit.
    static func entry(_ t: TOMLTable, where name: String, topLevel: Bool = false) throws(UsageError) -> Entry {
        for key in t.keys where !knownKeys.contains(key) && !(topLevel && key == "guest") {
            throw UsageError("\(name): unknown key '\(key)'; allowed: \(knownKeys.sorted().joined(separator: ", "))")
        }
        guard let scenario = t["scenario"]?.string else {
            throw UsageError("\(name): 'scenario' (a string, e.g. scenario = \"ksm\") is required")
        }
        var e = Entry(scenario: scenario)
        if let v = t["variant"] {
            guard let s = v.string else { throw UsageError("\(name): 'variant' must be a string") }
            e.variant = s
        }
        if let v = t["repeat"] {
            guard let n = v.int, n >= 1, n <= 1000 else { throw UsageError("\(name): 'repeat' must be an integer 1...1000") }
            e.repeats = n
        }
        if let v = t["warmup"] {
            guard let n = v.int, n >= 0, n <= 100 else { throw UsageError("\(name): 'warmup' must be an integer 0...100") }
            e.warmup = n
        }
        if let v = t["node"] {
            guard let n = v.int, n >= 0 else { throw UsageError("\(name): 'node' must be a non-negative integer") }
            e.node = n
        }
        if let v = t["cpus"] {
            guard let a = v.array else { throw UsageError("\(name): 'cpus' must be an array of integers") }
            var cpus: [Int] = []
            for x in a {
                guard let n = x.int, n >= 0 else { throw UsageError("\(name): 'cpus' must be an array of non-negative integers") }
                cpus.append(n)
            }
            e.cpus = cpus
        }
        if let v = t["params"] {
            guard let p = v.table else { throw UsageError("\(name): 'params' must be a table ([params])") }
            for key in p.keys {
                let x = p[key]!
                switch x.type {
                case .int: e.params[key] = .int(x.int!)
                case .double: e.params[key] = .double(x.double!)
                case .bool: e.params[key] = .bool(x.bool!)
                case .string: e.params[key] = .string(x.string!)
                case .array:
                    var values: [ParamValue] = []
                    for item in x.array! {
                        switch item.type {
                        case .int: values.append(.int(item.int!))
                        case .double: values.append(.double(item.double!))
                        case .bool: values.append(.bool(item.bool!))
                        case .string: values.append(.string(item.string!))
                        default: throw UsageError("\(name): parameter '\(key)': a sweep is a list of numbers, booleans or strings")
                        }
                    }
                    e.sweeps.append(SweepAxis(parameter: key, values: values))
                default: throw UsageError("\(name): parameter '\(key)' must be a number, boolean, string or a list of them (a sweep)")
                }
            }
        }
        return e
    }
}
