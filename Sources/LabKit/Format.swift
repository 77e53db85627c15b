#if canImport(Glibc)
import Glibc
#endif

/// Numbers for people: up to 4 significant digits, no exponent for ordinary magnitudes.
public func formatNumber(_ v: Double) -> String {
    if v.isNaN { return "nan" }
    if v == v.rounded() && abs(v) < 1e15 { return String(Int64(v)) }
    let a = abs(v)
    if a >= 1e6 || a < 1e-3 { return String(format: "%.3e", v) }
    let decimals = a >= 1000 ? 0 : a >= 100 ? 1 : a >= 10 ? 2 : 3
    return String(format: "%.\(decimals)f", v)
}

public func formatBytes(_ bytes: Int) -> String {
    let units: [(Int, String)] = [(1 << 40, "T"), (1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")]
    for (size, suffix) in units where bytes >= size && bytes % size == 0 { return "\(bytes / size)\(suffix)" }
    return String(bytes)
}

extension String {
    init(format: String, _ value: Double) {
        var buffer = [CChar](repeating: 0, count: 64)
        _ = withVaList([value]) { vsnprintf(&buffer, buffer.count, format, $0) }
        self = buffer.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
    }
}

/// ISO 8601 UTC timestamp, e.g. 2026-11-24T21:00:00Z.
public func isoTimestamp(_ t: time_t = time(nil)) -> String {
    var tm = tm()
    var copy = t
    gmtime_r(&copy, &tm)
    var buffer = [CChar](repeating: 0, count: 32)
    strftime(&buffer, buffer.count, "%Y-%m-%dT%H:%M:%SZ", &tm)
    return buffer.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
}

/// Writes to standard error with one write(2): safe from any thread.
public func writeStderr(_ text: String) {
    var copy = text
    _ = copy.withUTF8 { write(2, $0.baseAddress, $0.count) }
}
